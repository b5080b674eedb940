"""Discovery by mDNS / DNS-SD (contract section 10).

The unit part drives ``Discovery`` with fake browser events and a ``Clock``; the real part
advertises services with python-zeroconf on 127.0.0.1 (as avahi would on a LAN), pointing at mock
backends, and watches a gateway (in this process, and ``twistd nexus`` as a process) find them,
serve through them, and let them go.
"""

from __future__ import annotations

import gc
import json
import logging
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from zeroconf import BadTypeInNameException, ServiceInfo, Zeroconf, service_type_name

from nexus.config import (
    BackendConfig,
    ConfigError,
    DiscoveryConfig,
    HealthCheckConfig,
    parse_config,
)
from nexus.discovery import (
    Advert,
    Discovery,
    DiscoveryService,
    Unusable,
    _Listener,
    _ZeroconfLog,
    checker,
    instance_label,
    plan,
    same_server,
    unique_id,
)
from nexus.health import HealthPoller
from nexus.registry import HEALTHY, SOURCE_CONFIG, SOURCE_MDNS, UNKNOWN, Backend, BackendRegistry
from nexus.service import makeService
from nexus.tap import Options
from tests.support import (
    TWISTD,
    Cleanup,
    free_port,
    http_client,
    served_by,
    start_gateway,
    start_mock,
    twistd_env,
    wait_for,
)

LLM = "_llm._tcp.local."
OLLAMA = "_ollama._tcp.local."


def advert(
    instance: str = "gpu-box",
    service_type: str = LLM,
    addresses: tuple[str, ...] = ("10.0.0.7",),
    port: int | None = 8000,
    **txt: bytes | None,
) -> Advert:
    return Advert(
        service_type=service_type,
        name=f"{instance}.{service_type}",
        addresses=addresses,
        port=port,
        properties={k.encode(): v for k, v in txt.items()},
    )


# ---- from an advert to a backend -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("gpu-box._llm._tcp.local.", "gpu-box"),
        ("Living Room Mac._llm._tcp.local.", "Living Room Mac"),
        ("rack.2._llm._tcp.local.", "rack.2"),  # a dot inside an instance name is allowed
        ("GPU-BOX._LLM._TCP.LOCAL.", "GPU-BOX"),  # DNS names are case-insensitive
        ("evil\r\nx-injected: 1._llm._tcp.local.", "evil-x-injected: 1"),
        ("\t._llm._tcp.local.", "mdns"),
        ("\x00tab\tbed\x7f._llm._tcp.local.", "tab-bed"),
        ("x" * 200 + "._llm._tcp.local.", "x" * 63),
    ],
)
def test_id_is_the_instance_name(name: str, label: str) -> None:
    assert instance_label(LLM, name) == label


def test_taken_ids_get_a_number() -> None:
    assert unique_id("gpu-box", set()) == "gpu-box"
    assert unique_id("gpu-box", {"gpu-box"}) == "gpu-box-2"
    assert unique_id("gpu-box", {"gpu-box", "gpu-box-2"}) == "gpu-box-3"


@pytest.mark.parametrize(
    ("addresses", "port", "api_path", "url"),
    [
        (("10.0.0.7",), 8000, None, "http://10.0.0.7:8000"),
        (("10.0.0.7",), 11434, b"/", "http://10.0.0.7:11434"),
        (("10.0.0.7",), 8080, b"/ollama/", "http://10.0.0.7:8080/ollama"),
        (("10.0.0.7",), 8080, b"llm/api", "http://10.0.0.7:8080/llm/api"),
        (("10.0.0.7",), 8080, b"/v1", "http://10.0.0.7:8080"),  # the OpenAI base: its root
        (("10.0.0.7",), 8080, b"/proxy/v1/", "http://10.0.0.7:8080/proxy"),
        (("10.0.0.7",), 8080, b"", "http://10.0.0.7:8080"),
        (("2001:db8::7",), 8000, None, "http://[2001:db8::7]:8000"),
        (("2001:db8::7", "10.0.0.7"), 8000, None, "http://10.0.0.7:8000"),  # IPv4 preferred
        (("fe80::1", "2001:db8::7"), 8000, None, "http://[2001:db8::7]:8000"),
        (("0.0.0.0", "not an address", "10.0.0.8"), 8000, None, "http://10.0.0.8:8000"),
    ],
)
def test_url_from_address_port_and_api_path(
    addresses: tuple[str, ...], port: int, api_path: bytes | None, url: str
) -> None:
    assert plan(advert(addresses=addresses, port=port, api_path=api_path)).url == url


