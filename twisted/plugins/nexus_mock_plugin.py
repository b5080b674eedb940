"""twistd plugin: ``twistd -n nexus-mock --port 9001`` runs a fake inference backend.

Lazy on purpose: listing plugins (``twistd --help``) must not import the mock or Twisted Web.
"""

from __future__ import annotations

from twisted.application.service import ServiceMaker

nexus_mock = ServiceMaker(
    "nexus-mock",
    "nexus.testing.plugin",
    "A fake OpenAI / Ollama / llama.cpp inference server with failure knobs (Nexus testing).",
    "nexus-mock",
)
