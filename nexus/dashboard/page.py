"""The dashboard's HTML, rendered on the server: readable as it is, with JavaScript off.

Every value that comes from a backend or a client (backend ids, model names, request
ids, error messages) goes through :func:`e`, which escapes it for HTML text and
attribute values alike. The page's script (``assets/dashboard.js``) builds the same
markup from the live events, with ``textContent`` only. No inline script or style: the
Content-Security-Policy forbids both, and any request outside the gateway.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from typing import Any

#: The page's Content-Security-Policy: its own files and its own event stream, nothing else.
CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    b"connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)

#: What the page shows for nothing (an en dash).
DASH = "\u2013"

STATUS_TEXT = {"healthy": "healthy", "unhealthy": "unhealthy", "unknown": "unknown"}


def e(value: object) -> str:
    """``value`` as HTML text (quotes too, so it is safe in an attribute)."""
    return html.escape(str(value), quote=True)


# -- the same formats as dashboard.js --------------------------------------------------------


def fmt_int(n: int | None) -> str:
    """``1,234``; a dash for nothing."""
    return DASH if n is None else f"{n:,}"


def fmt_ms(ms: float | None) -> str:
    """A duration given in ms, in ms or s as it reads best."""
    if ms is None:
        return DASH
    if ms == 0:
        return "0"
    if ms < 1:
        return f"{ms:.2f} ms"
    if ms < 100:
        return f"{ms:.1f} ms"
    if ms < 1000:
        return f"{ms:.0f} ms"
    return f"{ms / 1000:.2f} s"


def fmt_percent(rate: float) -> str:
    """A share (0..1) in percent, one decimal."""
    return f"{rate * 100:.1f} %"


def fmt_uptime(seconds: int) -> str:
    """``3d 4h``, ``1h 02m``, ``5m 03s`` or ``42s``."""
    days, rest = divmod(max(0, int(seconds)), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def fmt_time(stamp: str | None) -> str:
    """An RFC 3339 UTC time as ``<time>`` showing ``HH:MM:SS`` (UTC; the script shows local)."""
    if not stamp:
        return "never"
    return f'<time datetime="{e(stamp)}">{e(stamp[11:19])}</time>'


# -- the parts -------------------------------------------------------------------------------


def _total(key: str, label: str, value: str, detail: str = "") -> str:
    small = f'<span class="detail" data-total-detail="{key}">{e(detail)}</span>' if detail else ""
    return (
        f'<div class="total"><span class="label">{label}</span>'
        f'<span class="value" data-total="{key}">{e(value)}</span>{small}</div>'
    )


def totals(snap: Mapping[str, Any]) -> str:
    """The row of totals: uptime, requests, error rate, tokens, backends, models."""
    requests = snap["requests"]
    tokens = snap["tokens"]
    fleet = snap["fleet"]
    return "".join([
        _total("uptime", "Uptime", fmt_uptime(snap["uptime_seconds"])),
        _total("requests", "Requests", fmt_int(requests["total"]),
               f"{fmt_int(requests['errors'])} errors"),
        _total("error_rate", "Error rate", fmt_percent(snap["error_rate"])),
        _total("tokens", "Tokens", fmt_int(tokens["total"]),
               f"{fmt_int(tokens['prompt'])} in · {fmt_int(tokens['completion'])} out"),
        _total("backends", "Backends healthy", f"{fmt_int(fleet['healthy'])} / "
               f"{fmt_int(fleet['total'])}"),
        _total("models", "Models", fmt_int(len(snap["matrix"]))),
    ])


def _field(name: str, label: str, value: str, wide: bool = False, raw: bool = False) -> str:
    cls = ' class="wide"' if wide else ""
    shown = value if raw else e(value)
    return f'<div{cls}><dt>{label}</dt><dd data-f="{name}">{shown}</dd></div>'


def card(backend: Mapping[str, Any]) -> str:
    """One backend's card: status (colour and word) and every field of the fleet."""
    status = str(backend["status"])
    kind = status if status in STATUS_TEXT else "unknown"
    models = backend["models"]
    chips = "".join(f'<li>{e(m)}</li>' for m in models) if models else "<li>none</li>"
    parts = [
        f'<article class="card s-{kind}" data-backend="{e(backend["id"])}">',
        f'<header><h3>{e(backend["id"])}</h3>'
        f'<span class="badge s-{kind}"><span class="dot"></span>{e(status)}</span></header>',
        "<dl>",
        _field("type", "Type", str(backend["type"])),
        _field("source", "Source", str(backend["source"])),
        _field("pending", "Pending", fmt_int(backend["pending"])),
        _field("latency", "Avg latency",
               fmt_ms(backend["average_latency_ms"]) if backend["requests"] else DASH),
        _field("requests", "Requests", fmt_int(backend["requests"])),
        _field("errors", "Errors", fmt_int(backend["errors"])),
        _field("last_check", "Last check", fmt_time(backend["last_check"]), wide=True, raw=True),
        _field("models", f"Models ({len(models)})", f'<ul class="chips">{chips}</ul>',
               wide=True, raw=True),
    ]
    if backend["last_error"]:
        parts.append(
            '<div class="wide last-error"><dt>Last error</dt>'
            f'<dd data-f="last_error">{e(backend["last_error"])}</dd></div>'
        )
    parts.append("</dl></article>")
    return "".join(parts)


