"""A report as one static HTML page: inline CSS, a few lines of inline JS, no external assets.

The page comes from a Jinja2 template (templates/report.html.j2) with autoescaping:
check names, messages and logs are the images' and tests' own text, never markup.
Per engine, a matrix of a row per check and a column per image, failing rows first;
each cell shows its outcome, its verdict over the last nights (racker.report.history) and
a strip of them, and links to its failure below, whose message shows at once,
whose evidence files are linked, and whose log opens in a <details>; following a
link opens it too. Cells carry data-image, data-engine, data-check, data-outcome
and data-label, for people's scripts and for racker's own tests.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from markupsafe import Markup

from racker import sizes

if TYPE_CHECKING:
    import jinja2

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1em; color: #1f2328; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.5em; } h3 { font-size: 1em; }
table { border-collapse: collapse; margin: .5em 0; width: 100%; }
th, td { border: 1px solid #d0d7de; padding: .25em .4em; text-align: left; vertical-align: top; overflow-wrap: anywhere; }
th { background: #f6f8fa; font-weight: 600; }
th.check { width: 22%; font-weight: normal; } th.image { font-size: .9em; }
#images { table-layout: fixed; font-size: .85em; }
.cell a { color: inherit; }
.pass { background: #dafbe1; color: #116329; } .skip { background: #f6f8fa; color: #656d76; }
.flaky { background: #fff8c5; color: #7d4e00; font-weight: 600; }
.fail { background: #ffebe9; color: #a40e26; font-weight: 600; } .error { background: #fff1e5; color: #953800; font-weight: 600; }
.regressed { outline: 3px solid #cf222e; outline-offset: -3px; }
.regressed a::after { content: " ▲ new"; }
.missing { background: #fff8c5; font-style: italic; }
.verdict { font-size: .75em; font-weight: 600; padding: 0 .3em; border-radius: .3em; color: #fff; }
.verdict.PASSING { background: #1a7f37; } .verdict.FLAKY { background: #bf8700; } .verdict.FAILING { background: #cf222e; }
.strip { display: inline-block; white-space: nowrap; vertical-align: middle; margin-left: .3em; }
.strip i { display: inline-block; width: 6px; height: 10px; margin-right: 1px; background: #d0d7de; }
.strip i.pass { background: #2da44e; } .strip i.fail, .strip i.error { background: #cf222e; } .strip i.flaky { background: #d4a72c; }
.strip i.skip { background: #afb8c1; } .strip i.none { background: #eaeef2; }
.since { display: block; color: #656d76; font-weight: normal; }
.reused { display: block; color: #656d76; font-weight: normal; font-style: italic; }
.stale { font-size: .75em; background: #fff1e5; color: #953800; padding: 0 .3em; border-radius: .3em; }
.badge { display: inline-block; padding: .1em .6em; border-radius: 1em; margin-right: .4em; }
.changes li { margin: .2em 0; } .warning { background: #fff8c5; padding: .5em 1em; border-left: 4px solid #d4a72c; }
.failure { border: 1px solid #d0d7de; border-left: 4px solid #cf222e; padding: .5em 1em; margin: .8em 0; }
.failure.flaky { border-left-color: #d4a72c; }
.failure:target { background: #fff8c5; }
.evidence li { display: inline; margin-right: 1em; }
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

ACCEL = {"kvm": "KVM", "tcg": "TCG"}


def human_bytes(size: int | float | None) -> str:
    """A size from a guest's facts; nothing where it was not measured."""
    return sizes.human(size) if size else ""


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
    """ "cold boot: firmware 1.2s + kernel 1.5s + userspace 3.0s = 5.7s; cloud-init 2.0s; up after 30.1s"

    A VM restored from a snapshot says so: its split is that of the snapshot's boot, maybe
    nights ago, and only "up after" is tonight's (no VM of the image booted cold tonight)."""
    split = dict(facts.get("boot") or {})
    total = split.pop("total", None)
    cloud_init = split.pop("cloud-init", None)
    text = " + ".join(f"{phase} {secs:.1f}s" for phase, secs in split.items())
    if total is not None and len(split) > 1:
        text += f" = {total:.1f}s"
    if cloud_init is not None:
        text += f"; cloud-init {cloud_init:.1f}s"
    if facts.get("restored_from"):
        snapshot = f" (the snapshot's boot: {text})" if text else ""
        text = f"restored from snapshot {facts['restored_from']}, no cold boot tonight{snapshot}"
    elif "restored_from" in facts:
        text = f"cold boot: {text}" if text else "cold boot"
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


