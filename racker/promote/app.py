"""--app: a container image's entrypoint becomes a systemd service that starts on boot.

Docker runs ENTRYPOINT + CMD with the image's Env, WorkingDir and User; so does
this unit. STOPSIGNAL becomes its KillSignal=; a HEALTHCHECK becomes a timer
that runs the check every Interval (after StartPeriod), as the app's user, in
its environment, and restarts the service once it has failed Retries times in
a row (docker marks such a container unhealthy; a VM has no one to tell, so it
acts). The image config is read from the image's manifest: the `config`
object of the image configuration, stored by the source that acquired it.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from racker import store
from racker.errors import PromoteError
from racker.store import imagetree

UNIT = "racker-app.service"
HEALTH = "racker-app-health"
FAILURES = "/run/racker-app-health.failures"  # consecutive failed checks, reset by a passing one


@dataclass(frozen=True)
class HealthCheck:
    """Docker's HEALTHCHECK: a command (argv, run without a shell) and its timing, in seconds."""

    argv: tuple[str, ...]
    interval: float = 30
    timeout: float = 30
    start_period: float = 0
    retries: int = 3


@dataclass(frozen=True)
class AppSpec:
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    workdir: str = "/"
    user: str = ""
    group: str = ""
    stop_signal: str = ""
    health: HealthCheck | None = None
    executable: str = ""  # argv[0] found on the image's PATH, when argv[0] is a bare name


def kill_signal(value: object) -> str:
    """STOPSIGNAL (SIGINT, INT or 2) as systemd's KillSignal= reads it; PromoteError if it is none."""
    import signal

    text = str(value).strip().upper()
    try:
        number = int(text) if text.isdigit() else signal.Signals[text if text.startswith("SIG") else f"SIG{text}"].value
        return signal.Signals(number).name
    except (KeyError, ValueError):
        raise PromoteError(f"the image's STOPSIGNAL {value!r} is not a signal") from None


def health_check(value: object) -> HealthCheck | None:
    """Docker's Healthcheck object (Test, Interval, Timeout, StartPeriod, Retries; times in ns)."""
    if not isinstance(value, dict) or not value.get("Test"):
        return None
    test = list(value["Test"])
    if test[0] == "NONE":
        return None
    if test[0] == "CMD-SHELL":
        argv = ("/bin/sh", "-c", " ".join(test[1:]))
    elif test[0] == "CMD":
        argv = tuple(test[1:])
    else:
        argv = ("/bin/sh", "-c", " ".join(test))  # the old form: a bare shell command
    if not argv:
        return None
    defaults = HealthCheck(argv)

    def seconds(key: str, default: float) -> float:
        return int(value.get(key) or 0) / 1e9 or default

    return HealthCheck(
        argv,
        interval=seconds("Interval", defaults.interval),
        timeout=seconds("Timeout", defaults.timeout),
        start_period=seconds("StartPeriod", defaults.start_period),
        retries=int(value.get("Retries") or defaults.retries),
    )


def oci_config(image: store.StoredImage) -> dict:
    manifest = image.manifest
    for key in ("oci_config", "config"):
        value = manifest.get(key)
        if isinstance(value, dict):
            # Either the whole OCI image configuration or its "config" object.
            return value.get("config", value) if "config" in value and isinstance(value["config"], dict) else value
    return {}


def spec(image: store.StoredImage) -> AppSpec:
    config = oci_config(image)
    argv = [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]
    if not argv:
        raise PromoteError(
            f"{image.name} has no ENTRYPOINT or CMD to run as a service", hint="--app is for images of services (docker://…)"
        )
    env = []
    for item in config.get("Env") or []:
        key, sep, value = item.partition("=")
        if sep and key:
            env.append((key, value))
    user, _, group = (config.get("User") or "").partition(":")
    stop = kill_signal(config["StopSignal"]) if config.get("StopSignal") else ""
    return AppSpec(tuple(argv), tuple(env), config.get("WorkingDir") or "/", user, group, stop, health_check(config.get("Healthcheck")))


# What Docker searches for a bare ENTRYPOINT name when the image sets no PATH.
DOCKER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def resolved(app: AppSpec, tree: Path) -> AppSpec:
    """The spec with a bare program name (`python3`) found on the image's own PATH, as
    Docker finds it; systemd would search only its fixed path (no /opt/venv/bin, say).
    The unit keeps the name as argv[0] (ExecStart=@/path name …), as Docker does."""
    program = app.argv[0]
    if "/" in program:
        return app
    search = dict(app.env).get("PATH") or DOCKER_PATH
    image = imagetree.Tree(tree)  # the image's own links resolve inside it
    for directory in search.split(":"):
        if not directory.startswith("/"):
            continue
        candidate = f"{directory.strip('/')}/{program}"
        if image.is_symlink(candidate) or image.is_file(candidate):
            return dataclasses.replace(app, executable=f"{directory.rstrip('/')}/{program}")
    raise PromoteError(f"the ENTRYPOINT/CMD program {program!r} is not on the image's PATH", hint=f"PATH={search}")