def matrix(snap: Mapping[str, Any]) -> str:
    """The model x backend table: which backend lists which model, with capabilities."""
    backends = [b["id"] for b in snap["backends"]]
    rows = snap["matrix"]
    if not rows:
        return '<p class="empty">No backend lists a model yet.</p>'
    head = "".join(f'<th scope="col">{e(b)}</th>' for b in backends)
    body = []
    for row in rows:
        cells = []
        for backend in backends:
            cell = row["backends"].get(backend)
            if cell is None:
                cells.append('<td class="no"><span class="sr">not listed</span></td>')
                continue
            kind = cell["status"] if cell["status"] in STATUS_TEXT else "unknown"
            caps = cell["capabilities"]
            text = "✓" if caps is None else ", ".join(caps) or "✓ (none)"
            cells.append(
                f'<td class="yes s-{kind}" title="{e(backend)}: {e(cell["status"])}">'
                f'<span class="dot"></span>{e(text)}</td>'
            )
        body.append(f'<tr><th scope="row">{e(row["model"])}</th>{"".join(cells)}</tr>')
    table = (
        f'<div class="scroll"><table class="matrix"><thead><tr><th scope="col">Model</th>'
        f'{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'
    )
    aliases = snap["aliases"]
    if aliases:
        items = "".join(f"<li>{e(a)} → {e(t)}</li>" for a, t in aliases.items())
        table += f'<div class="aliases">Aliases <ul class="chips">{items}</ul></div>'
    return table


def request_rows(entries: Iterable[Mapping[str, Any]]) -> str:
    """One ``<tbody>`` per request (a second row holds an error's message)."""
    out = []
    for r in entries:
        failed = r["status"] != "success"
        tokens = DASH
        if r["tokens_prompt"] is not None or r["tokens_completion"] is not None:
            tokens = f"{fmt_int(r['tokens_prompt'] or 0)} / {fmt_int(r['tokens_completion'] or 0)}"
        route = e(r["model"] if r["model"] is not None else DASH)
        route += f' <span class="arrow">→</span> {e(r["backend"] or DASH)}'
        cls = "req error" if failed else "req"
        out.append(
            f'<tbody class="{cls}" data-request="{e(r["request_id"])}"><tr>'
            f'<td class="time">{fmt_time(r.get("finished_at"))}</td>'
            f'<td class="id"><code>{e(r["request_id"])}</code></td>'
            f'<td class="route">{route}</td>'
            f'<td class="status">{e(r["status_code"])}</td>'
            f'<td class="num">{e(fmt_ms(r["latency_ms"]))}</td>'
            f'<td class="num">{e(fmt_ms(r["ttft_ms"]))}</td>'
            f'<td class="num">{e(tokens)}</td></tr>'
        )
        if failed:
            message = f"{r['error_type'] or 'error'}: {r['error_message'] or ''}"
            out.append(f'<tr class="message"><td colspan="7">{e(message)}</td></tr>')
        out.append("</tbody>")
    return "".join(out)