def accelerator(run: dict) -> str:
    """What the run's VMs ran with (their image records say); without VMs, what the host record
    knew before any booted (it never probes: "unknown" there means only that no VM booted)."""
    if run.get("accels"):
        return f"QEMU accelerator: {', '.join(ACCEL.get(a, a) for a in run['accels'])}"
    known = run.get("host", {}).get("accel", "")
    if known in ("kvm", "tcg"):
        return f"QEMU accelerator: {ACCEL[known]}"
    return "no QEMU" if known == "none" else "no VM booted"


def host_line(run: dict) -> str:
    host = run.get("host", {})
    tools = ", ".join(f"{name}: {host[name]}" for name in ("qemu", "nspawn") if host.get(name))
    machine = ", ".join(filter(None, [host.get("kernel"), f"{host['cpus']} CPUs" if host.get("cpus") else ""]))
    return (
        f"{host.get('hostname', '?')}{f' ({machine})' if machine else ''}: racker {host.get('racker', '?')}, "
        f"{tools}, {accelerator(run)}; started {run.get('started', '?')} ({run.get('file', '')})"
    )


def package_changes(said: dict) -> list[str]:
    """A diff's packages, one phrase each: "libc6 2.36-1 → 2.36-2", "added curl 8.0", "removed wget 1.21"."""
    return (
        [f"{name} {was} → {now}" for name, was, now in said.get("upgraded", [])]
        + [f"added {name} {version}" for name, version in said.get("added", [])]
        + [f"removed {name} {version}" for name, version in said.get("removed", [])]
    )


def image_change(said: dict) -> str:
    """Whether an image's upstream moved and its digest changed: "upstream moved, digest changed"."""
    moved = {True: "upstream moved", False: "upstream unchanged", None: "upstream not asked"}[said.get("moved")]
    if said.get("stale"):
        moved = "upstream not reached"
    digest = {True: "digest changed", False: "digest unchanged", None: "no earlier digest"}[said.get("digest_changed")]
    return f"{moved}, {digest}"


def night(generated: str) -> str:
    """A night as a cell names it: its date (the full time is in report.json)."""
    return generated[:10]


def evidence_links(evidence: dict[str, str]) -> list[tuple[str, str]]:
    """(kind, href) of a cell's evidence files: paths relative to the page, quoted (so that a
    path never reads as a URL scheme such as javascript:)."""
    return [(kind, quote(path if path.startswith(("/", "../")) else f"./{path}")) for kind, path in sorted(evidence.items())]


# --- the page ---------------------------------------------------------------


@functools.cache
def environment() -> jinja2.Environment:
    """The templates' environment, made when a page is first rendered (jinja2 costs every
    racker command some 30 ms to import; only the report's writers need it)."""
    import jinja2

    made = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    made.filters.update(
        check_label=check_label,
        first_line=first_line,
        short_digest=short_digest,
        night=night,
        host_line=host_line,
        package_changes=package_changes,
        image_change=image_change,
        evidence_links=evidence_links,
    )
    return made


def render(report: dict[str, Any], matrices: list[dict[str, Any]], failures: list[dict[str, Any]]) -> str:
    """The page: `matrices` are report.layout()'s, one per engine; `failures` the cells shown below them."""
    comparison = report["comparison"] or {}
    regressed = {c["id"] for c in comparison.get("new_failures", [])}
    failures = sorted(failures, key=lambda c: c["id"] not in regressed)  # new failures first, else as given
    stale = {(image, engine): why for image, engine, why in report.get("stale", [])}
    images = [
        {"image": image, "engine": engine, "facts": facts, "digest": facts.get("digest", ""), "versions": versions(facts),
         "boot": boot(facts), "disk": disk(facts), "stale": stale.get((image, engine), "")}
        for image, engines_of in sorted(report["images"].items())
        for engine, facts in sorted(engines_of.items())
    ]  # fmt: skip
    template = environment().get_template("report.html.j2")
    return template.render(
        report=report,
        comparison=comparison,
        regressed=regressed,
        outcomes=list(report["counts"]),
        linked={c["id"] for c in failures},
        nights=(report.get("history") or {}).get("nights", [report["generated"]]),
        matrices=matrices,
        images=images,
        failures=failures,
        css=Markup(CSS),
        js=Markup(JS),
    )