@pytest.mark.parametrize(
    ("service_type", "txt_type", "expected"),
    [
        (LLM, None, "generic"),
        (OLLAMA, None, "ollama"),
        (OLLAMA, b"", "ollama"),  # an empty value is no value
        (OLLAMA, b"vllm", "vllm"),
        (LLM, b"llama.cpp", "llamacpp"),
        (LLM, b"LlamaCpp", "llamacpp"),
        (LLM, b" lmstudio ", "lmstudio"),
        (LLM, b"exo", "exo"),
        (LLM, b"openai", "openai"),
        (LLM, b"ollama", "ollama"),
        (LLM, b"tgi", "generic"),
        (OLLAMA, b"tgi", "generic"),
        (LLM, b"\xff\xfe", "generic"),  # not UTF-8
        (LLM, b"x" * 250, "generic"),
    ],
)
def test_type_from_txt(service_type: str, txt_type: bytes | None, expected: str) -> None:
    assert plan(advert(service_type=service_type, type=txt_type)).type == expected


def test_txt_keys_are_case_insensitive() -> None:
    found = plan(advert(TYPE=b"vllm", Api_Path=b"/x"))
    assert (found.type, found.url) == ("vllm", "http://10.0.0.7:8000/x")


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"port": None}, "no usable port (None)"),
        ({"port": 0}, "no usable port (0)"),
        ({"addresses": ()}, "no usable address"),
        ({"addresses": ("fe80::1",)}, "no usable address"),  # link-local needs a zone
        ({"api_path": b"/a b"}, "TXT api_path '/a b' is not a URL path"),
        ({"api_path": b"/x?y=1"}, "is not a URL path"),
        ({"api_path": b"/x#y"}, "is not a URL path"),
        ({"api_path": b"/" + b"a" * 250}, "is not a URL path"),
        ({"api_path": b"\x80\x81"}, "TXT api_path is not UTF-8"),
    ],
)
def test_unusable_adverts_say_why(fields: dict[str, Any], why: str) -> None:
    with pytest.raises(Unusable, match=re.escape(why)):
        plan(advert(**fields))


TXT = st.dictionaries(
    st.binary(max_size=20) | st.sampled_from([b"type", b"api_path", b"TYPE"]),
    st.none() | st.binary(max_size=255),
    max_size=8,
)


@given(
    instance=st.text(min_size=1, max_size=80),
    addresses=st.lists(st.ip_addresses().map(str) | st.text(max_size=20), max_size=4),
    port=st.none() | st.integers(-5, 70000),
    properties=TXT,
)
def test_any_advert_makes_a_valid_backend_or_is_refused(
    instance: str, addresses: list[str], port: int | None, properties: dict[bytes, bytes | None]
) -> None:
    garbage = Advert(LLM, f"{instance}.{LLM}", tuple(addresses), port, properties)
    try:
        found = plan(garbage)
    except Unusable:
        return
    # Whatever it says, a backend made from it is one the configuration would accept.
    data = {"backends": [{"name": found.label, "url": found.url, "type": found.type}]}
    config, _ = parse_config(data, "mdns", {})
    assert config.backends[0].url == found.url
    assert found.label.isprintable() and 0 < len(found.label) <= 63


def test_same_server() -> None:
    assert same_server("http://10.0.0.7:80", "http://10.0.0.7")
    assert same_server("http://Host.LAN:8000/", "http://host.lan:8000")
    assert same_server("http://[2001:db8:0::7]:8000", "http://[2001:db8::7]:8000")
    assert not same_server("http://10.0.0.7:8000", "http://10.0.0.7:8001")
    assert not same_server("http://10.0.0.7:8000/a", "http://10.0.0.7:8000")
    assert not same_server("https://10.0.0.7", "http://10.0.0.7")


@pytest.mark.parametrize(
    "service_type",
    ["_llm._tcp.local.", "_ollama._tcp.local.", "_a._udp.local.", "_x-y-z._tcp.local",
     "_a-name-of-15ch._tcp.local.", "_llm._tcp", "llm._tcp.local.", "_-x._tcp.local.",
     "_x--y._tcp.local.", "_123._tcp.local.", "_sixteen-chars-x._tcp.local.", "_a b._tcp.local."],
)  # fmt: skip
def test_config_accepts_the_service_types_zeroconf_accepts(service_type: str) -> None:
    full = service_type if service_type.endswith(".") else service_type + "."
    try:
        service_type_name(full, strict=False)
        zeroconf_accepts = True
    except BadTypeInNameException:
        zeroconf_accepts = False
    try:
        parse_config({"discovery": {"service_types": [service_type]}}, "f", {})
        config_accepts = True
    except ConfigError:
        config_accepts = False
    assert config_accepts == zeroconf_accepts


