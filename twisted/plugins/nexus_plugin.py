"""Registers ``twistd nexus``; the gateway itself is imported only when used."""

from twisted.application.service import ServiceMaker

nexus = ServiceMaker(
    "Nexus LLM gateway",
    "nexus.tap",
    "OpenAI-compatible gateway in front of a fleet of inference servers",
    "nexus",
)
