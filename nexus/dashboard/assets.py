"""The dashboard's static files (``/assets/...``), shipped in the package and kept in memory.

The page links each file with ``?v=<its hash>``: a request carrying the current hash
may be cached for a year (``immutable``, the next version has another URL); any other
is revalidated (``no-cache``) with its ``ETag``, answered 304 when unchanged.
"""

from __future__ import annotations

import hashlib
from importlib import resources

import attrs

#: Content types by file extension.
CONTENT_TYPES = {
    ".css": b"text/css; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".svg": b"image/svg+xml",
}
#: Cache-Control of a request for the current version of a file.
CACHE_VERSIONED = b"public, max-age=31536000, immutable"
#: Cache-Control of any other request: keep, but ask every time (ETag).
CACHE_REVALIDATE = b"no-cache"


@attrs.frozen
class Asset:
    """One static file: its bytes, content type and version (a hash of the bytes)."""

    name: str
    body: bytes
    content_type: bytes
    version: str

    @property
    def etag(self) -> bytes:
        """The strong entity tag of this version."""
        return b'"%b"' % self.version.encode("ascii")

    @property
    def url(self) -> str:
        """Where the page links it: the path with its version."""
        return f"/assets/{self.name}?v={self.version}"


def load_assets() -> dict[str, Asset]:
    """Every file of ``nexus/dashboard/assets/`` with a known content type, by name."""
    assets = {}
    for entry in resources.files("nexus.dashboard").joinpath("assets").iterdir():
        name = entry.name
        suffix = name[name.rfind(".") :] if "." in name else ""
        content_type = CONTENT_TYPES.get(suffix)
        if content_type is None or not entry.is_file():
            continue
        body = entry.read_bytes()
        version = hashlib.sha256(body).hexdigest()[:16]
        assets[name] = Asset(name, body, content_type, version)
    return assets


def matches(if_none_match: bytes | None, etag: bytes) -> bool:
    """Whether an ``If-None-Match`` header names ``etag`` (or is ``*``)."""
    if not if_none_match:
        return False
    for tag in if_none_match.split(b","):
        tag = tag.strip()
        if tag.startswith(b"W/"):
            tag = tag[2:]
        if tag == b"*" or tag == etag:
            return True
    return False
