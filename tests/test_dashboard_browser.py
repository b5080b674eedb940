"""The dashboard in a real browser: Debian's chromium, driven by selenium, headless.

One ``twistd nexus`` (with a metrics token, health checks every 0.5 s) in front of two
``twistd nexus-mock`` backends, every process on 127.0.0.1; one browser session for the
whole module. The tests run in order, each from where the one before left the page:
token form, live requests, a backend going down, load (and the screenshot of
docs/dashboard.md), a narrow and a dark screen, a gateway restart. After each, the
browser's console must be clean and no request may have left the gateway.

Needs ``/usr/bin/chromium`` and ``/usr/bin/chromedriver`` (Debian's ``chromium`` and
``chromium-driver``; scripts/ensure-system-tools installs them). Selenium is pointed at
both explicitly, so selenium-manager never runs (it would try to download a browser).
Without them the tests fail: a skipped browser test is a page nobody looked at.

``NEXUS_TEST_SCREENSHOT=docs/dashboard.png`` keeps the screenshot taken under load
(``NEXUS_TEST_SCREENSHOT_LOAD_SECONDS``, default 3, sets how long the load runs first:
the charts fill up with a longer one).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT, TWISTD, free_port, twistd_env

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TOKEN = "dashboard-test-token"
#: A model name a client chose: must be shown as text, never run.
EVIL = "<script>window.pwned=1</script>"
#: A model name a backend lists: must be shown as text, never become an element.
EVIL_BACKEND_MODEL = "<img src=x id=injected>"
#: Contract: a finished request shows within 2 s, a backend's change within 2 s of its check.
LIVE_SECONDS = 2.0


def until(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


class Fleet:
    """The processes: two mocks and a gateway, with their logs in ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.mock_ports = {"gpu-a": free_port(), "cpu-b": free_port()}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _spawn(self, name: str, argv: list[str]) -> None:
        with (self.workdir / f"{name}.log").open("ab") as log:  # the child keeps its own
            self.procs[name] = subprocess.Popen(
                [*TWISTD, "--pidfile=", "-n", *argv], cwd=self.workdir, env=twistd_env(),
                stdout=log, stderr=subprocess.STDOUT,
            )

    def start(self) -> None:
        self._spawn("gpu-a", ["nexus-mock", "--port", str(self.mock_ports["gpu-a"]),
                              "--name", "gpu-a", "--models", f"llama3:8b,{EVIL_BACKEND_MODEL}",
                              "--latency-ms", "15", "--stream-delay-ms", "5"])
        self._spawn("cpu-b", ["nexus-mock", "--port", str(self.mock_ports["cpu-b"]),
                              "--name", "cpu-b", "--models", "llama3:8b,phi3:mini",
                              "--latency-ms", "40"])
        config = self.workdir / "nexus.toml"
        config.write_text(f"""
[server]
listen = "tcp:{self.port}:interface=127.0.0.1"
metrics_token = "{TOKEN}"
[health_check]
interval_seconds = 0.5
timeout_seconds = 2
failure_threshold = 1
recovery_threshold = 1
[logging]
requests = false
[[backends]]
name = "gpu-a"
url = "http://127.0.0.1:{self.mock_ports['gpu-a']}"
type = "openai"
priority = 10
model_capabilities = {{"llama3:8b" = ["tools", "json_mode"]}}
[[backends]]
name = "cpu-b"
url = "http://127.0.0.1:{self.mock_ports['cpu-b']}"
type = "openai"
""")
        self.start_gateway()
        until(lambda: self.health().get("backends", {}).get("healthy") == 2, 30,
              "both backends healthy")

    def start_gateway(self) -> None:
        self._spawn("gateway", ["nexus", "--config", str(self.workdir / "nexus.toml")])

        def up() -> bool:
            assert self.procs["gateway"].poll() is None, self.log("gateway")
            try:
                self.health()
            except OSError:
                return False
            return True

        until(up, 30, "the gateway to listen")

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")[-4000:]

    # -- plain HTTP --------------------------------------------------------------------------

    def http(self, method: str, path: str, body: object = None,
             headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"content-type": "application/json",
                                                  **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def health(self) -> Any:
        return json.loads(self.http("GET", "/health")[2])

    def chat(self, model: str, request_id: str | None = None, stream: bool = False) -> int:
        headers = {"x-request-id": request_id} if request_id else {}
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}],
                "stream": stream}
        return self.http("POST", "/v1/chat/completions", body, headers)[0]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("dashboard-browser"))
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.stop_all()


