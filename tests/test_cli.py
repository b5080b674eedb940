"""The ``nexus`` command (contract section 11), run as the installed script of this environment.

Against real things on 127.0.0.1: a gateway (in this process, or ``nexus serve`` as a
process), mock backends of each type, a process that records SIGHUP. Commands that need no
server run in-process through ``nexus.cli.run`` where only their output matters.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import click
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

from nexus import __version__
from nexus.access import AccessPolicy
from nexus.cli import cli, run
from nexus.cli._serve import gateway_options
from nexus.config import Config, load_config, render_toml
from tests.support import (
    TWISTD,
    Cleanup,
    deadline,
    free_port,
    start_gateway,
    start_mock,
    twistd_env,
    wait_for,
)

#: The console script installed with the package, next to this interpreter.
NEXUS = Path(sys.executable).parent / "nexus"


@attrs.frozen
class Result:
    code: int
    out: str
    err: str


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a ``nexus`` process: no NEXUS_* from the caller, no source tree on
    the path (the installed script must stand on its own), discovery off (no mDNS traffic)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env.pop("PYTHONPATH", None)
    env["NEXUS_DISCOVERY"] = "false"
    env.update(extra)
    return env


def nexus_sync(*args: str, cwd: Path | None = None, **env: str) -> Result:
    """Run ``nexus ARGS`` and wait (only where no server of this process must answer it)."""
    done = subprocess.run(
        [str(NEXUS), *args], cwd=cwd, env=cli_env(**env), capture_output=True, timeout=60
    )
    return Result(done.returncode, done.stdout.decode(), done.stderr.decode())


async def nexus(*args: str, cwd: Path | None = None, **env: str) -> Result:
    """Run ``nexus ARGS`` while the reactor keeps serving this process's gateways and mocks."""
    out, err, code = await deadline(
        getProcessOutputAndValue(
            str(NEXUS), args, env=cli_env(**env), path=str(cwd) if cwd else None,
            reactor=reactor,
        ),
        seconds=60,
        what=f"nexus {' '.join(args)}",
    )
    return Result(code, out.decode(), err.decode())


def assert_failed(result: Result, message: str) -> None:
    """Exit 1, nothing on stdout, one line ``Error: ...`` containing ``message`` on stderr."""
    assert result.code == 1, result
    assert result.out == "", result
    assert "Traceback" not in result.err, result
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result
    assert message in lines[0], result


def in_process(capsys: pytest.CaptureFixture[str], *args: str) -> Result:
    code = run(list(args))
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


# ---- the command tree: help and version


def _command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield prefix
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from _command_paths(command, (*prefix, name))
        else:
            yield (*prefix, name)


COMMANDS = list(_command_paths(cli))


def test_the_contract_commands_exist() -> None:
    assert {" ".join(p) for p in COMMANDS} >= {
        "", "serve", "backends", "backends list", "backends add", "backends remove", "models",
        "health", "config", "config init", "config check", "reload",
    }


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "nexus")
def test_every_command_has_help(capsys: pytest.CaptureFixture[str], path: tuple[str, ...]) -> None:
    result = in_process(capsys, *path, "--help")
    assert result.code == 0 and result.err == ""
    assert result.out.startswith(f"Usage: {' '.join(('nexus', *path))} ")
    # More than the usage line: what the command does.
    assert len(result.out.splitlines()) > 4


def test_help_and_version_from_the_installed_script() -> None:
    result = nexus_sync("--help")
    assert result.code == 0 and "backends" in result.out and "serve" in result.out
    import twisted

    result = nexus_sync("--version")
    expected = f"nexus {__version__} (Twisted {twisted.__version__})\n"
    assert (result.code, result.out) == (0, expected)
    # A group without its command shows its help instead of failing.
    result = nexus_sync("backends")
    assert result.code == 0 and "add" in result.out and "remove" in result.out


def test_serve_help_lists_the_gateway_options(capsys: pytest.CaptureFixture[str]) -> None:
    result = in_process(capsys, "serve", "--help")
    for names, _ in gateway_options():
        assert names in result.out
    assert "--config" in result.out and "--listen" in result.out and "--pidfile" in result.out


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert_failed(in_process(capsys, "backends", "list", "--bogus"), "No such option '--bogus'")
    assert_failed(in_process(capsys, "nope"), "No such command 'nope'")
    assert_failed(in_process(capsys, "backends", "list", "--status", "sad"), "'sad' is not one")
    assert_failed(in_process(capsys, "backends", "add"), "Missing argument 'URL'")
    assert_failed(in_process(capsys, "health", "--timeout", "0"), "--timeout")


