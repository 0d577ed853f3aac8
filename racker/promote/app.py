"""--app: a container image's entrypoint becomes a systemd service that starts on boot.

Docker runs ENTRYPOINT + CMD with the image's Env, WorkingDir and User; so does
this unit. The OCI image config is read from the image's manifest: the
`config` object of the OCI image configuration (keys Entrypoint, Cmd, Env,
WorkingDir, User), stored by the source that acquired the image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from racker import store
from racker.errors import PromoteError

UNIT = "racker-app.service"


@dataclass(frozen=True)
class AppSpec:
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    workdir: str = "/"
    user: str = ""
    group: str = ""


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
    return AppSpec(tuple(argv), tuple(env), config.get("WorkingDir") or "/", user, group)


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
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + " ".join(exec_quote(word) for word in app.argv),
        # Paths and names: not unquoted by systemd, but % specifiers are expanded.
        f"WorkingDirectory=-{app.workdir.replace('%', '%%')}",
    ]
    for key, value in app.env:
        lines.append("Environment=" + systemd_quote(f"{key}={value}"))
    if app.user:
        lines.append(f"User={app.user.replace('%', '%%')}")
    if app.group:
        lines.append(f"Group={app.group.replace('%', '%%')}")
    lines += ["Restart=on-failure", "RestartSec=1", "", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)


def unit_files(app: AppSpec) -> dict[str, str]:
    return {f"etc/systemd/system/{UNIT}": unit_text(app)}


def enable(tree: Path) -> None:
    wants = tree / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / UNIT
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(f"/etc/systemd/system/{UNIT}", link)
