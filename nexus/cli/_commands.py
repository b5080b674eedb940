"""The commands of ``nexus`` (contract section 11), on click."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import click
from click.shell_completion import CompletionItem

from nexus import __version__
from nexus.cli import _configfile, _serve
from nexus.cli._configfile import DEFAULT_PATH
from nexus.cli._detect import PROBE_SECONDS, detect_type
from nexus.cli._errors import CommandError
from nexus.cli._gateway import DEFAULT_URL, Gateway
from nexus.cli._tables import duration, fleet_table, models_table
from nexus.config import BACKEND_TYPES, listen_warnings, render_toml

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
STATUSES = ("healthy", "unhealthy", "unknown")
#: ``nexus health`` exits with this when the gateway reports itself unhealthy.
UNHEALTHY_EXIT = 2


def _version() -> str:
    import twisted

    return f"nexus {__version__} (Twisted {twisted.__version__})"


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(_version())
        ctx.exit(0)


def _show_help_without_command(ctx: click.Context) -> None:
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@click.group(context_settings=CONTEXT, invoke_without_command=True)
@click.option(
    "--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
    help="Print the version of Nexus and exit.",
)
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Nexus: one OpenAI-compatible endpoint in front of a fleet of inference servers.

    Run the gateway (serve), ask a running one (backends list, models, health), edit its
    configuration file (backends add|remove, config init|check) and make it re-read that
    file (reload). Every failure prints one line, "Error: ...", and exits 1.
    """
    _show_help_without_command(ctx)


def _json(value: object) -> None:
    click.echo(json.dumps(value, indent=2))


# ---- asking a running gateway


def gateway_options(f: F) -> F:
    """``--url``, ``--api-key``, ``--timeout`` and ``--json``: how to ask a running gateway."""
    f = click.option(
        "--json", "as_json", is_flag=True, help="Print JSON (the gateway's own objects)."
    )(f)
    f = click.option(
        "--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0,
        show_default=True, metavar="SECONDS", help="How long to wait for the gateway.",
    )(f)
    f = click.option(
        "--api-key", envvar="NEXUS_API_KEY", show_envvar=True, metavar="KEY",
        help="Key to send as 'Authorization: Bearer KEY' (when the gateway has api_keys).",
    )(f)
    f = click.option(
        "--url", envvar="NEXUS_URL", show_envvar=True, default=DEFAULT_URL, show_default=True,
        help="Base URL of the gateway.",
    )(f)
    return f


@cli.group(context_settings=CONTEXT, invoke_without_command=True)
@click.pass_context
def backends(ctx: click.Context) -> None:
    """The backends: those of a running gateway (list), those of its file (add, remove)."""
    _show_help_without_command(ctx)


@backends.command("list", context_settings=CONTEXT)
@click.option("--status", type=click.Choice(STATUSES), help="Only backends with this status.")
@gateway_options
def backends_list(
    status: str | None, url: str, api_key: str | None, timeout: float, as_json: bool
) -> None:
    """Every backend of a running gateway: status, models, latency, last check and error.

    Asks GET /health; --json prints its "fleet" list.
    """
    fleet = Gateway(url, api_key, timeout).fleet()
    if status:
        fleet = [b for b in fleet if b.get("status") == status]
    if as_json:
        _json(fleet)
    elif fleet:
        click.echo(fleet_table(fleet), nl=False)
    else:
        click.echo(f"no backends with status {status}" if status else "no backends")


@cli.command(context_settings=CONTEXT)
@click.option("--backend", "backend_id", metavar="ID", help="Only models this backend serves.")
@gateway_options
def models(
    backend_id: str | None, url: str, api_key: str | None, timeout: float, as_json: bool
) -> None:
    """The models a running gateway can serve now, with their backends; aliases too.

    Asks GET /v1/models; --json prints its "data" list.
    """
    data = Gateway(url, api_key, timeout).models()
    if backend_id:
        data = [m for m in data if backend_id in (m.get("backends") or [])]
    if as_json:
        _json(data)
    elif data:
        click.echo(models_table(data), nl=False)
    else:
        click.echo(f"no models on backend {backend_id!r}" if backend_id else "no models")


@cli.command(context_settings=CONTEXT)
@gateway_options
def health(url: str, api_key: str | None, timeout: float, as_json: bool) -> int:
    """The health of a running gateway and of each backend.

    Asks GET /health; --json prints its answer. Exits 0 when the gateway reports healthy
    or degraded, 2 when it reports unhealthy.
    """
    answer = Gateway(url, api_key, timeout).health()
    status = answer.get("status")
    if as_json:
        _json(answer)
    else:
        counts = answer.get("backends") or {}
        click.echo(
            f"{status}: {counts.get('healthy', 0)} of {counts.get('total', 0)} backends "
            f"healthy ({counts.get('unhealthy', 0)} unhealthy, {counts.get('unknown', 0)} "
            f"unknown), {answer.get('models', 0)} models servable"
        )
        about = f"gateway {url}"
        if answer.get("version"):
            about += f", version {answer['version']}"
        if isinstance(answer.get("uptime_seconds"), int):
            about += f", up {duration(answer['uptime_seconds'])}"
        click.echo(about)
        if answer["fleet"]:
            click.echo()
            click.echo(fleet_table(answer["fleet"]), nl=False)
    return UNHEALTHY_EXIT if status == "unhealthy" else 0


