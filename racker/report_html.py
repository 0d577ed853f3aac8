"""A report as one static HTML page: inline CSS, a few lines of inline JS, no external assets.

Each matrix cell links to its failure below, whose message shows at once and
whose log opens in a <details>; following a link opens it too. Cells carry
data-image, data-engine, data-check and data-outcome, for people's scripts and
for racker's own tests.
"""

from __future__ import annotations

from html import escape
from typing import Any

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1f2328; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.5em; } h3 { font-size: 1em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #d0d7de; padding: .25em .5em; text-align: left; vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; }
.cell a { color: inherit; text-decoration: none; display: block; }
.pass { background: #dafbe1; color: #116329; } .skip { background: #f6f8fa; color: #656d76; }
.fail { background: #ffebe9; color: #a40e26; font-weight: 600; } .error { background: #fff1e5; color: #953800; font-weight: 600; }
.regressed { outline: 3px solid #cf222e; outline-offset: -3px; }
.regressed a::after { content: " ▲ new"; }
.missing td { background: #fff8c5; font-style: italic; }
.badge { display: inline-block; padding: .1em .6em; border-radius: 1em; margin-right: .4em; }
.changes li { margin: .2em 0; } .warning { background: #fff8c5; padding: .5em 1em; border-left: 4px solid #d4a72c; }
.failure { border: 1px solid #d0d7de; border-left: 4px solid #cf222e; padding: .5em 1em; margin: .8em 0; }
.failure:target { background: #fff8c5; }
pre { white-space: pre-wrap; word-break: break-word; background: #f6f8fa; padding: .5em; max-height: 40em; overflow: auto; }
.muted { color: #656d76; }
"""

# Following a link to a failure opens its log.
JS = """
function openTarget() {
  var target = location.hash && document.getElementById(location.hash.slice(1));
  var details = target && target.querySelector("details");
  if (details) details.open = true;
}
window.addEventListener("hashchange", openTarget);
openTarget();
"""

# --- formatting shared with the Markdown report ---------------------------------

ACCEL = {"kvm": "KVM", "tcg": "TCG", "unknown": "KVM not probed (racker doctor probes it)", "none": "no QEMU"}


def human_bytes(size: int | float | None) -> str:
    if not size:
        return ""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1000
    return f"{value:.1f}TB"


def short_digest(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]


def first_line(message: str) -> str:
    """A failure message's first line (an assertion's own text, before pytest's explanation)."""
    return message.strip().splitlines()[0] if message.strip() else ""


def check_label(check: str) -> str:
    return check.removeprefix("test_").replace("_", " ")


def versions(facts: dict) -> list[str]:
    """Kernel, systemd and cloud-init versions ("" where unknown; the running kernel if no image kernel)."""
    return [facts.get("kernel") or "", facts.get("systemd") or "", facts.get("cloud_init") or ""]


def boot(facts: dict) -> str:
    """ "firmware 1.2s + kernel 1.5s + userspace 3.0s = 5.7s; cloud-init 2.0s; up after 30.1s" """
    split = dict(facts.get("boot") or {})
    total = split.pop("total", None)
    cloud_init = split.pop("cloud-init", None)
    text = " + ".join(f"{phase} {secs:.1f}s" for phase, secs in split.items())
    if total is not None and len(split) > 1:
        text += f" = {total:.1f}s"
    if cloud_init is not None:
        text += f"; cloud-init {cloud_init:.1f}s"
    if facts.get("boot_seconds"):
        text += f"{'; ' if text else ''}up after {facts['boot_seconds']:.1f}s"
    return text


def disk(facts: dict) -> str:
    parts = []
    if facts.get("disk_bytes"):
        parts.append(f"disk {human_bytes(facts['disk_bytes'])}")
    if facts.get("root_bytes"):
        parts.append(f"root {human_bytes(facts.get('root_used_bytes'))} of {human_bytes(facts['root_bytes'])}")
    if facts.get("image_bytes"):
        parts.append(f"image {human_bytes(facts['image_bytes'])}")
    return ", ".join(parts)


def host_line(run: dict) -> str:
    host = run.get("host", {})
    tools = ", ".join(f"{name}: {host[name]}" for name in ("qemu", "nspawn") if host.get(name))
    machine = ", ".join(filter(None, [host.get("kernel"), f"{host['cpus']} CPUs" if host.get("cpus") else ""]))
    return (
        f"{host.get('hostname', '?')}{f' ({machine})' if machine else ''}: racker {host.get('racker', '?')}, "
        f"{tools}, QEMU accelerator: {ACCEL.get(host.get('accel', ''), '?')}; started {run.get('started', '?')} ({run.get('file', '')})"
    )


# --- the page ---------------------------------------------------------------


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _changes(report: dict[str, Any]) -> list[str]:
    comparison = report["comparison"]
    if not comparison:
        return []
    html = [f'<section id="changes" class="changes"><h2>Against {_e(comparison["previous"])}</h2>']
    html.append(f'<p class="muted">previous report generated {_e(comparison["previous_generated"])}</p>')
    for title, key in (("New failures", "new_failures"), ("Fixed", "fixed")):
        items = comparison[key]
        html.append(f'<h3>{title} ({len(items)})</h3><ul id="{key.replace("_", "-")}">')
        for c in items:
            html.append(
                f'<li data-image="{_e(c["image"])}" data-engine="{_e(c["engine"])}" data-check="{_e(c["check"])}">'
                f'<a href="#{c["id"]}">{_e(c["image"])} ({_e(c["engine"])}) {_e(check_label(c["check"]))}</a>: '
                f'{_e(c["was"])} → <span class="{_e(c["outcome"])}">{_e(c["outcome"])}</span> '
                f'<span class="message">{_e(first_line(c["message"]))}</span></li>'
            )
        html.append("</ul>")
    for title, key in (("New images", "new_images"), ("Dropped images", "dropped_images")):
        names = ", ".join(_e(f"{p[0]} ({', '.join(p[1:])})") for p in comparison[key]) or "none"
        html.append(f'<p id="{key.replace("_", "-")}"><strong>{title}:</strong> {names}</p>')
    html.append(f"<p>Still failing: {comparison['still_failing']}.</p></section>")
    return html


def _matrix(report: dict[str, Any], engine: str, regressed: set[str]) -> list[str]:
    by_cell = {(c["image"], c["check"]): c for c in report["cells"] if c["engine"] == engine}
    checks = [c for c in report["checks"] if any(key[1] == c for key in by_cell)]
    html = [f'<h2>{_e(engine)}</h2><table class="matrix" data-engine="{_e(engine)}"><tr><th>image</th>']
    html += [f'<th title="{_e(c)}">{_e(check_label(c))}</th>' for c in checks]
    html.append("</tr>")
    images = sorted(i for i, engines in report["images"].items() if engine in engines)
    for image in images:
        html.append(f'<tr data-image="{_e(image)}"><th scope="row">{_e(image)}</th>')
        for check in checks:
            cell = by_cell.get((image, check))
            if cell is None:
                html.append('<td class="cell absent">-</td>')
                continue
            classes = f"cell {cell['outcome']}" + (" regressed" if cell["id"] in regressed else "")
            title = _e(cell["message"][:300])
            label = f'<a href="#{cell["id"]}">{cell["outcome"]}</a>' if cell["outcome"] in ("fail", "error") else cell["outcome"]
            html.append(
                f'<td class="{classes}" data-image="{_e(image)}" data-engine="{_e(engine)}" data-check="{_e(check)}" '
                f'data-outcome="{_e(cell["outcome"])}" title="{title}">{label}</td>'
            )
        html.append("</tr>")
    for image, missing_engine in report["missing"]:
        if missing_engine == engine:
            html.append(f'<tr class="missing" data-image="{_e(image)}"><th scope="row">{_e(image)}</th>')
            html.append(f'<td colspan="{max(len(checks), 1)}">no results (a missing shard?)</td></tr>')
    html.append("</table>")
    return html


def _images(report: dict[str, Any]) -> list[str]:
    html = ['<h2>Images</h2><table id="images"><tr>']
    html += [f"<th>{h}</th>" for h in ("image", "engine", "digest", "source", "OS", "kernel", "systemd", "cloud-init", "boot", "disk")]
    html.append("</tr>")
    for image, engines in sorted(report["images"].items()):
        for engine, facts in sorted(engines.items()):
            digest = facts.get("digest", "")
            cells = [image, engine, f'<span title="{_e(digest)}">{_e(short_digest(digest))}</span>', facts.get("source", "")]
            cells += [facts.get("os", ""), *versions(facts), boot(facts), disk(facts)]
            if facts.get("facts_error"):
                cells[-1] += f" (facts: {facts['facts_error']})"
            html.append(f'<tr data-image="{_e(image)}" data-engine="{_e(engine)}">')
            html += [f"<td>{c if i == 2 else _e(c)}</td>" for i, c in enumerate(cells)]
            html.append("</tr>")
    html.append("</table>")
    return html


def _failures(report: dict[str, Any], regressed: set[str]) -> list[str]:
    failures = [c for c in report["cells"] if c["outcome"] in ("fail", "error")]
    if not failures:
        return []
    html = ["<h2>Failures</h2>"]
    for c in sorted(failures, key=lambda c: (c["id"] not in regressed, c["image"], c["engine"], c["check"])):
        new = " (new)" if c["id"] in regressed else ""
        html.append(
            f'<section class="failure {c["outcome"]}" id="{c["id"]}" data-image="{_e(c["image"])}" data-engine="{_e(c["engine"])}" '
            f'data-check="{_e(c["check"])}"><h3>{_e(c["image"])} ({_e(c["engine"])}) · {_e(c["check"])}: {c["outcome"]}{new}</h3>'
            f'<pre class="message">{_e(c["message"])}</pre>'
            f'<p class="muted">{_e(", ".join(c["nodeids"]))}</p>'
        )
        if c["log"]:
            html.append(f'<details><summary>log</summary><pre class="log">{_e(c["log"])}</pre></details>')
        html.append("</section>")
    return html


def render(report: dict[str, Any]) -> str:
    comparison = report["comparison"] or {}
    regressed = {c["id"] for c in comparison.get("new_failures", [])}
    counts = report["counts"]
    html = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>racker report {_e(report['generated'])}</title><style>{CSS}</style></head><body>",
        f'<h1>racker compatibility report</h1><p class="muted">generated {_e(report["generated"])}</p><p id="counts">',
    ]
    html += [f'<span class="badge {o}" data-outcome="{o}">{counts[o]} {o}</span>' for o in ("pass", "fail", "error", "skip")]
    html.append("</p>")
    if comparison.get("regressed"):
        html.append(f'<p class="warning" id="regressed"><strong>Regressed:</strong> {len(regressed)} new failures.</p>')
    html += _changes(report)
    if report["missing"]:
        names = ", ".join(_e(f"{i} ({e})") for i, e in report["missing"])
        html.append(f'<p class="warning" id="missing"><strong>No results</strong> for {names}.</p>')
    if report["repeated"]:
        html.append(f'<p class="muted" id="repeated">{len(report["repeated"])} tests were reported more than once: the last counts.</p>')
    for engine in sorted(set(report["engines"]) | {e for _i, e in report["missing"]}):
        html += _matrix(report, engine, regressed)
    html += _images(report)
    html.append('<h2>Hosts</h2><ul id="hosts">')
    html += [f"<li>{_e(host_line(run))}</li>" for run in report["runs"]] or ["<li>(the results carry no host record)</li>"]
    html.append("</ul>")
    html += _failures(report, regressed)
    html.append(f"<script>{JS}</script></body></html>")
    return "\n".join(html) + "\n"
