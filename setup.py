"""Packaging for Nexus, an OpenAI-compatible LLM gateway on Twisted."""

from setuptools import setup

setup(
    name="nexus-gateway",
    version="0.1.0",
    description="OpenAI-compatible LLM gateway: routing, health, streaming, Prometheus metrics",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=["nexus", "nexus.config", "nexus.metrics", "nexus.testing", "twisted.plugins"],
    package_data={"twisted.plugins": ["nexus_plugin.py", "nexus_mock_plugin.py"]},
    install_requires=[
        "twisted>=26.10",
        "klein==24.8.0",
        "treq>=26.7",
        "attrs>=25.1",
        "cattrs>=25.1",
        "prometheus-client>=0.26",
    ],
    extras_require={
        "test": [
            "pytest>=9",
            "pytest-twisted>=1.14",
            "hypothesis>=6.150",
            "openai>=2",
            "jsonschema>=4.20",
        ],
    },
    zip_safe=False,
)