# ---- editing the configuration file


def config_option(f: F) -> F:
    """``--config FILE``: the file to edit."""
    return click.option(
        "-c", "--config", "config_path", default=DEFAULT_PATH, show_default=True,
        metavar="FILE", help="The configuration file to edit.",
    )(f)


@backends.command("add", context_settings=CONTEXT)
@click.argument("url")
@click.option("--name", help="Its name (unique; the backend id). Default: HOST:PORT of URL.")
@click.option(
    "--type", "kind", type=click.Choice(BACKEND_TYPES),
    help="Its type. Default: detected by asking the server (above).",
)
@click.option("--priority", type=int, help="Its priority (lower is preferred; default 50).")
@config_option
def backends_add(
    url: str, name: str | None, kind: str | None, priority: int | None, config_path: str
) -> None:
    """Add the backend at URL to the configuration file.

    Without --type, the server is asked, each probe within 2 s: GET /api/tags answering a
    model list means ollama; GET /health answering {"status": "ok"} means llamacpp;
    GET /v1/models answering a model list (or 401) means openai; anything else generic.

    The new [[backends]] table goes after the last one; every comment and the layout of
    the rest of the file are kept. A name or URL already in the file is refused. The file
    is checked as the gateway would load it, then replaced in one step. A running gateway
    takes it on `nexus reload` (SIGHUP).
    """
    url = _backend_url(url)
    text = _configfile.read(config_path)
    current = _configfile.check_text(text, config_path)
    for backend in current.backends:
        if name is not None and backend.name == name:
            raise CommandError(f"{config_path}: there is a backend named {name!r} already")
        if _configfile.same_url(backend.url, url):
            raise CommandError(
                f"{config_path}: backend {backend.name!r} has the URL {backend.url} already"
            )
    if name is None:
        name = _configfile.derived_name(url, {b.name for b in current.backends})
    if kind is None:
        detection = detect_type(url, PROBE_SECONDS)
        kind = detection.type
        if detection.reachable:
            click.echo(f"detected type {kind}: {detection.reason}")
        else:
            click.echo(
                f"warning: nothing answered at {url} ({detection.reason}); added as generic "
                "(--type sets the type)",
                err=True,
            )
    fields: dict[str, object] = {"name": name, "url": url, "type": kind}
    if priority is not None:
        fields["priority"] = priority
    _configfile.write(config_path, _configfile.with_backend(text, config_path, fields))
    click.echo(
        f"added backend {name!r} ({kind}, {url}) to {config_path}; "
        "`nexus reload` applies it to a running gateway"
    )


