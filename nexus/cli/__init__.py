"""The ``nexus`` command (contract section 11): run, ask, configure and reload a gateway.

::

    nexus serve [--pidfile FILE] [GATEWAY OPTIONS]   twistd -n nexus, in the foreground
    nexus backends list [--status S] [--json]        a running gateway's fleet (GET /health)
    nexus backends add URL [--name N] [--type T] [--priority P] [--config F]
    nexus backends remove NAME [--config F]          edit the file, comments and layout kept
    nexus models [--backend ID] [--json]             what it serves now (GET /v1/models)
    nexus health [--json]                            exit 0 healthy/degraded, 2 unhealthy
    nexus config init [-o FILE] [--force]            every setting at its default
    nexus config check [FILE]                        the gateway's own check and message
    nexus reload [--pidfile FILE]                    SIGHUP: re-read the configuration
    nexus completion bash|zsh|fish                   shell completion script

Every failure prints one line, ``Error: ...``, on standard error and exits 1.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from nexus.cli._commands import cli
from nexus.cli._errors import CommandError

__all__ = ["CommandError", "cli", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``nexus`` with ``argv`` (default: the process's arguments); exits the process."""
    code = run(argv)
    sys.exit(code)


def run(argv: Sequence[str] | None = None) -> int:
    """Run ``nexus`` with ``argv``; returns the exit status. Failures are one line on stderr."""
    try:
        result = cli.main(
            args=list(argv) if argv is not None else None, prog_name="nexus",
            standalone_mode=False,
        )
    except CommandError as e:
        return _fail(str(e))
    except click.UsageError as e:
        where = f" ({e.ctx.command_path} --help)" if e.ctx is not None else ""
        return _fail(f"{e.format_message().rstrip('.')}{where}")
    except click.ClickException as e:
        return _fail(e.format_message())
    except (click.Abort, KeyboardInterrupt):
        return _fail("interrupted")
    except BrokenPipeError:
        _quiet_stdout()
        return 1
    except Exception as e:  # one line, never a traceback (contract 11)
        return _fail(f"unexpected {type(e).__name__}: {e}")
    return result if isinstance(result, int) else 0


def _fail(message: str) -> int:
    click.echo(f"Error: {' '.join(message.split())}", err=True)
    return 1


def _quiet_stdout() -> None:
    """stdout was closed early (``nexus models | head``): leave quietly, as other tools do."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
