"""``python -m nexus.config [FILE]``: rewrite FILE's generated settings tables (default
docs/configuration.md) from the value classes; ``--toml`` prints a commented nexus.toml."""

from __future__ import annotations

import argparse
import sys

from nexus.config.reference import render_toml, update_docs


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m nexus.config", description=__doc__)
    parser.add_argument("file", nargs="?", default="docs/configuration.md")
    parser.add_argument("--toml", action="store_true", help="print a commented nexus.toml")
    args = parser.parse_args(argv)
    if args.toml:
        sys.stdout.write(render_toml())
        return 0
    with open(args.file, encoding="utf-8") as f:
        text = f.read()
    updated = update_docs(text)
    if updated != text:
        with open(args.file, "w", encoding="utf-8") as f:
            f.write(updated)
        print(f"{args.file}: settings regenerated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