def _backend_url(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or (
        parts.fragment
    ):
        raise CommandError(
            f"{url!r} is not a backend URL: http:// or https:// with a host, no ?query or "
            "#fragment"
        )
    return url.strip().rstrip("/")


def _complete_backend_names(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    path = ctx.params.get("config_path") or DEFAULT_PATH
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    names = _configfile.backend_names(text)
    return [CompletionItem(n) for n in names if n.startswith(incomplete)]


@backends.command("remove", context_settings=CONTEXT)
@click.argument("name", shell_complete=_complete_backend_names)
@config_option
def backends_remove(name: str, config_path: str) -> None:
    """Remove the backend NAME from the configuration file.

    Its [[backends]] table goes, with the comment lines right above it; every other
    comment and the layout of the rest of the file are kept. The file is checked as the
    gateway would load it, then replaced in one step. A running gateway drops the backend
    on `nexus reload` (SIGHUP).
    """
    text = _configfile.read(config_path)
    _configfile.check_text(text, config_path)
    _configfile.write(config_path, _configfile.without_backend(text, config_path, name))
    click.echo(
        f"removed backend {name!r} from {config_path}; `nexus reload` applies it to a "
        "running gateway"
    )


@cli.group(context_settings=CONTEXT, invoke_without_command=True)
@click.pass_context
def config(ctx: click.Context) -> None:
    """The configuration file: write one with every setting (init), check one (check)."""
    _show_help_without_command(ctx)


@config.command("init", context_settings=CONTEXT)
@click.option(
    "-o", "--output", default=DEFAULT_PATH, show_default=True, metavar="FILE",
    help="Where to write it; - for standard output.",
)
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
def config_init(output: str, force: bool) -> None:
    """Write a configuration file with every setting at its default, each explained.

    The file is generated from the configuration classes, so it always lists every setting
    this version knows; backends are shown as a commented-out example.
    """
    text = render_toml()
    if output == "-":
        click.echo(text, nl=False)
        return
    if os.path.lexists(output) and not force:
        raise CommandError(f"{output} exists already (--force overwrites it)")
    _configfile.write(output, text)
    click.echo(f"wrote {output}: every setting at its default")


@config.command("check", context_settings=CONTEXT)
@click.argument("file", default=DEFAULT_PATH, metavar="[FILE]")
def config_check(file: str) -> None:
    """Check a configuration file as the gateway would at start-up (default nexus.toml).

    NEXUS_* environment variables are applied, as the gateway applies them. A bad file
    prints the one-line error the gateway would print and exits 1; warnings (an unknown
    key, a listener open to other hosts without api_keys) are printed and the file passes.
    """
    loaded, warnings = _configfile.check_file(file)
    _configfile.check_listen(loaded.server.listen)
    for warning in [*warnings, *listen_warnings(loaded.server)]:
        click.echo(f"warning: {warning}", err=True)
    n = len(loaded.backends)
    click.echo(
        f"{file}: OK ({n} backend{'' if n == 1 else 's'}, listen {loaded.server.listen})"
    )


# ---- running the gateway


class _ServeCommand(click.Command):
    """``serve``'s help also lists the gateway's own options, which it passes on."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Gateway options (those of twistd nexus)"):
            formatter.write_dl(_serve.gateway_options())
        super().format_epilog(ctx, formatter)


@cli.command(
    cls=_ServeCommand,
    context_settings={**CONTEXT, "ignore_unknown_options": True},
)
@click.option(
    "--pidfile", metavar="FILE",
    help="Write the process id to FILE (for nexus reload). Default: no pid file.",
)
@click.argument("gateway_args", nargs=-1, type=click.UNPROCESSED, metavar="[GATEWAY OPTIONS]")
def serve(pidfile: str | None, gateway_args: tuple[str, ...]) -> None:
    """Run the gateway in the foreground: the same as `twistd -n nexus [GATEWAY OPTIONS]`.

    It logs to standard output and stops on SIGTERM or Ctrl-C, letting requests in flight
    finish. Example: nexus serve --config nexus.toml --listen tcp:9000
    """
    _serve.serve(gateway_args, pidfile)


@cli.command(context_settings=CONTEXT)
@click.option(
    "--pidfile", default="twistd.pid", show_default=True, metavar="FILE",
    help="The gateway's pid file (twistd --pidfile, nexus serve --pidfile).",
)
def reload(pidfile: str) -> None:
    """Make a running gateway re-read its configuration file (sends it SIGHUP).

    The gateway applies the new file without a restart and logs what changed; a bad file
    changes nothing and is logged. Under systemd: systemctl reload nexus.
    """
    pid = _read_pid(pidfile)
    _check_is_gateway(pid, pidfile)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise CommandError(
            f"no process {pid} (from {pidfile}): the gateway is not running (a stale pid file?)"
        ) from None
    except PermissionError:
        raise CommandError(
            f"not allowed to signal process {pid} (from {pidfile}); run as the gateway's user"
        ) from None
    click.echo(f"sent SIGHUP to the gateway (pid {pid}, from {pidfile}); its log says what changed")


def _read_pid(pidfile: str) -> int:
    try:
        text = Path(pidfile).read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        raise CommandError(
            f"{pidfile}: no such file (is the gateway running? --pidfile names its pid file)"
        ) from None
    except OSError as e:
        raise CommandError(f"{pidfile}: cannot read the pid file: {e.strerror or e}") from None
    if not text.isdigit() or int(text) <= 1:
        shown = text if len(text) <= 20 else text[:20] + "..."
        raise CommandError(f"{pidfile}: not a process id: {shown!r}")
    return int(text)


def _check_is_gateway(pid: int, pidfile: str) -> None:
    """Refuse to signal a process that is not a gateway (a stale pid file, its pid reused):
    SIGHUP ends most programs. Where its command line cannot be read (no /proc, another
    user's process hidden), ``kill`` has the last word."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if not any(b"nexus" in arg.lower() for arg in argv):
        command = " ".join(a.decode("utf-8", "replace") for a in argv if a)[:60]
        raise CommandError(
            f"process {pid} (from {pidfile}) is not a Nexus gateway ({command!r}); "
            "a stale pid file?"
        )


# ---- shell completion


@cli.command(context_settings=CONTEXT)
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL.

    Load it with: eval "$(nexus completion bash)" (in ~/.bashrc; zsh and fish alike).
    """
    from click.shell_completion import get_completion_class

    complete = get_completion_class(shell)
    assert complete is not None
    click.echo(complete(cli, {}, "nexus", "_NEXUS_COMPLETE").source())

