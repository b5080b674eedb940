"""TLS support is loaded only when the configuration needs it (idle memory: nexus.tls)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nexus.tls import needs_tls
from tests.support import ROOT

# What twistd does: parse the plugin's options, then import the reactor and the gateway.
SCRIPT = """
import json, sys
from nexus.tap import Options
Options().parseOptions(sys.argv[1:])
from twisted.internet import reactor
import nexus.service, treq
from nexus.tls import tls_loaded
print(json.dumps({"tls": tls_loaded(), "openssl": "OpenSSL" in sys.modules}))
"""


def loaded(tmp_path: Path, config: str, *args: str) -> dict[str, bool]:
    path = tmp_path / "nexus.toml"
    path.write_text(config)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, "--config", str(path), *args],
        cwd=ROOT, capture_output=True, timeout=60, check=True,
    )
    return dict(json.loads(result.stdout))


HTTP = '[[backends]]\nname = "a"\nurl = "http://127.0.0.1:9"\n'
HTTPS = '[[backends]]\nname = "b"\nurl = "https://127.0.0.1:9"\n'


@pytest.mark.parametrize(
    ("config", "args", "tls"),
    [
        (HTTP, (), False),
        ("", (), False),  # the demo
        (HTTP + HTTPS, (), True),
        (HTTP, ("--listen", "ssl:8443:privateKey=k.pem"), True),
    ],
)
def test_tls_is_loaded_only_when_needed(
    tmp_path: Path, config: str, args: tuple[str, ...], tls: bool
) -> None:
    assert loaded(tmp_path, config, *args) == {"tls": tls, "openssl": tls}


def test_needs_tls() -> None:
    assert not needs_tls("tcp:8000:interface=127.0.0.1", ["http://a:1", "http://b:2"])
    assert needs_tls("tcp:8000", ["http://a:1", "https://b"])
    assert needs_tls("ssl:8443:privateKey=k.pem", [])