@pytest.fixture(scope="module")
def browser(fleet: Fleet) -> Iterator[Any]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: run scripts/ensure-system-tools "
                    "(apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,900", "--hide-scrollbars",
                     "--no-first-run", "--disable-extensions", "--disable-background-networking",
                     "--disable-component-update", "--disable-default-apps", "--disable-sync"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    # A driver path given: selenium-manager is skipped, nothing is downloaded.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def js(browser: Any, script: str, *args: Any) -> Any:
    return browser.execute_script(script, *args)


def assert_clean(browser: Any, fleet: Fleet, allowed: Callable[[str], bool] = lambda m: False
                 ) -> list[str]:
    """No console error since the last call, and no request to anything but the gateway.

    Returns the URLs the page requested since the last call.
    """
    errors = [entry["message"] for entry in browser.get_log("browser")
              if entry["level"] == "SEVERE" and not allowed(entry["message"])]
    assert errors == []
    urls = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    foreign = [u for u in urls if not u.startswith(fleet.url + "/")]
    assert foreign == []
    return urls


def card_status(browser: Any, backend: str) -> str | None:
    result: str | None = js(browser, """
        for (const card of document.querySelectorAll('#cards [data-backend]')) {
          if (card.dataset.backend === arguments[0]) {
            return card.className + ' | ' + card.querySelector('.badge').textContent;
          }
        }
        return null;""", backend)
    return result


def row_text(browser: Any, request_id: str) -> str | None:
    result: str | None = js(browser, """
        for (const body of document.querySelectorAll('#requests tbody')) {
          if (body.dataset.request === arguments[0]) { return body.innerText; }
        }
        return null;""", request_id)
    return result


def live(browser: Any) -> bool:
    return bool(js(browser, "return document.getElementById('live').textContent === 'live'"))


# -- without JavaScript: plain HTTP ------------------------------------------------------------


def test_the_page_reads_without_javascript(fleet: Fleet) -> None:
    assert fleet.chat("llama3:8b", request_id="plain-1") == 200
    assert fleet.chat(EVIL, request_id="plain-evil") == 404
    status, _, body = fleet.http("GET", "/")
    assert status == 401 and b'name="token"' in body  # the token first
    status, headers, body = fleet.http("GET", "/", headers={"authorization": f"Bearer {TOKEN}"})
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    page = body.decode()
    for text in ("gpu-a", "cpu-b", ">healthy<", "llama3:8b", "phi3:mini", "json_mode, tools",
                 "plain-1", "Uptime", "Error rate", "Tokens", "Last requests"):
        assert text in page, text
    assert EVIL not in page and "&lt;script&gt;window.pwned=1&lt;/script&gt;" in page
    assert EVIL_BACKEND_MODEL not in page and "&lt;img src=x id=injected&gt;" in page


# -- in the browser -----------------------------------------------------------------------------