def test_completion_scripts_and_backend_names(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for shell in ("bash", "zsh", "fish"):
        result = in_process(capsys, "completion", shell)
        assert result.code == 0 and "_NEXUS_COMPLETE" in result.out, shell
    (tmp_path / "nexus.toml").write_text(
        '[[backends]]\nname = "laptop"\nurl = "http://a:1"\n'
        '[[backends]]\nname = "gpu"\nurl = "http://b:1"\n'
    )
    # What bash asks when Tab is pressed after "nexus backends remove ".
    result = nexus_sync(
        cwd=tmp_path, _NEXUS_COMPLETE="bash_complete", COMP_WORDS="nexus backends remove ",
        COMP_CWORD="3",
    )
    assert result.out.split() == ["plain,laptop", "plain,gpu"]


# ---- asking a running gateway


@pytest_twisted.ensureDeferred
async def test_backends_list_models_and_health_ask_a_running_gateway(cleanup: Cleanup) -> None:
    good = start_mock("good", ["llama3:8b", "mistral:7b"])
    bad = start_mock("bad", ["phi3"], health_fail=True)
    cleanup += [good, bad]
    gateway = await start_gateway([good, bad])
    cleanup.append(gateway)
    url = gateway.url

    health = await gateway.get_json("/health")
    result = await nexus("backends", "list", "--json", "--url", url)
    assert result.code == 0 and result.err == ""
    listed = json.loads(result.out)
    assert [b["id"] for b in listed] == ["bad", "good"]
    # The same objects as /health's fleet (what changes between two calls aside).
    assert [{**b, "last_check": None} for b in listed] == [
        {**b, "last_check": None} for b in health["fleet"]
    ]

    result = await nexus("backends", "list", NEXUS_URL=url)
    assert result.code == 0, result
    header, *rows = result.out.splitlines()
    assert header.split() == [
        "ID", "TYPE", "STATUS", "SOURCE", "MODELS", "LATENCY", "LAST", "CHECK", "LAST", "ERROR"
    ]
    assert [row.split()[:5] for row in rows] == [
        ["bad", "openai", "unhealthy", "config", "0"],
        ["good", "openai", "healthy", "config", "2"],
    ]
    # Aligned: every column starts at the same place on every line.
    for column in ("TYPE", "STATUS", "SOURCE", "LAST CHECK"):
        start = header.index(column)
        assert all(row[start - 2 : start] == "  " and row[start] != " " for row in rows)
    assert "500" in rows[0]  # why "bad" is down, from its last check

    result = await nexus("backends", "list", "--status", "healthy", "--url", url)
    assert [row.split()[0] for row in result.out.splitlines()[1:]] == ["good"]
    result = await nexus("backends", "list", "--status", "unknown", "--url", url)
    assert result.out == "no backends with status unknown\n"

    models = await gateway.get_json("/v1/models")
    result = await nexus("models", "--json", "--url", url)
    assert result.code == 0 and json.loads(result.out) == models["data"]
    result = await nexus("models", "--url", url)
    assert result.out.splitlines() == [
        "MODEL       BACKENDS  ALIAS OF",
        "llama3:8b   good      -",
        "mistral:7b  good      -",
    ]
    result = await nexus("models", "--backend", "bad", "--url", url)
    assert (result.code, result.out) == (0, "no models on backend 'bad'\n")
    result = await nexus("models", "--backend", "good", "--json", "--url", url)
    assert [m["id"] for m in json.loads(result.out)] == ["llama3:8b", "mistral:7b"]

    # degraded: exit 0
    result = await nexus("health", "--url", url)
    assert result.code == 0, result
    first, second, blank, *table = result.out.splitlines()
    assert first == (
        "degraded: 1 of 2 backends healthy (1 unhealthy, 0 unknown), 2 models servable"
    )
    assert second.startswith(f"gateway {url}, version {__version__}, up ")
    assert blank == "" and table[0].startswith("ID ")
    result = await nexus("health", "--json", "--url", url)
    assert result.code == 0 and json.loads(result.out)["status"] == "degraded"

    # unhealthy: exit 2, the answer still printed
    good.configure(health_fail=True)
    for _ in range(gateway.gateway.config.health_check.failure_threshold):
        await gateway.check_health()
    result = await nexus("health", "--url", url)
    assert result.code == 2 and result.out.startswith("unhealthy: 0 of 2"), result
    result = await nexus("health", "--json", "--url", url)
    assert result.code == 2 and json.loads(result.out)["status"] == "unhealthy"


@pytest_twisted.ensureDeferred
async def test_api_key_from_option_or_environment(cleanup: Cleanup) -> None:
    mock = start_mock("m", ["m1"])
    cleanup.append(mock)
    gateway = await start_gateway([mock])
    cleanup.append(gateway)
    gateway.gateway.api.access = AccessPolicy(["sk-test"])

    result = await nexus("models", "--url", gateway.url)
    assert_failed(result, f"the gateway at {gateway.url} refused no key")
    assert "401" in result.err and "--api-key or NEXUS_API_KEY" in result.err
    assert_failed(
        await nexus("models", "--url", gateway.url, "--api-key", "wrong"), "refused a wrong key"
    )
    result = await nexus("models", "--url", gateway.url, "--api-key", "sk-test")
    assert result.code == 0 and "m1" in result.out
    result = await nexus("models", "--url", gateway.url, NEXUS_API_KEY="sk-test")
    assert result.code == 0 and "m1" in result.out
    # /health is open to all.
    assert (await nexus("health", "--url", gateway.url)).code == 0


@pytest_twisted.ensureDeferred
async def test_a_gateway_that_cannot_be_reached_is_one_line(cleanup: Cleanup) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    for command in (["backends", "list"], ["models"], ["health"]):
        assert_failed(
            await nexus(*command, "--url", url),
            f"cannot reach the gateway at {url} (connection refused)",
        )
    # Listening but never answering: the timeout ends it.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        assert_failed(
            await nexus("health", "--url", url, "--timeout", "0.5"),
            f"cannot reach the gateway at {url} (no answer within 0.5 s)",
        )
    # Something else than a gateway.
    mock = start_mock("m")
    cleanup.append(mock)
    assert_failed(await nexus("health", "--url", mock.url), "GET /health answered 404")
    assert_failed(await nexus("models", "--url", "ftp://x"), "must be http:// or https://")