# ---- the registry follows the events (fake browser, Clock) ----------------------------------


class FakeNetwork:
    """What the browser would resolve: adverts by name; ``held`` names answer later."""

    def __init__(self) -> None:
        self.adverts: dict[str, Advert | None] = {}
        self.held: dict[str, Deferred[Advert | None]] = {}
        self.hold = False

    def resolve(self, service_type: str, name: str) -> Deferred[Advert | None]:
        if self.hold:
            d: Deferred[Advert | None] = Deferred()
            self.held[name] = d
            return d
        return succeed(self.adverts.get(name))


class Harness:
    """A ``Discovery`` on a Clock, the registry it changes, and the backends it announced."""

    def __init__(self, *configured: BackendConfig, grace: float = 60.0) -> None:
        self.registry = BackendRegistry(configured)
        self.clock = Clock()
        self.network = FakeNetwork()
        self.announced: list[Backend] = []
        self.discovery = Discovery(
            self.registry, self.clock, grace, self.network.resolve, self.announced.append
        )

    def advertise(self, found: Advert) -> None:
        self.network.adverts[found.name] = found
        self.discovery.service_added(found.service_type, found.name)

    def update(self, found: Advert) -> None:
        self.network.adverts[found.name] = found
        self.discovery.service_updated(found.service_type, found.name)

    def withdraw(self, found: Advert) -> None:
        self.discovery.service_removed(found.service_type, found.name)

    def ids(self) -> list[str]:
        return [b.name for b in self.registry.backends]


def test_a_resolved_service_becomes_an_unknown_mdns_backend() -> None:
    h = Harness()
    h.advertise(advert("gpu-box", type=b"vllm", api_path=b"/"))
    backend = h.registry.get("gpu-box")
    assert backend.config == BackendConfig(name="gpu-box", url="http://10.0.0.7:8000", type="vllm")
    assert (backend.source, backend.status, backend.withdrawn) == (SOURCE_MDNS, UNKNOWN, False)
    assert h.announced == [backend]  # checked at once, not at the next round


def test_default_type_by_service_type() -> None:
    h = Harness()
    h.advertise(advert("a", service_type=OLLAMA))
    h.advertise(advert("b", service_type=LLM, addresses=("10.0.0.8",)))
    assert [(b.name, b.type) for b in h.registry.backends] == [("a", "ollama"), ("b", "generic")]


def test_an_id_that_is_taken_gets_a_suffix() -> None:
    h = Harness(BackendConfig(name="gpu-box", url="http://192.168.1.9:11434"))
    h.advertise(advert("gpu-box", service_type=LLM, addresses=("10.0.0.7",)))
    h.advertise(advert("gpu-box", service_type=OLLAMA, addresses=("10.0.0.8",)))
    assert h.ids() == ["gpu-box", "gpu-box-2", "gpu-box-3"]
    assert h.registry.get("gpu-box").source == SOURCE_CONFIG
    assert h.registry.get("gpu-box-3").type == "ollama"


def test_configuration_wins_on_the_same_url() -> None:
    h = Harness(BackendConfig(name="ollama-local", url="http://10.0.0.7:11434"))
    h.advertise(advert("box", service_type=OLLAMA, port=11434))
    h.update(advert("box", service_type=OLLAMA, port=11434, extra=b"1"))  # once more: still no
    assert h.ids() == ["ollama-local"] and h.announced == []
    # Moving to another port makes it another server.
    h.update(advert("box", service_type=OLLAMA, port=11435))
    assert h.ids() == ["box", "ollama-local"]


def test_a_service_that_moves_to_a_url_the_config_has_is_withdrawn() -> None:
    h = Harness(BackendConfig(name="cfg", url="http://10.0.0.7:9000"), grace=5)
    h.advertise(advert("box", port=8000))
    h.update(advert("box", port=9000))
    assert h.registry.get("box").withdrawn
    h.clock.advance(5)
    assert h.ids() == ["cfg"]


def test_a_vanished_service_is_unknown_at_once_and_removed_after_the_grace_period() -> None:
    h = Harness(grace=60)
    found = advert("gpu-box")
    h.advertise(found)
    backend = h.registry.get("gpu-box")
    backend.status = HEALTHY
    h.withdraw(found)
    assert (backend.status, backend.withdrawn) == (UNKNOWN, True)
    assert not backend.healthy and h.ids() == ["gpu-box"]  # still listed, not routed to
    h.clock.advance(59.9)
    assert h.ids() == ["gpu-box"]
    h.clock.advance(0.1)
    assert h.ids() == [] and h.discovery.services == {}
    # Advertised again later: a new backend, under the same id.
    h.advertise(found)
    assert h.ids() == ["gpu-box"] and h.registry.get("gpu-box") is not backend