def test_the_token_is_asked_once_and_kept_in_a_strict_httponly_cookie(
    browser: Any, fleet: Fleet
) -> None:
    browser.get(fleet.url + "/")
    assert "metrics token" in browser.page_source
    field = browser.find_element("id", "token")
    field.send_keys(TOKEN)
    field.submit()
    until(lambda: js(browser, "return !!document.getElementById('cards')"), 10, "the dashboard")
    until(lambda: live(browser), 10, "the page to go live")
    [cookie] = browser.get_cookies()
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert TOKEN not in cookie["value"]
    assert js(browser, "return document.cookie") == ""  # HttpOnly: the page's script cannot read it
    browser.get(fleet.url + "/dashboard")  # asked once: the cookie opens it now
    until(lambda: live(browser), 10, "the page to go live again")
    urls = assert_clean(browser, fleet, allowed=lambda m: "status of 401" in m)  # the form's
    paths = {u[len(fleet.url):].split("?")[0] for u in urls}
    assert {"/", "/dashboard/login", "/dashboard", "/assets/dashboard.js",
            "/assets/dashboard.css", "/v1/events"} <= paths, paths


def test_finished_requests_appear_within_two_seconds_without_reload(
    browser: Any, fleet: Fleet
) -> None:
    js(browser, "window.sameDocument = 'yes'")
    for n in range(3):
        request_id = f"live-{n}-{random.randrange(10**9)}"
        assert fleet.chat("llama3:8b", request_id=request_id, stream=n == 1) == 200
        done = time.monotonic()
        text = until(lambda rid=request_id: row_text(browser, rid), 5, f"row {request_id}")
        assert time.monotonic() - done <= LIVE_SECONDS, "the row came too late"
        assert "llama3:8b" in text and "200" in text
    evil_id = f"evil-{random.randrange(10**9)}"
    assert fleet.chat(EVIL, request_id=evil_id) == 404
    text = until(lambda: row_text(browser, evil_id), LIVE_SECONDS + 1, "the refused request's row")
    assert EVIL in text and "404" in text and "no_backend" in text  # its text, shown as text
    assert js(browser, "return typeof window.pwned") == "undefined"
    assert js(browser, "return document.querySelectorAll('script').length") == 1
    assert js(browser, "return document.querySelectorAll('#injected, main img').length") == 0
    assert EVIL_BACKEND_MODEL in js(browser, "return document.getElementById('matrix').innerText")
    assert js(browser, "return window.sameDocument") == "yes"  # never reloaded
    assert_clean(browser, fleet)


def test_a_backend_going_down_turns_its_card(browser: Any, fleet: Fleet) -> None:
    assert "s-healthy" in (card_status(browser, "cpu-b") or "")
    stopped = time.monotonic()
    fleet.stop("cpu-b", signal.SIGKILL)
    seen = until(lambda: "unhealthy" in (card_status(browser, "cpu-b") or ""), 10,
                 "the card of cpu-b to turn unhealthy")
    assert seen
    # Checks run every 0.5 s: the one that saw it ran within 0.5 s of the kill.
    assert time.monotonic() - stopped <= 0.5 + LIVE_SECONDS + 0.5
    assert "s-unhealthy" in (card_status(browser, "cpu-b") or "")
    error = js(browser, """
        for (const card of document.querySelectorAll('#cards [data-backend]')) {
          if (card.dataset.backend === 'cpu-b') {
            const e = card.querySelector('[data-f=last_error]'); return e && e.textContent;
          }
        }""")
    assert error and "Connection" in error  # why: connection refused
    assert "s-healthy" in (card_status(browser, "gpu-a") or "")
    assert js(browser, "return window.sameDocument") == "yes"
    assert_clean(browser, fleet)


def _load(fleet: Fleet, seconds: float, stop: threading.Event, count: list[int]) -> None:
    """Requests on a keep-alive connection: mostly answered, some refused or failing."""
    connection = http.client.HTTPConnection("127.0.0.1", fleet.port, timeout=10)
    rng = random.Random(threading.get_ident())
    end = time.monotonic() + seconds
    while time.monotonic() < end and not stop.is_set():
        pick = rng.random()
        model = "llama3:8b" if pick < 0.8 else "phi3:mini" if pick < 0.9 else "gpt-5-turbo"
        body = {"model": model, "messages": [{"role": "user", "content": "hello"}],
                "stream": rng.random() < 0.3}
        connection.request("POST", "/v1/chat/completions", json.dumps(body),
                           {"content-type": "application/json"})
        connection.getresponse().read()
        count[0] += 1
        time.sleep(rng.uniform(0.0, 0.02))
    connection.close()


