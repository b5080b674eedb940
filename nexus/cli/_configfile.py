"""The configuration file as the commands see it: read, check, edit, write in one piece."""

from __future__ import annotations

import contextlib
import os
import tempfile
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

from nexus.cli._errors import CommandError
from nexus.cli._toml import EditError, append_backend, backend_tables, remove_backend
from nexus.config import Config, ConfigError, load_config, parse_config

#: The file ``--config`` names when it is not given (``nexus config init`` writes it).
DEFAULT_PATH = "nexus.toml"


def read(path: str) -> str:
    """The text of the configuration file at ``path``."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except FileNotFoundError:
        raise CommandError(
            f"{path}: no such file (nexus config init writes one; --config names another)"
        ) from None
    except UnicodeDecodeError as e:
        raise CommandError(f"{path}: invalid TOML: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise CommandError(f"{path}: cannot read the file: {e.strerror or e}") from None


def check_text(text: str, path: str) -> Config:
    """The configuration in ``text`` (the file ``path``, NEXUS_* variables not applied).

    Raises CommandError with the loader's one-line message, as the gateway would print it.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise CommandError(f"{path}: invalid TOML: {' '.join(str(e).split())}") from None
    try:
        config, _ = parse_config(data, path, environ={})
    except ConfigError as e:
        raise CommandError(str(e)) from None
    return config


def check_file(path: str) -> tuple[Config, list[str]]:
    """``load_config`` as the gateway calls it (NEXUS_* variables applied): the
    configuration and its warnings, or CommandError with the gateway's one-line message."""
    try:
        return load_config(path)
    except ConfigError as e:
        raise CommandError(f"configuration error: {e}") from None


def same_url(a: str, b: str) -> bool:
    """Whether two backend URLs name the same server (scheme and host case, a final ``/``)."""

    def key(url: str) -> tuple[str, str, str]:
        parts = urlsplit(url.strip())
        return parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/")

    return key(a) == key(b)


def derived_name(url: str, taken: set[str]) -> str:
    """A backend name from ``url``'s ``host:port``, made unique among ``taken``."""
    parts = urlsplit(url)
    host = parts.hostname or "backend"
    if ":" in host:
        host = f"[{host}]"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    base = f"{host}:{port}"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


def backend_names(text: str) -> list[str]:
    """The names of the ``[[backends]]`` tables in ``text`` (for completion and messages)."""
    try:
        return [str(t.get("name")) for t in backend_tables(text) if isinstance(t, dict)]
    except tomllib.TOMLDecodeError:
        return []


def with_backend(text: str, path: str, fields: dict[str, object]) -> str:
    """``text`` with one more ``[[backends]]`` table; checked as the gateway would load it."""
    try:
        new = append_backend(text, fields)
    except EditError as e:
        raise CommandError(f"{path}: {e}") from None
    check_text(new, path)
    return new


def without_backend(text: str, path: str, name: str) -> str:
    """``text`` without the backend ``name``; checked as the gateway would load it."""
    names = backend_names(text)
    if name not in names:
        listed = ", ".join(names) if names else "none"
        raise CommandError(f"{path}: no backend named {name!r} (backends: {listed})")
    try:
        new = remove_backend(text, names.index(name))
    except EditError as e:
        raise CommandError(f"{path}: {e}") from None
    check_text(new, path)
    return new


def write(path: str, text: str) -> None:
    """Replace the file at ``path`` by ``text`` in one step (a reader sees the old file or
    the new one, never half of one), keeping the file's permissions."""
    target = Path(os.path.realpath(path))
    try:
        mode = target.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    except OSError as e:
        raise CommandError(f"{path}: {e.strerror or e}") from None
    try:
        fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    except OSError as e:
        raise CommandError(f"{path}: cannot write in {target.parent}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise CommandError(f"{path}: cannot write the file: {e.strerror or e}") from None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_listen(listen: str) -> None:
    """Check ``server.listen`` as the gateway does at start-up (same message)."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    from nexus.service import with_backlog

    try:
        serverFromString(reactor, with_backlog(listen))
    except (ValueError, KeyError, TypeError) as e:
        raise CommandError(f"bad listen description {listen!r}: {e}") from None