def test_coming_back_cancels_the_removal() -> None:
    h = Harness(grace=60)
    found = advert("gpu-box")
    h.advertise(found)
    backend = h.registry.get("gpu-box")
    h.withdraw(found)
    h.clock.advance(30)
    h.advertise(found)
    assert h.registry.get("gpu-box") is backend and not backend.withdrawn
    assert h.announced == [backend, backend]  # checked again at once
    h.clock.advance(3600)
    assert h.ids() == ["gpu-box"] and h.clock.getDelayedCalls() == []


def test_registry_observers_see_every_change() -> None:
    """What the dashboard's live view of the fleet hears."""
    h = Harness(grace=5)
    heard: list[tuple[str, str, bool, bool]] = []
    h.registry.observers.append(
        lambda b, removed: heard.append((b.name, b.status, b.withdrawn, removed))
    )
    found = advert("gpu-box")
    h.advertise(found)
    h.withdraw(found)
    h.advertise(found)
    h.withdraw(found)
    h.clock.advance(5)
    assert heard == [
        ("gpu-box", UNKNOWN, False, False),  # added
        ("gpu-box", UNKNOWN, True, False),  # gone: unknown, withdrawn
        ("gpu-box", UNKNOWN, False, False),  # back
        ("gpu-box", UNKNOWN, True, False),
        ("gpu-box", UNKNOWN, True, True),  # removed
    ]


def test_a_service_that_changes_url_or_type_is_a_new_backend_under_its_id() -> None:
    h = Harness()
    h.advertise(advert("gpu-box", port=8000))
    first = h.registry.get("gpu-box")
    h.update(advert("gpu-box", port=8000))  # nothing changed
    assert h.registry.get("gpu-box") is first
    h.update(advert("gpu-box", port=8001))
    second = h.registry.get("gpu-box")
    assert second is not first and second.config.url == "http://10.0.0.7:8001"
    h.update(advert("gpu-box", port=8001, type=b"vllm"))
    assert h.registry.get("gpu-box").type == "vllm" and h.ids() == ["gpu-box"]


def test_a_resolution_that_ends_after_the_service_left_is_ignored() -> None:
    h = Harness()
    found = advert("late")
    h.network.adverts[found.name] = found
    h.network.hold = True
    h.discovery.service_added(LLM, found.name)
    h.withdraw(found)
    h.network.held.pop(found.name).callback(found)
    assert h.ids() == [] and h.discovery.services == {}


def test_a_service_that_does_not_resolve_is_skipped_until_it_does() -> None:
    h = Harness()
    h.network.adverts["shy." + LLM] = None
    h.discovery.service_added(LLM, "shy." + LLM)
    assert h.ids() == []
    h.update(advert("shy"))
    assert h.ids() == ["shy"]


def test_garbage_txt_never_breaks_discovery() -> None:
    h = Harness()
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        bad = advert("bad", api_path=b"\xff" * 200, type=b"\x00\x01")
        h.advertise(bad)
        h.update(bad)  # said once, not at every update
        h.advertise(advert("odd", addresses=("10.0.0.9",), type=b"\xff", junk=None,
                           **{"\xe9": b"\xff" * 255}))  # fmt: skip
        h.advertise(advert("good", addresses=("10.0.0.8",)))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [(b.name, b.type) for b in h.registry.backends] == [
        ("good", "generic"),
        ("odd", "generic"),
    ]
    said = [formatEvent(e) for e in events if "ignoring service" in e.get("log_format", "")]
    assert said == [f"ignoring service bad.{LLM}: TXT api_path is not UTF-8"]
    assert not [e for e in events if e.get("log_level") in (LogLevel.error, LogLevel.critical)]


def test_a_failing_resolution_or_check_is_logged_not_raised() -> None:
    registry = BackendRegistry(())
    errors: list[dict[str, Any]] = []

    def boom(backend: Backend) -> None:
        raise RuntimeError("check failed")

    discovery = Discovery(registry, Clock(), 1, lambda t, n: succeed(advert("x")), boom)
    globalLogPublisher.addObserver(errors.append)
    try:
        discovery.service_added(LLM, "x." + LLM)
        failing = Discovery(registry, Clock(), 1, lambda t, n: _failed(RuntimeError("?")), boom)
        failing.service_added(LLM, "y." + LLM)
    finally:
        globalLogPublisher.removeObserver(errors.append)
    failures = [e for e in errors if e.get("log_failure") is not None]
    assert len(failures) == 2
    assert "x" in registry  # the backend is there even though its check failed
    for e in failures:
        e["log_failure"].trap(RuntimeError)