def systemd_quote(word: str) -> str:
    """One word of a setting that systemd unquotes (C escapes) and then expands
    % specifiers in, such as Environment=: there `$` is an ordinary character."""
    return '"' + "".join(_ESCAPES.get(char) or (f"\\x{ord(char):02x}" if char < " " or char == "\x7f" else char) for char in word) + '"'


# C escapes for what would end the quoted word or the line; other control characters become \xNN.
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "%": "%%"}


def exec_quote(word: str) -> str:
    """One ExecStart= word: quoted as systemd_quote, and `$` doubled, since
    ExecStart= also expands $VAR and ${VAR} (and only there is `$$` a `$`)."""
    return systemd_quote(word.replace("$", "$$"))


def unit_text(app: AppSpec) -> str:
    lines = [
        "# Written by racker promote --app: the image's ENTRYPOINT/CMD as a service.",
        "[Unit]",
        "Description=Application from the container image",
        "Wants=network-online.target",
        "After=network-online.target cloud-init.service",
        # Restarted by its health check as often as the check fails: systemd's start limit (5 in
        # 10 s) would otherwise leave it failed, and stopped for good, after a few quick restarts.
        "StartLimitIntervalSec=0",
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + ("@" + exec_quote(app.executable) + " " if app.executable else "") + " ".join(exec_quote(word) for word in app.argv),
        # Paths and names: not unquoted by systemd, but % specifiers are expanded.
        f"WorkingDirectory=-{app.workdir.replace('%', '%%')}",
    ]
    lines += _environment(app)
    if app.user:
        lines.append(f"User={app.user.replace('%', '%%')}")
    if app.group:
        lines.append(f"Group={app.group.replace('%', '%%')}")
    if app.stop_signal:
        lines.append(f"KillSignal={app.stop_signal}")
    lines += ["Restart=on-failure", "RestartSec=1", "", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)


def _environment(app: AppSpec) -> list[str]:
    return ["Environment=" + systemd_quote(f"{key}={value}") for key, value in app.env]


def health_units(app: AppSpec) -> dict[str, str]:
    """The health check's service (one check, counting failures) and the timer that runs it."""
    check = app.health
    assert check is not None
    command = shlex.join(check.argv)
    if app.user:  # as docker does: the check runs as the container's user
        command = shlex.join(["runuser", "-u", app.user, "--", *check.argv])
    script = (
        f"if timeout {check.timeout:g} {command}; then rm -f {FAILURES}; exit 0; fi; "
        f"n=$(( $(cat {FAILURES} 2>/dev/null || echo 0) + 1 )); echo $n > {FAILURES}; "
        f'echo "health check failed ($n of {check.retries})"; '
        f"if [ $n -ge {check.retries} ]; then rm -f {FAILURES}; systemctl restart {UNIT}; fi"
    )
    service = [
        "# Written by racker promote --app: the image's HEALTHCHECK, run once.",
        "[Unit]",
        "Description=Health check of the application from the container image",
        f"After={UNIT}",
        f"Requisite={UNIT}",
        "StartLimitIntervalSec=0",  # started by its timer, as often as Interval says
        "",
        "[Service]",
        "Type=oneshot",
        # A failing check must not leave a failed unit behind: the system stays `running`.
        "ExecStart=" + " ".join(exec_quote(word) for word in ("/bin/sh", "-c", script)),
        f"WorkingDirectory=-{app.workdir.replace('%', '%%')}",
        *_environment(app),
        "",
    ]
    timer = [
        "# Written by racker promote --app: runs the image's HEALTHCHECK every Interval.",
        "[Unit]",
        "Description=Health checks of the application from the container image",
        "",
        "[Timer]",
        f"OnActiveSec={check.start_period + check.interval:g}s",
        f"OnUnitActiveSec={check.interval:g}s",
        "AccuracySec=100ms",
        "",
        "[Install]",
        "WantedBy=timers.target",
        "",
    ]
    return {f"etc/systemd/system/{HEALTH}.service": "\n".join(service), f"etc/systemd/system/{HEALTH}.timer": "\n".join(timer)}


def unit_files(app: AppSpec) -> dict[str, str]:
    files = {f"etc/systemd/system/{UNIT}": unit_text(app)}
    if app.health is not None:
        files.update(health_units(app))
    return files


def enable(tree: Path) -> None:
    """Start the service at boot, and its health check's timer where there is one."""
    units = [("multi-user.target.wants", UNIT)]
    if (tree / f"etc/systemd/system/{HEALTH}.timer").exists():
        units.append(("timers.target.wants", f"{HEALTH}.timer"))
    for wanted_by, unit in units:
        wants = tree / "etc/systemd/system" / wanted_by
        wants.mkdir(parents=True, exist_ok=True)
        link = wants / unit
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(f"/etc/systemd/system/{unit}", link)
