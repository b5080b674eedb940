"""A fake inference server for tests, benchmarks and the gateway's demo mode.

OpenAI-compatible chat completions, legacy completions and embeddings plus Ollama / llama.cpp /
vLLM discovery, over real HTTP, with knobs (``MockSettings``) to make it slow, failing, broken in
specific ways or lacking an endpoint. Knobs change at runtime,
in process (``MockBackend.configure``) or over HTTP (``POST /_mock/config``).

In process::

    backend = listen_mock(reactor, MockSettings(models=["m1"]))   # port 0 on 127.0.0.1
    backend.url                                                   # "http://127.0.0.1:<port>"
    await backend.stop()

As a process: ``twistd -n nexus-mock --port 9001 --models m1,m2 --type ollama``.

Modules: ``settings`` (the knobs), ``bodies`` (what it answers), ``server`` (the HTTP side and
``MockBackend``), ``plugin`` (``twistd nexus-mock``).
"""

from __future__ import annotations

from nexus.testing.bodies import answer_text, embedding_vector, stream_pieces
from nexus.testing.plugin import MockService, Options, makeService
from nexus.testing.server import MockBackend, listen_mock
from nexus.testing.settings import (
    BACKEND_TYPES,
    ENDPOINTS,
    FAIL_MODES,
    HUGE_LENGTH,
    MISSING_ENDPOINT_STATUSES,
    SETTING_NAMES,
    STREAM_FRAMINGS,
    MockSettings,
)

__all__ = [
    "BACKEND_TYPES",
    "ENDPOINTS",
    "FAIL_MODES",
    "HUGE_LENGTH",
    "MISSING_ENDPOINT_STATUSES",
    "SETTING_NAMES",
    "STREAM_FRAMINGS",
    "MockBackend",
    "MockService",
    "MockSettings",
    "Options",
    "answer_text",
    "embedding_vector",
    "listen_mock",
    "makeService",
    "stream_pieces",
]
