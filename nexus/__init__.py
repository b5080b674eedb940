"""Nexus: one OpenAI-compatible endpoint in front of a fleet of inference servers."""

__version__ = "0.1.0"
