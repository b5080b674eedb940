"""API keys from every source together, and ``api_keys_file`` errors as one line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from nexus.access import AccessPolicy
from nexus.config import ConfigError, ServerConfig, load_config, parse_config


def write(tmp_path: Path, name: str, text: str | bytes) -> str:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def test_keys_from_file_keys_file_and_environment_all_count(tmp_path: Path) -> None:
    keys_file = write(tmp_path, "keys", "# team\nsk-file-1\n\n  sk-file-2  \n")
    config_file = write(
        tmp_path,
        "nexus.toml",
        f'[server]\napi_keys = ["sk-toml"]\napi_keys_file = "{keys_file}"\n',
    )
    config, warnings = load_config(config_file, {"NEXUS_SERVER_API_KEYS": "sk-env-1, sk-env-2"})
    assert warnings == []
    assert config.server.api_keys == ("sk-toml", "sk-env-1", "sk-env-2")  # env adds to the file
    policy = AccessPolicy.from_config(config.server)
    for key in ("sk-toml", "sk-file-1", "sk-file-2", "sk-env-1", "sk-env-2"):
        assert policy.allows_api([f"Bearer {key}".encode()]), key
    assert not policy.allows_api([b"Bearer sk-other"])
    assert not policy.allows_api(None)


def test_environment_keys_alone() -> None:
    config, _ = parse_config({}, "nexus.toml", {"NEXUS_SERVER_API_KEYS": "sk-1,,sk-2"})
    assert config.server.api_keys == ("sk-1", "sk-2")


def test_a_bad_file_key_is_still_the_file_s_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(
            {"server": {"api_keys": ["ok", ""]}}, "nexus.toml", {"NEXUS_SERVER_API_KEYS": "x"}
        )
    assert str(info.value) == "nexus.toml: server.api_keys[1]: must not be empty"
    with pytest.raises(ConfigError) as info:
        parse_config({"server": {"api_keys": "sk"}}, "nexus.toml", {"NEXUS_SERVER_API_KEYS": "x"})
    assert str(info.value) == (
        "nexus.toml: server.api_keys: expected an array of strings, got string 'sk'"
    )


#: (what the keys file is, given a directory to make it in; the message after its path)
BAD_KEYS_FILES: list[tuple[str, Callable[[Path], str], str]] = [
    ("missing", lambda d: str(d / "missing"), "cannot read {path!r}: No such file or directory"),
    ("a directory", lambda d: str(d), "cannot read {path!r}: Is a directory"),
    (
        "empty",
        lambda d: write(d, "keys", ""),
        "{path!r} has no key (one per line; '#' starts a comment)",
    ),
    (
        "comments only",
        lambda d: write(d, "keys", "# no keys yet\n\n   \n"),
        "{path!r} has no key (one per line; '#' starts a comment)",
    ),
    (
        "not UTF-8",
        lambda d: write(d, "keys", b"sk-\xff\n"),
        "cannot read {path!r}: not UTF-8 text (byte 3)",
    ),
]


@pytest.mark.parametrize(
    ("what", "make", "message"), BAD_KEYS_FILES, ids=[w for w, _, _ in BAD_KEYS_FILES]
)
def test_bad_keys_file_names_config_file_and_key(
    tmp_path: Path, what: str, make: Callable[[Path], str], message: str
) -> None:
    keys = make(tmp_path)
    expected = message.format(path=keys)
    config_file = write(tmp_path, "nexus.toml", f'[server]\napi_keys_file = "{keys}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(config_file, {})
    assert str(info.value) == f"{config_file}: server.api_keys_file: {expected}"
    with pytest.raises(ConfigError) as info:
        load_config(None, {"NEXUS_SERVER_API_KEYS_FILE": keys})
    assert str(info.value) == f"environment: NEXUS_SERVER_API_KEYS_FILE: {expected}"
    # A configuration built in code is checked when the policy is made (build_gateway).
    with pytest.raises(ConfigError) as info:
        AccessPolicy.from_config(ServerConfig(api_keys_file=keys))
    assert str(info.value) == f"server.api_keys_file: {expected}"
    assert "\n" not in str(info.value) and info.value.__cause__ is None
