"""Tests for nexus.config.listen: the warning about a gateway open to other hosts without keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from nexus.config import DEFAULT_LISTEN, ServerConfig, listen_warnings, load_config
from nexus.config.listen import exposure, tcp_address

#: (listen description, who else can connect; None: this machine only)
EXPOSURE: list[tuple[str, str | None]] = [
    ("tcp:8000:interface=127.0.0.1", None),
    ("tcp:port=8000:interface=127.0.0.1", None),
    ("tcp:8000:interface=127.1.2.3", None),
    ("tcp:8000:interface=localhost", None),
    ("tcp:8000:127.0.0.1", None),  # tcp's second positional argument is the interface
    (r"tcp6:8000:interface=\:\:1", None),
    (r"tcp6:8000:interface=\:\:ffff\:127.0.0.1", None),
    ("tcp:0:interface=127.0.0.1:backlog=1024", None),
    ("unix:/run/nexus.sock", None),
    ("unix:address=/run/nexus.sock:mode=660", None),
    ("ssl:8443:privateKey=key.pem:interface=127.0.0.1", None),
    ("tcp:8000", "every interface"),
    ("tcp:8000:backlog=50", "every interface"),
    ("tcp:8000:interface=", "every interface"),
    ("tcp:8000:interface=0.0.0.0", "every interface"),
    ("tcp6:8000", "every interface"),
    (r"tcp6:8000:interface=\:\:", "every interface"),
    ("ssl:8443:privateKey=key.pem", "every interface"),
    ("ssl:8443:key.pem", "every interface"),  # ssl's second positional is the key, not interface
    ("tcp:8000:interface=10.0.0.5", "interface 10.0.0.5"),
    ("tcp:8000:192.168.1.2", "interface 192.168.1.2"),
    (r"tcp6:8000:interface=fe80\:\:1", "interface fe80::1"),
    ("tcp:8000:interface=gateway.example", "interface gateway.example"),
    (
        "systemd:domain=INET:index=0",
        "wherever a 'systemd' endpoint listens (not known to be loopback only)",
    ),
]


@pytest.mark.parametrize(("description", "reach"), EXPOSURE, ids=[d for d, _ in EXPOSURE])
def test_exposure(description: str, reach: str | None) -> None:
    assert exposure(description) == reach


def test_default_listen_is_loopback_only() -> None:
    assert ServerConfig().listen == DEFAULT_LISTEN == "tcp:8000:interface=127.0.0.1"
    assert load_config(None, {})[0].server.listen == DEFAULT_LISTEN
    assert listen_warnings(ServerConfig()) == []


def test_listening_beyond_loopback_without_keys_is_warned() -> None:
    assert listen_warnings(ServerConfig(listen="tcp:8000:interface=0.0.0.0")) == [
        "listen 'tcp:8000:interface=0.0.0.0' accepts connections from every interface and no "
        "API key is set: anyone who can reach it can use every backend (set server.api_keys or "
        "server.api_keys_file, or listen on loopback only: 'tcp:8000:interface=127.0.0.1')"
    ]


@pytest.mark.parametrize(
    "server",
    [
        ServerConfig(listen="tcp:8000", api_keys=("sk-1",)),
        ServerConfig(listen="tcp:8000", api_keys_file="/etc/nexus/api-keys"),
        ServerConfig(listen="unix:/run/nexus.sock"),
    ],
)
def test_no_warning_with_keys_or_on_this_machine(server: ServerConfig) -> None:
    assert listen_warnings(server) == []


def test_keys_from_the_environment_count(tmp_path: Path) -> None:
    path = tmp_path / "nexus.toml"
    path.write_text('[server]\nlisten = "tcp:8000"\n')
    server = load_config(str(path), {})[0].server
    assert len(listen_warnings(server)) == 1
    server = load_config(str(path), {"NEXUS_SERVER_API_KEYS": "sk-1"})[0].server
    assert listen_warnings(server) == []


@pytest.mark.parametrize(
    ("description", "address"),
    [
        ("tcp:8000", ("tcp", "", 8000, 50)),
        ("tcp:8000:interface=127.0.0.1:backlog=1024", ("tcp", "127.0.0.1", 8000, 1024)),
        ("tcp:0:127.0.0.1", ("tcp", "127.0.0.1", 0, 50)),
        ("tcp6:8000:interface=\\:\\:1", ("tcp6", "::1", 8000, 50)),
        ("tcp6:8000", ("tcp6", "::", 8000, 50)),
    ],
)
def test_tcp_address(description: str, address: tuple[str, str, int, int]) -> None:
    assert tcp_address(description) == address


@pytest.mark.parametrize("description", ["unix:/tmp/s", "ssl:8443", "tcp:http", "tcp"])
def test_tcp_address_refuses_what_is_not_a_tcp_port(description: str) -> None:
    with pytest.raises(ValueError):
        tcp_address(description)