def _failed(error: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(error)
    return d


def test_stopping_cancels_pending_removals_and_ignores_later_events() -> None:
    h = Harness(grace=10)
    found = advert("gpu-box")
    h.advertise(found)
    h.withdraw(found)
    h.discovery.stop()
    assert h.clock.getDelayedCalls() == []
    h.advertise(advert("late", addresses=("10.0.0.9",)))
    assert h.ids() == ["gpu-box"]


@pytest_twisted.ensureDeferred
async def test_browser_events_reach_the_reactor_thread() -> None:
    """The listener runs in zeroconf's thread; the discovery sees its calls on the reactor."""
    seen: list[tuple[str, str, str, bool]] = []

    class Recorder:
        def service_added(self, t: str, n: str) -> None:
            seen.append(("added", t, n, threading.current_thread() is threading.main_thread()))

        def service_updated(self, t: str, n: str) -> None:
            seen.append(("updated", t, n, threading.current_thread() is threading.main_thread()))

        def service_removed(self, t: str, n: str) -> None:
            seen.append(("removed", t, n, threading.current_thread() is threading.main_thread()))

    listener = _Listener(reactor, Recorder())  # type: ignore[arg-type]

    def browser_thread() -> None:
        listener.add_service(None, LLM, "a." + LLM)
        listener.update_service(None, LLM, "a." + LLM)
        listener.remove_service(None, LLM, "a." + LLM)

    thread = threading.Thread(target=browser_thread)
    thread.start()
    thread.join()
    await wait_for(lambda: len(seen) == 3, what="three events")
    assert seen == [
        ("added", LLM, "a." + LLM, True),
        ("updated", LLM, "a." + LLM, True),
        ("removed", LLM, "a." + LLM, True),
    ]


def test_zeroconf_warnings_reach_the_gateway_log_through_the_reactor() -> None:
    calls: list[Any] = []

    class Reactor:
        def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
            calls.append((f, args, kwargs))

    bridge = _ZeroconfLog(Reactor())
    logger = logging.getLogger("zeroconf")
    logger.addHandler(bridge)
    events: list[dict[str, Any]] = []
    try:
        logger.warning("Error sending through socket %d", 7)
        logger.debug("not this one")
        assert len(calls) == 1  # nothing written from zeroconf's thread itself
        globalLogPublisher.addObserver(events.append)
        f, args, kwargs = calls[0]
        f(*args, **kwargs)
    finally:
        globalLogPublisher.removeObserver(events.append)
        logger.removeHandler(bridge)
    assert [(e["log_level"], formatEvent(e)) for e in events] == [
        (LogLevel.warn, "zeroconf: Error sending through socket 7")
    ]


# ---- health checks leave a withdrawn backend alone -------------------------------------------


class Probes:
    """A treq-like client whose GETs the test answers."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.pending: list[Deferred[Any]] = []

    def get(self, url: str, **kwargs: Any) -> Deferred[Any]:
        self.calls.append(url)
        d: Deferred[Any] = Deferred()
        self.pending.append(d)
        return d


class _Answer:
    code = 200

    def content(self) -> Deferred[bytes]:
        return succeed(b'{"data": [{"id": "m"}]}')


def test_a_withdrawn_backend_is_not_checked_and_a_probe_in_flight_is_ignored() -> None:
    h = Harness()
    probes = Probes()
    poller = HealthPoller(h.registry, HealthCheckConfig(), probes, h.clock, environ={})
    found = advert("gpu-box")
    h.advertise(found)
    poller.check_all()
    h.withdraw(found)  # while its probe is in flight
    probes.pending.pop().callback(_Answer())
    backend = h.registry.get("gpu-box")
    assert backend.status == UNKNOWN and backend.last_check is None
    poller.check_all()
    assert len(probes.calls) == 1  # not probed while withdrawn
    h.advertise(found)
    poller.check_all()
    probes.pending.pop().callback(_Answer())
    assert backend.status == HEALTHY and backend.models == frozenset({"m"})


def test_checker_trusts_new_backends_when_checks_are_off() -> None:
    h = Harness()
    probes = Probes()
    poller = HealthPoller(h.registry, HealthCheckConfig(), probes, h.clock, environ={})
    enabled = [False]
    check = checker(poller, lambda: enabled[0])
    h.advertise(advert("a"))
    backend = h.registry.get("a")
    check(backend)
    assert backend.status == HEALTHY and probes.calls == []
    enabled[0] = True
    check(backend)
    assert probes.calls == ["http://10.0.0.7:8000/v1/models"]


# ---- the gateway follows the fleet as it changes ---------------------------------------------


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = await (await http_client().get(url + "/metrics")).text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest_twisted.ensureDeferred
async def test_removing_a_backend_lets_its_requests_finish_and_keeps_its_series(
    cleanup: Cleanup,
) -> None:
    mock = start_mock("slow", ["m"], stream_chunks=4, stream_delay_ms=100)
    cleanup.append(mock)
    gw = await start_gateway([])
    cleanup.append(gw)
    registry = gw.gateway.registry
    backend = registry.add(BackendConfig(name="box", url=mock.url), source=SOURCE_MDNS)
    await gw.gateway.poller.check(backend)
    assert backend.healthy
    body = json.dumps({"model": "m", "messages": [], "stream": True}).encode()
    answer = gw.client.post(gw.url + "/v1/chat/completions", data=body)
    await wait_for(lambda: backend.pending == 1, what="a request in flight")
    assert registry.remove("box") is backend
    assert (await gw.get_json("/health", status=503))["fleet"] == []
    response = await answer
    text = await response.text()
    assert response.code == 200 and text.endswith("data: [DONE]\n\n") and "error" not in text
    assert backend.pending == 0
    samples = await scrape(gw.url)
    requests = ("nexus_requests_total", (("backend", "box"), ("model", "m"), ("status", "200")))
    assert samples[requests] == 1  # counters are history, under the model it served
    assert not [k for k in samples if k[0] == "nexus_pending_requests"]  # only current backends
    assert samples[("nexus_backends_total", ())] == 0
    assert (await gw.get_json("/v1/models"))["data"] == []


@pytest_twisted.ensureDeferred
async def test_an_id_added_again_with_another_url_is_served_there(cleanup: Cleanup) -> None:
    first, second = start_mock("first", ["m"]), start_mock("second", ["m"])
    cleanup.extend([first, second])
    gw = await start_gateway([])
    cleanup.append(gw)
    registry = gw.gateway.registry
    for mock in (first, second):
        backend = registry.add(BackendConfig(name="box", url=mock.url), source=SOURCE_MDNS)
        backend.status = HEALTHY
        registry.set_models(backend, ["m"])
        response = await gw.chat("m")
        answer = json.loads(await response.content())
        assert served_by(response) == "box"
        assert answer["choices"][0]["message"]["content"] == f"Hello from {mock.settings.name}"
        registry.remove("box")


# ---- switched off ---------------------------------------------------------------------------


def _children(service: Any) -> list[str]:
    return [child.name for child in service]


def test_discovery_is_a_child_of_the_gateway_unless_switched_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "nexus.toml"
    config.write_text("")
    for var in [v for v in __import__("os").environ if v.startswith("NEXUS_")]:
        monkeypatch.delenv(var)
    assert "discovery" in _children(makeService({"config": str(config)}, MemoryReactorClock()))
    options = Options()
    options.parseOptions(["--config", str(config), "--no-discovery"])
    assert "discovery" not in _children(makeService(options, MemoryReactorClock()))
    monkeypatch.setenv("NEXUS_DISCOVERY", "false")
    assert "discovery" not in _children(makeService({"config": str(config)}, MemoryReactorClock()))


# ---- for real: zeroconf on 127.0.0.1 -------------------------------------------------------


class Advertiser:
    """Services advertised with python-zeroconf on 127.0.0.1, as a server's avahi would."""

    def __init__(self) -> None:
        self.zc: Zeroconf | None = None

    async def start(self) -> None:
        self.zc = await deferToThread(Zeroconf, interfaces=["127.0.0.1"], use_asyncio=False)

    async def register(
        self, instance: str, service_type: str, port: int, properties: dict[Any, Any]
    ) -> ServiceInfo:
        """Advertise (blocks a thread while zeroconf probes for the name, about 1.5 s)."""
        assert self.zc is not None
        info = ServiceInfo(
            service_type,
            f"{instance}.{service_type}",
            addresses=[socket.inet_aton("127.0.0.1")],
            port=port,
            properties=properties,
            server=f"{instance}.local.",
        )
        await deferToThread(self.zc.register_service, info)
        return info

    async def unregister(self, info: ServiceInfo) -> None:
        assert self.zc is not None
        await deferToThread(self.zc.unregister_service, info)

    async def stop(self) -> None:
        if self.zc is not None:
            await deferToThread(self.zc.close)


def port_of(mock: Any) -> int:
    return int(urlsplit(mock.url).port or 0)


def unique_type() -> str:
    """A service type of this test run's own: other runs on this machine do not interfere."""
    return f"_nx{uuid.uuid4().hex[:8]}._tcp.local."


@pytest_twisted.async_yield_fixture
async def advertiser() -> Any:
    adverts = Advertiser()
    await adverts.start()
    yield adverts
    await adverts.stop()


@pytest_twisted.ensureDeferred
async def test_advertised_services_join_serve_and_leave(
    cleanup: Cleanup, advertiser: Advertiser
) -> None:
    service_type = unique_type()
    mock = start_mock("lan-box", ["llama3:8b"], type="llamacpp")
    cleanup.append(mock)
    gw = await start_gateway([])
    cleanup.append(gw)
    config = DiscoveryConfig(
        service_types=(service_type,), grace_period_seconds=0.5, interfaces=("127.0.0.1",)
    )
    discovery = DiscoveryService(
        config, gw.gateway.registry, reactor, checker(gw.gateway.poller, lambda: True)
    )
    discovery.startService()
    cleanup.append(type("Stop", (), {"stop": lambda self: discovery.stopService()})())
    assert discovery.browser is not None
    registry = gw.gateway.registry
    instance = f"lan-box-{uuid.uuid4().hex[:6]}"
    # Garbage beside it never breaks the browser or the gateway.
    await advertiser.register(
        f"junk-{uuid.uuid4().hex[:6]}", service_type, port_of(mock),
        {b"type": b"\xff\xfe", b"api_path": b"\x80" * 200, b"\x00": b"\xff" * 250},
    )  # fmt: skip

    advertised = time.monotonic()  # registering probes the name for about 1.5 s first
    info = await advertiser.register(
        instance, service_type, port_of(mock), {"type": "llama.cpp", "api_path": "/"}
    )
    await wait_for(lambda: instance in registry and registry.get(instance).healthy,
                   timeout=5, what="the advertised backend, healthy")  # fmt: skip
    appeared = time.monotonic() - advertised
    backend = registry.get(instance)
    assert backend.source == SOURCE_MDNS and backend.type == "llamacpp"
    assert backend.config.url == mock.url and appeared < 5, appeared
    assert [b.name for b in registry.backends] == [instance]  # the junk was ignored

    response = await gw.chat("llama3:8b")
    assert response.code == 200 and served_by(response) == instance
    models = await gw.get_json("/v1/models")
    assert [(m["id"], m["backends"]) for m in models["data"]] == [("llama3:8b", [instance])]
    fleet = (await gw.get_json("/health"))["fleet"]
    assert [(f["id"], f["source"], f["status"]) for f in fleet] == [
        (instance, "mdns", "healthy")
    ]
    stats = (await gw.get_json("/v1/stats"))["backends"]
    assert [(b["id"], b["source"], b["type"], b["requests"]) for b in stats] == [
        (instance, "mdns", "llamacpp", 1)
    ]
    assert (await scrape(gw.url))[("nexus_backends_healthy", ())] == 1

    await advertiser.unregister(info)
    await wait_for(lambda: backend.status == UNKNOWN, timeout=5, what="unknown")
    assert backend.withdrawn
    await wait_for(lambda: instance not in registry, timeout=5, what="removed after the grace")
    assert (await gw.get_json("/health", status=503))["backends"]["total"] == 0
    assert (await gw.get_json("/v1/stats"))["backends"] == []
    samples = await scrape(gw.url)
    labels = (("backend", instance.replace("-", "_")), ("model", "llama3_8b"), ("status", "200"))
    assert samples[("nexus_requests_total", labels)] == 1
    assert samples[("nexus_backends_total", ())] == 0


@pytest.mark.parametrize("checked_first", [True, False], ids=["no-such-address", "zeroconf-fails"])
@pytest_twisted.ensureDeferred
async def test_without_multicast_one_warning_and_the_gateway_carries_on(
    cleanup: Cleanup, monkeypatch: pytest.MonkeyPatch, checked_first: bool
) -> None:
    mock = start_mock("configured", ["m"])
    cleanup.append(mock)
    gw = await start_gateway([mock])
    cleanup.append(gw)
    warnings: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") in (LogLevel.warn, LogLevel.error, LogLevel.critical):
            warnings.append(formatEvent(event))

    # 198.51.100.77 (TEST-NET-2) is on no interface here: no multicast there.
    config = DiscoveryConfig(interfaces=("198.51.100.77",))
    discovery = DiscoveryService(
        config, gw.gateway.registry, reactor, checker(gw.gateway.poller, lambda: True)
    )
    if not checked_first:  # zeroconf tries, fails, and leaves a socket behind: no warning
        monkeypatch.setattr("nexus.discovery._local_addresses", lambda: {"198.51.100.77"})
    globalLogPublisher.addObserver(observe)
    try:
        discovery.startService()
        gc.collect()
        response = await gw.chat("m")
        discovery.stopService()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert response.code == 200 and served_by(response) == "configured"
    assert len(warnings) == 1, warnings
    why = "no network interface has the address 198.51.100.77" if checked_first else "[Errno"
    assert warnings[0].startswith(
        f"discovery: mDNS is not available on 198.51.100.77 (OSError: {why}"
    )
    assert warnings[0].endswith("running with the configured backends only")


# ---- for real: twistd nexus ------------------------------------------------------------------


class Gateway:
    """``twistd -n nexus`` as a process, with its output kept."""

    def __init__(self, tmp_path: Path, name: str, config: str, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        directory = tmp_path / name
        directory.mkdir()
        path = directory / "nexus.toml"
        path.write_text(f'[server]\nlisten = "tcp:{self.port}:interface=127.0.0.1"\n{config}')
        self.log = directory / "out.log"
        with self.log.open("wb") as out:  # the process has its own copy
            self.process = subprocess.Popen(
                [*TWISTD, "--pidfile=", "-n", "nexus", "--config", str(path)],
                cwd=directory,
                env={**twistd_env(), **env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.client = http_client()

    async def health(self) -> dict[str, Any] | None:
        assert self.process.poll() is None, self.output()
        try:
            response = await self.client.get(self.url + "/health")
            return json.loads(await response.content())  # type: ignore[no-any-return]
        except Exception:
            return None

    async def fleet(self) -> dict[str, str]:
        health = await self.health()
        return {} if health is None else {f["id"]: f["status"] for f in health["fleet"]}

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=20)


@pytest_twisted.ensureDeferred
async def test_twistd_discovers_a_service_on_loopback(
    tmp_path: Path, cleanup: Cleanup, advertiser: Advertiser
) -> None:
    """On loopback; switched off, it finds nothing; without multicast, one warning."""
    service_type = unique_type()
    lan, configured = start_mock("lan", ["llama3:8b"]), start_mock("configured", ["m"])
    cleanup.extend([lan, configured])
    backend = f'[[backends]]\nname = "configured"\nurl = "{configured.url}"\n'
    settings = (
        f'[discovery]\nservice_types = ["{service_type}"]\ngrace_period_seconds = 1\n'
        'interfaces = ["127.0.0.1"]\n'
    )
    on = Gateway(tmp_path, "on", settings + backend, {"NEXUS_DISCOVERY": "true"})
    off = Gateway(tmp_path, "off", settings + backend, {"NEXUS_DISCOVERY": "false"})
    no_multicast = {"NEXUS_DISCOVERY": "true", "NEXUS_DISCOVERY_INTERFACES": "198.51.100.77"}
    broken = Gateway(tmp_path, "broken", settings + backend, no_multicast)
    gateways = [on, off, broken]
    try:
        for gateway in gateways:
            await wait_for(lambda g=gateway: _is_healthy(g), timeout=30, what="twistd healthy")
        instance = f"lan-{uuid.uuid4().hex[:6]}"
        advertised = time.monotonic()
        info = await advertiser.register(instance, service_type, port_of(lan), {"type": "openai"})

        async def found() -> bool:
            return (await on.fleet()).get(instance) == "healthy"

        await wait_for(found, timeout=5, what="the service in the gateway's fleet")
        appeared = time.monotonic() - advertised
        response = await on.client.post(
            on.url + "/v1/chat/completions",
            data=json.dumps({"model": "llama3:8b", "messages": []}).encode(),
        )
        assert response.code == 200 and served_by(response) == instance
        # Both other gateways had as long to see it.
        assert await off.fleet() == {"configured": "healthy"}
        assert await broken.fleet() == {"configured": "healthy"}

        await advertiser.unregister(info)

        async def unknown() -> bool:
            return (await on.fleet()).get(instance) == "unknown"

        async def removed() -> bool:
            return instance not in await on.fleet()

        await wait_for(unknown, timeout=5, what="unknown once gone")
        await wait_for(removed, timeout=5, what="removed after the grace period")
        assert await on.fleet() == {"configured": "healthy"}
    finally:
        for gateway in gateways:
            gateway.stop()
    assert appeared < 5, appeared
    for gateway in gateways:
        assert gateway.process.returncode in (0, -signal.SIGTERM), gateway.output()
        assert "Traceback" not in gateway.output(), gateway.output()
    assert f"discovered backend {instance} at {lan.url}" in on.output()
    assert "discovery" not in off.output()
    broken_warnings = [line for line in broken.output().splitlines() if "warn" in line.lower()]
    assert len(broken_warnings) == 1, broken.output()
    assert "discovery: mDNS is not available on 198.51.100.77" in broken_warnings[0]


async def _is_healthy(gateway: Gateway) -> bool:
    health = await gateway.health()
    return health is not None and health["status"] == "healthy"