def _head(title: str, assets: Mapping[str, str]) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="color-scheme" content="light dark">'
        f"<title>{e(title)}</title>"
        f'<link rel="icon" type="image/svg+xml" href="{e(assets["favicon.svg"])}">'
        f'<link rel="stylesheet" href="{e(assets["dashboard.css"])}">'
    )


def render_page(
    snap: Mapping[str, Any], requests: Iterable[Mapping[str, Any]], assets: Mapping[str, str]
) -> bytes:
    """The whole dashboard page for ``snap`` (``LiveView.snapshot``) and the last requests.

    ``assets`` maps each static file's name to its versioned URL.
    """
    cards = "".join(card(b) for b in snap["backends"])
    if not cards:
        cards = '<p class="empty">No backends are configured.</p>'
    rows = request_rows(requests)
    legend_rps = (
        '<ul class="legend"><li><span class="key success"></span>success</li>'
        '<li><span class="key error"></span>error</li>'
        '<li><span class="key client_disconnect"></span>client left</li></ul>'
    )
    legend_latency = (
        '<ul class="legend"><li><span class="key p50"></span>p50</li>'
        '<li><span class="key p95"></span>p95</li></ul>'
    )
    no_js = "<noscript><p>The charts are drawn by the page's script.</p></noscript>"
    text = "".join([
        _head("Nexus dashboard", assets),
        f'<script src="{e(assets["dashboard.js"])}" defer></script></head><body>',
        '<header class="top"><h1>Nexus</h1>',
        f'<span class="version">{e(snap["version"])}</span>',
        '<span id="live" class="live off" role="status">static page</span>',
        '<nav><a href="/health">health</a><a href="/v1/stats">stats</a>'
        '<a href="/metrics">metrics</a></nav></header><main>',
        f'<section class="totals" aria-label="Totals">{totals(snap)}</section>',
        '<section class="charts" aria-label="Last 15 minutes">',
        '<figure><figcaption>Requests per second, by outcome '
        '<span class="muted">last 15 min, 10 s buckets</span></figcaption>',
        f'<div class="chart" id="chart-rps">{no_js}</div>{legend_rps}</figure>',
        '<figure><figcaption>Request duration '
        '<span class="muted">last 15 min, 10 s buckets</span></figcaption>',
        f'<div class="chart" id="chart-latency">{no_js}</div>{legend_latency}</figure>',
        "</section>",
        f'<section aria-labelledby="h-backends"><h2 id="h-backends">Backends</h2>'
        f'<div class="cards" id="cards">{cards}</div></section>',
        '<section aria-labelledby="h-models"><h2 id="h-models">Models &times; backends</h2>'
        f'<div id="matrix">{matrix(snap)}</div></section>',
        '<section aria-labelledby="h-requests"><h2 id="h-requests">Last requests</h2>',
        '<div class="scroll"><table class="requests" id="requests"><thead><tr>'
        '<th scope="col">Time</th><th scope="col">Request id</th>'
        '<th scope="col">Model → backend</th><th scope="col">Status</th>'
        '<th scope="col" class="num">Latency</th><th scope="col" class="num">TTFT</th>'
        '<th scope="col" class="num">Tokens in / out</th></tr></thead>',
        rows,
        "</table>",
        "" if rows else '<p class="empty" id="no-requests">No requests yet.</p>',
        "</div></section></main></body></html>",
    ])
    return text.encode("utf-8")


def render_login(assets: Mapping[str, str], next_path: str, failed: bool) -> bytes:
    """The page that asks for the metrics token (once: it is then kept in a cookie)."""
    error = (
        '<p class="login-error" role="alert">That is not the metrics token.</p>' if failed else ""
    )
    text = "".join([
        _head("Nexus dashboard: token", assets),
        '</head><body class="login"><main><form method="post" action="/dashboard/login">',
        "<h1>Nexus</h1>",
        "<p>This gateway's dashboard needs its metrics token "
        "(<code>[server] metrics_token</code>).</p>",
        error,
        '<label for="token">Metrics token</label>',
        '<input id="token" name="token" type="password" autocomplete="current-password" '
        "required autofocus>",
        f'<input type="hidden" name="next" value="{e(next_path)}">',
        '<button type="submit">Open the dashboard</button>',
        '<p class="muted">This browser keeps it for 30 days (an HttpOnly cookie).</p>',
        "</form></main></body></html>",
    ])
    return text.encode("utf-8")