def test_under_load_the_charts_fill_and_a_screenshot_is_taken(
    browser: Any, fleet: Fleet, tmp_path: Path
) -> None:
    seconds = float(os.environ.get("NEXUS_TEST_SCREENSHOT_LOAD_SECONDS", "3"))
    stop = threading.Event()
    count = [0]
    threads = [threading.Thread(target=_load, args=(fleet, seconds, stop, count))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join(seconds + 30)
    finally:
        stop.set()
    assert count[0] > 20
    total = until(lambda: js(browser, """
        const n = Number(document.querySelector('[data-total=requests]').textContent
                         .replace(/,/g, ''));
        return n >= arguments[0] ? n : 0;""", count[0]), LIVE_SECONDS + 2.5, "the totals")
    assert total >= count[0]
    until(lambda: js(browser, "return document.querySelectorAll('#chart-rps rect').length"),
          LIVE_SECONDS + 1, "bars in the rate chart")
    assert js(browser, "return document.querySelectorAll('#chart-latency path').length") == 2
    assert js(browser, "return document.querySelectorAll('#requests tbody').length") == 50
    assert js(browser, "return document.querySelectorAll('#requests tbody.error').length") > 0
    height = js(browser, "return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(height + 120, 2000))
    shot = tmp_path / "dashboard.png"
    until(lambda: browser.save_screenshot(str(shot)), 5, "the screenshot")
    browser.set_window_size(1280, 900)
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("NEXUS_TEST_SCREENSHOT")
    if keep:
        shutil.copy(shot, ROOT / keep if not Path(keep).is_absolute() else keep)
    assert_clean(browser, fleet)


def test_usable_at_375_px_and_dark_when_the_system_is(browser: Any, fleet: Fleet) -> None:
    metrics = {"width": 375, "height": 812, "deviceScaleFactor": 2, "mobile": True}
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    try:
        until(lambda: js(browser, "return window.innerWidth") == 375, 5, "a 375 px viewport")
        # Nothing sticks out of the page sideways (wide tables scroll inside their box).
        assert js(browser, "return document.documentElement.scrollWidth") <= 375
        width = js(browser, "return document.querySelector('#cards .card').offsetWidth")
        assert 300 <= width <= 375
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

    def background() -> Any:
        return js(browser, "return getComputedStyle(document.body).backgroundColor")

    def dark(on: bool) -> None:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {
            "features": [{"name": "prefers-color-scheme", "value": "dark" if on else "light"}]})

    def luminance(color: str) -> float:
        r, g, b = (int(v) for v in color[color.index("(") + 1 : color.index(")")].split(",")[:3])
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    dark(True)
    try:
        assert luminance(background()) < 60
    finally:
        dark(False)
    assert luminance(background()) > 200
    assert_clean(browser, fleet)


def test_the_stream_survives_a_gateway_restart(browser: Any, fleet: Fleet) -> None:
    js(browser, "window.sameDocument = 'still'")
    fleet.stop("gateway")
    until(lambda: not live(browser), 10, "the page to notice the gateway is gone")
    fleet.start_gateway()
    until(lambda: live(browser), 15, "EventSource to reconnect")
    request_id = f"after-restart-{random.randrange(10**9)}"
    assert fleet.chat("llama3:8b", request_id=request_id) == 200
    until(lambda: row_text(browser, request_id), LIVE_SECONDS + 1, "a request after the restart")
    assert js(browser, "return window.sameDocument") == "still"  # the same page all along
    # While the gateway was down, the browser's reconnection attempts failed: expected.
    assert_clean(browser, fleet, allowed=lambda m: "/v1/events" in m)
