"""Packaging for Nexus, an OpenAI-compatible LLM gateway on Twisted."""

from setuptools import setup

setup(
    name="nexus-gateway",
    version="0.1.0",
    description="OpenAI-compatible LLM gateway: routing, health, streaming, Prometheus metrics",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=[
        "nexus",
        "nexus.cli",
        "nexus.config",
        "nexus.dashboard",
        "nexus.metrics",
        "nexus.testing",
        "nexus.workers",
        "twisted.plugins",
    ],
    package_data={
        "twisted.plugins": ["nexus_plugin.py", "nexus_mock_plugin.py"],
        # The dashboard's page files: served from the package, nothing fetched at run time.
        "nexus.dashboard": ["assets/*.css", "assets/*.js", "assets/*.svg"],
    },
    install_requires=[
        "twisted>=26.10",
        "klein==24.8.0",
        "treq>=26.7",
        "attrs>=25.1",
        "cattrs>=25.1",
        "prometheus-client>=0.26",
        # Discovery of backends by mDNS / DNS-SD (docs/discovery.md): the maintained pure-Python
        # implementation, with wheels; it needs no system daemon (avahi, Bonjour).
        "zeroconf>=0.154",
        # The ``nexus`` command: its commands, help and shell completion.
        "click>=8.2",
        # ``nexus backends add|remove`` edit nexus.toml keeping its comments and layout.
        "tomlkit>=0.13",
    ],
    extras_require={
        "test": [
            "pytest>=9",
            "pytest-twisted>=1.14",
            "hypothesis>=6.150",
            "openai>=2",
            "jsonschema>=4.20",
            # The dashboard's browser tests drive Debian's chromium (never a downloaded one).
            "selenium>=4.30",
        ],
    },
    entry_points={"console_scripts": ["nexus = nexus.cli:main"]},
    zip_safe=False,
)