# ---- serve and reload as processes


def serve_process(tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(NEXUS), "serve", *args],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def stop(process: subprocess.Popen[bytes]) -> tuple[str, str]:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=30)
    return out.decode(), err.decode()


@pytest_twisted.ensureDeferred
async def test_serve_runs_the_gateway_and_reload_makes_it_reread_its_file(
    tmp_path: Path, cleanup: Cleanup
) -> None:
    """``nexus serve`` without PYTHONPATH, a backend added to its file, ``nexus reload``."""
    first = start_mock("first", ["a"])
    second = start_mock("second", ["b"], type="ollama")
    cleanup += [first, second]
    port = free_port()
    config = tmp_path / "nexus.toml"
    config.write_text(
        f'[server]\nlisten = "tcp:{port}:interface=127.0.0.1"\n\n'
        f'# the first box\n[[backends]]\nname = "first"\nurl = "{first.url}"\n'
    )
    process = serve_process(tmp_path, "--config", str(config), "--pidfile", "nexus.pid")
    url = f"http://127.0.0.1:{port}"
    try:
        async def healthy() -> bool:
            assert process.poll() is None, stop(process)
            result = await nexus("health", "--url", url)
            return result.code == 0 and result.out.startswith("healthy")

        await wait_for(healthy, timeout=30, what="nexus serve healthy")
        assert (tmp_path / "nexus.pid").read_text().strip() == str(process.pid)

        result = await nexus("backends", "add", second.url, "--name", "second", cwd=tmp_path)
        assert result.code == 0, result
        result = await nexus("reload", "--pidfile", "nexus.pid", cwd=tmp_path)
        assert result.code == 0, result
        assert f"pid {process.pid}" in result.out

        async def two_models() -> bool:
            listed = await nexus("models", "--json", "--url", url)
            return [m["id"] for m in json.loads(listed.out)] == ["a", "b"]

        await wait_for(two_models, timeout=20, what="the added backend's model")
        listed = await nexus("backends", "list", "--json", "--url", url)
        assert {b["id"]: b["type"] for b in json.loads(listed.out)} == {
            "first": "generic", "second": "ollama"
        }
    finally:
        out, err = stop(process)
    assert process.returncode in (0, -signal.SIGTERM), (out, err)
    assert "Server Shut Down." in out and "Traceback" not in out + err
    assert not (tmp_path / "nexus.pid").exists()  # twistd removes its pid file


