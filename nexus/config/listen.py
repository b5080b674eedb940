"""Whether the listen description lets other hosts in (contract section 2).

Twisted parses strports descriptions only with private functions, so the few rules needed
here are read from the description directly: ``kind:arg:key=value``, ``\\`` escaping.
"""

from __future__ import annotations

import ipaddress

from nexus.config.values import DEFAULT_LISTEN, ServerConfig

#: Endpoint kinds that only this machine can reach, whatever their arguments.
_LOCAL_KINDS = frozenset({"unix"})
#: Kinds with an ``interface`` (keyword, or for tcp the second positional argument).
_INTERFACE_KINDS = frozenset({"tcp", "tcp6", "ssl"})
_POSITIONAL_INTERFACE = frozenset({"tcp", "tcp6"})


def listen_warnings(server: ServerConfig) -> list[str]:
    """Warnings about ``server.listen``: reachable from other hosts while no API key is set.

    Call it with the listen description that will actually be used (after ``--listen``).
    """
    if server.api_keys or server.api_keys_file:
        return []
    reach = exposure(server.listen)
    if reach is None:
        return []
    return [
        f"listen {server.listen!r} accepts connections from {reach} and no API key is set: "
        "anyone who can reach it can use every backend (set server.api_keys or "
        f"server.api_keys_file, or listen on loopback only: {DEFAULT_LISTEN!r})"
    ]


def exposure(description: str) -> str | None:
    """Where other hosts can connect with ``description``, in words; None if they cannot.

    Loopback addresses (127.0.0.0/8, ::1, localhost) and unix sockets are this machine only.
    """
    kind, positional, keywords = _parse(description)
    if kind in _LOCAL_KINDS:
        return None
    if kind not in _INTERFACE_KINDS:
        return f"wherever a {kind!r} endpoint listens (not known to be loopback only)"
    interface = keywords.get("interface")
    if interface is None and kind in _POSITIONAL_INTERFACE and len(positional) > 1:
        interface = positional[1]
    if not interface or interface in ("0.0.0.0", "::"):
        return "every interface"
    if _is_loopback(interface):
        return None
    return f"interface {interface}"


def tcp_address(description: str) -> tuple[str, str, int, int]:
    """``(kind, interface, port, backlog)`` of a ``tcp:``/``tcp6:`` description.

    The interface is ``""`` (every IPv4 address) or ``"::"`` (tcp6) when not given, as
    Twisted reads it; ValueError for another kind or a port or backlog that is not a number.
    """
    kind, positional, keywords = _parse(description)
    if kind not in _POSITIONAL_INTERFACE:
        raise ValueError(f"not a tcp: or tcp6: description: {description!r}")
    names = ("port", "interface", "backlog")
    values = dict(zip(names, positional, strict=False)) | keywords
    try:
        port = int(values["port"])
        backlog = int(values.get("backlog", 50))
    except (KeyError, ValueError):
        raise ValueError(f"a {kind}: description needs a port number: {description!r}") from None
    interface = values.get("interface") or ("::" if kind == "tcp6" else "")
    return kind, interface, port, backlog


def _is_loopback(interface: str) -> bool:
    if interface.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(interface.split("%", 1)[0])
    except ValueError:
        return False  # a host name other than localhost: it may resolve to anything
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _parse(description: str) -> tuple[str, list[str], dict[str, str]]:
    """``kind:a:k=v`` -> ``("kind", ["a"], {"k": "v"})``; ``\\`` escapes ``:``, ``=`` and itself."""
    fields: list[tuple[str | None, str]] = []
    key: str | None = None
    current: list[str] = []
    escaped = False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "=" and key is None:
            key, current = "".join(current), []
        elif char == ":":
            fields.append((key, "".join(current)))
            key, current = None, []
        else:
            current.append(char)
    fields.append((key, "".join(current)))
    kind = (fields[0][1] if fields[0][0] is None else "").lower()
    positional = [value for name, value in fields[1:] if name is None]
    keywords = {name: value for name, value in fields[1:] if name is not None}
    return kind, positional, keywords