def test_serve_writes_no_pid_file_by_default_and_fails_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[routing]\nstrategy = "fastest"\n')
    result = nexus_sync("serve", "--config", str(bad), cwd=tmp_path)
    gateway = subprocess.run(
        [*TWISTD, "--pidfile=", "-n", "nexus", "--config", str(bad)],
        cwd=tmp_path, env=twistd_env(), capture_output=True, timeout=60,
    )
    said = gateway.stderr.decode().strip()
    assert said.startswith("nexus: configuration error: ")
    assert_failed(result, "")
    assert result.err.strip() == "Error: " + said.removeprefix("nexus: ")

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        listen = f"tcp:{busy.getsockname()[1]}:interface=127.0.0.1"
        result = nexus_sync("serve", "--listen", listen, cwd=tmp_path)
    assert result.code == 1 and "Traceback" not in result.out + result.err
    assert result.err.splitlines() == [f"Error: cannot listen on {listen}: Address already in use"]

    assert_failed(nexus_sync("serve", "--bogus", cwd=tmp_path), "--bogus")
    assert list(tmp_path.glob("*.pid")) == []


@pytest.fixture
def hup_recorder(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A stand-in gateway (its command line names nexus) that writes a file on SIGHUP."""
    script = tmp_path / "nexus_standin.py"
    got = tmp_path / "got-sighup"
    script.write_text(
        "import pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGHUP, lambda *_: pathlib.Path(sys.argv[1]).write_text('hup'))\n"
        "pathlib.Path(sys.argv[1] + '.ready').write_text('')\n"
        "time.sleep(60)\n"
    )
    process = subprocess.Popen([sys.executable, str(script), str(got)])
    try:
        deadline_at = time.monotonic() + 20
        while not Path(f"{got}.ready").exists():
            assert time.monotonic() < deadline_at and process.poll() is None
            time.sleep(0.01)
        yield process, got
    finally:
        process.kill()
        process.wait()


def test_reload_sends_sighup_to_the_pid_in_the_file(
    tmp_path: Path, hup_recorder: tuple[subprocess.Popen[bytes], Path]
) -> None:
    process, got = hup_recorder
    (tmp_path / "gateway.pid").write_text(f"{process.pid}\n")
    result = nexus_sync("reload", "--pidfile", "gateway.pid", cwd=tmp_path)
    assert result.code == 0, result
    assert result.out == (
        f"sent SIGHUP to the gateway (pid {process.pid}, from gateway.pid); "
        "its log says what changed\n"
    )
    deadline_at = time.monotonic() + 10
    while not got.exists():
        assert time.monotonic() < deadline_at, "no SIGHUP arrived"
        time.sleep(0.01)
    assert process.poll() is None  # handled, not killed


def test_reload_failures(tmp_path: Path) -> None:
    assert_failed(nexus_sync("reload", cwd=tmp_path), "twistd.pid: no such file")
    (tmp_path / "x.pid").write_text("12ab\n")
    assert_failed(nexus_sync("reload", "--pidfile", "x.pid", cwd=tmp_path), "not a process id")
    (tmp_path / "x.pid").write_text("0\n")
    assert_failed(nexus_sync("reload", "--pidfile", "x.pid", cwd=tmp_path), "not a process id")
    # A pid file left behind by a gateway that is gone.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "x.pid").write_text(str(gone.pid))
    assert_failed(
        nexus_sync("reload", "--pidfile", "x.pid", cwd=tmp_path),
        f"no process {gone.pid} (from x.pid): the gateway is not running",
    )
    # Its pid reused by another program: SIGHUP would end it, so it is not sent.
    other = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "x.pid").write_text(str(other.pid))
        assert_failed(
            nexus_sync("reload", "--pidfile", "x.pid", cwd=tmp_path),
            f"process {other.pid} (from x.pid) is not a Nexus gateway ('sleep 60')",
        )
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


# ---- backends add: type detection


@pytest.mark.parametrize(
    ("kind", "detected"),
    [
        ("ollama", "ollama"),
        ("llamacpp", "llamacpp"),
        ("openai", "openai"),
        ("vllm", "openai"),  # vLLM's /health is empty; its /v1/models is OpenAI's
    ],
)
@pytest_twisted.ensureDeferred
async def test_backends_add_detects_the_type(
    tmp_path: Path, cleanup: Cleanup, kind: str, detected: str
) -> None:
    mock = start_mock("m", ["x"], type=kind)
    cleanup.append(mock)
    (tmp_path / "nexus.toml").write_text("")
    result = await nexus("backends", "add", mock.url, cwd=tmp_path)
    assert result.code == 0, result
    assert result.out.startswith(f"detected type {detected}: GET ")
    name = mock.url.removeprefix("http://")
    [backend] = load_config(str(tmp_path / "nexus.toml"), environ={})[0].backends
    assert (backend.name, backend.url, backend.type) == (name, mock.url, detected)


@pytest_twisted.ensureDeferred
async def test_backends_add_says_generic_when_nothing_known_answers(
    tmp_path: Path, cleanup: Cleanup
) -> None:
    (tmp_path / "nexus.toml").write_text("")
    failing = start_mock("failing", health_fail=True)  # 500 on every probe
    cleanup.append(failing)
    result = await nexus("backends", "add", failing.url, "--name", "f", cwd=tmp_path)
    assert result.code == 0 and "detected type generic" in result.out, result

    nobody = f"http://127.0.0.1:{free_port()}"
    result = await nexus("backends", "add", nobody, "--name", "n", cwd=tmp_path)
    assert result.code == 0, result
    assert result.err.startswith(f"warning: nothing answered at {nobody} (GET /api/tags: ")
    assert "connection refused" in result.err and "added as generic" in result.err

    types = {b.name: b.type for b in load_config(str(tmp_path / "nexus.toml"))[0].backends}
    assert types == {"f": "generic", "n": "generic"}


@pytest_twisted.ensureDeferred
async def test_each_detection_probe_gives_up_after_2_seconds(
    tmp_path: Path, cleanup: Cleanup
) -> None:
    # /api/tags and /health answer 404 at once; /v1/models takes 10 s.
    slow = start_mock("slow", type="openai", health_latency_ms=10_000)
    cleanup.append(slow)
    (tmp_path / "nexus.toml").write_text("")
    started = time.monotonic()
    result = await nexus("backends", "add", slow.url, cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert result.code == 0 and "detected type generic" in result.out, result
    assert 2.0 <= elapsed < 6.0, elapsed


# ---- backends add and remove: the file


ORIGINAL = """\
# Nexus at home.   (a comment with odd   spacing)
[server]
listen = "tcp:8000:interface=127.0.0.1"   # loopback only
request_timeout_seconds = 300

# The laptop.
[[backends]]
name = "laptop"
url = "http://127.0.0.1:11434"
type = "ollama"
# priority = 10   (not yet)

# The GPU box, in the cupboard.
[[backends]]
name = "gpu"    # the big one
url = "http://127.0.0.1:8001"
type = "vllm"
priority = 10
models = [
    "llama3:70b",  # the one we use
]

# How requests pick a backend.
[routing]
strategy = "smart"
[routing.aliases]
"gpt-4" = "llama3:70b"
"""

ADDED = """
[[backends]]
name = "new"
url = "http://127.0.0.1:9000"
type = "openai"
priority = 5
"""


def test_add_then_remove_keeps_every_other_byte(tmp_path: Path) -> None:
    config = tmp_path / "nexus.toml"
    config.write_text(ORIGINAL)
    result = nexus_sync(
        "backends", "add", "http://127.0.0.1:9000/", "--name", "new", "--type", "openai",
        "--priority", "5", cwd=tmp_path,
    )
    assert result.code == 0, result
    assert result.out == (
        "added backend 'new' (openai, http://127.0.0.1:9000) to nexus.toml; "
        "`nexus reload` applies it to a running gateway\n"
    )
    at = ORIGINAL.index("# How requests")
    assert config.read_text() == ORIGINAL[:at] + ADDED.lstrip("\n") + "\n" + ORIGINAL[at:]

    result = nexus_sync("backends", "remove", "new", cwd=tmp_path)
    assert result.code == 0, result
    assert config.read_text() == ORIGINAL

    # Removing one takes its table and the comment right above it, nothing else.
    result = nexus_sync("backends", "remove", "laptop", cwd=tmp_path)
    assert result.code == 0, result
    start, end = ORIGINAL.index("# The laptop."), ORIGINAL.index("# The GPU box")
    assert config.read_text() == ORIGINAL[:start] + ORIGINAL[end:]
    result = nexus_sync("backends", "remove", "gpu", "--config", str(config))
    assert result.code == 0, result
    start, end = ORIGINAL.index("# The laptop."), ORIGINAL.index("# How requests")
    assert config.read_text() == ORIGINAL[:start] + ORIGINAL[end:]
    loaded = load_config(str(config), environ={})[0]
    assert loaded.backends == () and loaded.routing.aliases == {"gpt-4": "llama3:70b"}


def test_add_derives_a_unique_name_and_keeps_the_file_mode(tmp_path: Path) -> None:
    config = tmp_path / "nexus.toml"
    config.write_text('[[backends]]\nname = "127.0.0.1:9000"\nurl = "http://127.0.0.1:7"\n')
    config.chmod(0o640)
    result = nexus_sync("backends", "add", "http://127.0.0.1:9000", "--type", "vllm", cwd=tmp_path)
    assert result.code == 0, result
    names = [b.name for b in load_config(str(config), environ={})[0].backends]
    assert names == ["127.0.0.1:9000", "127.0.0.1:9000-2"]
    assert config.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["nexus.toml"]  # no temporary file left


EDIT_FAILURES: list[tuple[list[str], str]] = [
    (["add", "http://127.0.0.1:8001/", "--type", "vllm"], "backend 'gpu' has the URL"),
    (["add", "HTTP://127.0.0.1:8001", "--type", "vllm"], "backend 'gpu' has the URL"),
    (["add", "http://127.0.0.1:1", "--name", "gpu"], "there is a backend named 'gpu' already"),
    (["add", "ftp://127.0.0.1:1"], "'ftp://127.0.0.1:1' is not a backend URL"),
    (["add", "http://127.0.0.1:1?x=1"], "is not a backend URL"),
    (["add", "http://127.0.0.1:1", "--name", "", "--type", "openai"], "backends[2].name"),
    (["add", "http://127.0.0.1:1", "--type", "cloud"], "'cloud' is not one of"),
    (["add", "http://127.0.0.1:1", "--priority", "high"], "'high' is not a valid integer"),
    (["remove", "nobody"], "no backend named 'nobody' (backends: laptop, gpu)"),
    (["remove"], "Missing argument 'NAME'"),
]


@pytest.mark.parametrize(("args", "message"), EDIT_FAILURES)
def test_a_refused_edit_changes_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    args: list[str], message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nexus.toml").write_text(ORIGINAL)
    assert_failed(in_process(capsys, "backends", *args), message)
    assert (tmp_path / "nexus.toml").read_text() == ORIGINAL


def test_edits_refused_for_a_missing_a_bad_or_an_odd_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    add = ["backends", "add", "http://127.0.0.1:1", "--type", "openai"]
    assert_failed(in_process(capsys, *add), "nexus.toml: no such file (nexus config init")
    assert_failed(in_process(capsys, "backends", "remove", "a"), "nexus.toml: no such file")
    files = {
        'strategy = "x"\n[routing]\nstrategy = "fastest"\n': "routing.strategy",
        "[server\n": "nexus.toml: invalid TOML",
        # [[backends]] split around another table: tomlkit would move the second one.
        '[[backends]]\nname = "a"\nurl = "http://a:1"\n[routing]\nstrategy = "smart"\n'
        '[[backends]]\nname = "b"\nurl = "http://b:1"\n': "edit it by hand",
        'backends = [{name = "a", url = "http://a:1"}]\n': "is not written as [[backends]]",
    }
    for text, message in files.items():
        (tmp_path / "nexus.toml").write_text(text)
        assert_failed(in_process(capsys, *add), message)
        assert (tmp_path / "nexus.toml").read_text() == text
    (tmp_path / "nexus.toml").write_text(text)
    assert_failed(in_process(capsys, "backends", "remove", "a"), "is not written as")


# ---- config init and check


def test_config_init_writes_every_default_and_never_overwrites_unasked(tmp_path: Path) -> None:
    result = nexus_sync("config", "init", cwd=tmp_path)
    assert (result.code, result.err) == (0, ""), result
    written = tmp_path / "nexus.toml"
    assert written.read_text() == render_toml()
    assert load_config(str(written), environ={}) == (Config(), [])
    # Every setting is there, with a comment.
    assert "max_body_bytes = 10485760" in written.read_text()
    assert written.read_text().count("\n# ") > 20

    written.write_text("# mine\n")
    assert_failed(
        nexus_sync("config", "init", cwd=tmp_path), "nexus.toml exists already (--force"
    )
    assert written.read_text() == "# mine\n"
    result = nexus_sync("config", "init", "--force", "-o", str(written))
    assert result.code == 0 and written.read_text() == render_toml()

    result = nexus_sync("config", "init", "-o", "-", cwd=tmp_path)
    assert result.code == 0 and result.out == render_toml()
    result = nexus_sync("config", "init", "-o", str(tmp_path / "no" / "such" / "dir.toml"))
    assert_failed(result, "cannot write in")


def test_config_init_output_can_be_edited(tmp_path: Path) -> None:
    """The generated file ends with a commented-out example; an added backend goes after it."""
    assert nexus_sync("config", "init", cwd=tmp_path).code == 0
    add = nexus_sync(
        "backends", "add", "http://127.0.0.1:1", "--type", "openai", "--name", "a", cwd=tmp_path
    )
    assert add.code == 0, add
    text = (tmp_path / "nexus.toml").read_text()
    assert text == render_toml() + '\n[[backends]]\nname = "a"\nurl = "http://127.0.0.1:1"\n' \
        'type = "openai"\n'
    assert nexus_sync("backends", "remove", "a", cwd=tmp_path).code == 0
    assert (tmp_path / "nexus.toml").read_text() == render_toml()


BAD_FILES = [
    "[server\nlisten = 1",
    "[routing]\nstrategy = 'fastest'",
    "[routing.weights]\npriority = 50\nload = 50\nlatency = 50",
    "[[backends]]\nname='a'\nurl='http://127.0.0.1:1'\n"
    "[[backends]]\nname='a'\nurl='http://127.0.0.1:2'",
    "[routing.aliases]\na = 'b'\nb = 'a'",
    "[[backends]]\nname='a'\nurl='ftp://x'",
    "[server]\nlisten = 'nonsense:8000'",
]


def test_config_check_prints_what_the_gateway_would(tmp_path: Path) -> None:
    """The same line as ``twistd nexus`` with this file, after ``Error: `` instead of
    ``nexus: `` (one gateway process per file, so a handful of files)."""
    for i, text in enumerate(BAD_FILES):
        path = tmp_path / f"bad{i}.toml"
        path.write_text(text)
        gateway = subprocess.run(
            [*TWISTD, "--pidfile=", "-n", "nexus", "--config", str(path)],
            cwd=tmp_path, env=twistd_env(), capture_output=True, timeout=60,
        )
        said = gateway.stderr.decode().strip()
        assert said.startswith("nexus: ") and "\n" not in said, said
        result = nexus_sync("config", "check", str(path), cwd=tmp_path)
        assert_failed(result, "")
        assert result.err == f"Error: {said.removeprefix('nexus: ')}\n"


def test_config_check_passes_a_good_file_and_shows_its_warnings(tmp_path: Path) -> None:
    (tmp_path / "nexus.toml").write_text(
        '[server]\nlisten = "tcp:8000"\ncolour = "blue"\n'
        '[[backends]]\nname = "a"\nurl = "http://127.0.0.1:1"\n'
    )
    result = nexus_sync("config", "check", cwd=tmp_path)
    assert result.code == 0, result
    assert result.out == "nexus.toml: OK (1 backend, listen tcp:8000)\n"
    warnings = result.err.splitlines()
    assert len(warnings) == 2 and all(w.startswith("warning: ") for w in warnings)
    assert "server.colour" in warnings[0] and "api_keys" in warnings[1]
    # NEXUS_* variables count, as they do for the gateway.
    result = nexus_sync("config", "check", cwd=tmp_path, NEXUS_ROUTING_STRATEGY="fastest")
    assert_failed(result, "NEXUS_ROUTING_STRATEGY")
    assert_failed(nexus_sync("config", "check", "missing.toml", cwd=tmp_path),
                  "configuration error: missing.toml: no such file")


def test_unexpected_errors_are_one_line_too(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr("nexus.cli._commands.render_toml", boom)
    assert_failed(in_process(capsys, "config", "init", "-o", "-"),
                  "unexpected RuntimeError: something broke")


def test_the_docs_show_every_command() -> None:
    docs = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    for path in COMMANDS:
        if path:
            assert re.search(rf"^\$ nexus {' '.join(path)}\b", docs, re.M), path
