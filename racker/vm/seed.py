"""A NoCloud seed: an ISO 9660 volume labelled `cidata` with meta-data and user-data.

cloud-init finds it by its label on any block device. It carries the VM's
hostname and a per-VM SSH key for a sudo-capable user, and whatever other
cloud-config the caller adds (packages, chpasswd, ntp, apt...).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from pathlib import Path

from racker import proc, settings
from racker.files import write_atomic

USER = "racker"


# RACKER_SEED_MODULES=minimal (racker's own test suite sets it): cloud-init runs only the
# modules the seed itself needs. Every module costs boot time under emulation; the image
# keeps cloud-init's full default lists, for user-data that needs them (never trimmed
# when the caller adds cloud-config of its own).
MINIMAL_MODULES = {
    "cloud_init_modules": ["seed_random", "bootcmd", "write_files", "growpart", "resizefs", "disk_setup", "mounts",
                           "set_hostname", "update_hostname", "update_etc_hosts", "users_groups", "ssh"],
    "cloud_config_modules": ["timezone", "runcmd"],
    "cloud_final_modules": ["scripts_vendor", "scripts_per_once", "scripts_per_boot", "scripts_per_instance",
                            "scripts_user", "final_message", "power_state_change"],
}  # fmt: skip


def user_data(hostname: str, public_key: str, user: str = USER, extra: dict | None = None, bootcmd: Sequence[Sequence[str]] = ()) -> str:
    """#cloud-config as JSON (YAML's subset), so that no value needs YAML quoting rules.

    `extra` is more cloud-config; racker's hostname and user win over it, and its
    `users` are created beside racker's. `bootcmd`: racker's own commands for the
    guest's every boot, run after the caller's."""
    extra = dict(extra or {})
    config = {
        **extra,
        "hostname": hostname,
        "manage_etc_hosts": "localhost",
        "users": [
            {
                "name": user,
                "gecos": "racker",
                "shell": "/bin/bash",
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "lock_passwd": True,
                "ssh_authorized_keys": [public_key.strip()],
            },
            *extra.get("users", ()),
        ],
    }
    if bootcmd:
        config["bootcmd"] = [*extra.get("bootcmd", ()), *(list(command) for command in bootcmd)]
    if not extra and settings.SEED_MODULES.value() == "minimal":
        config |= MINIMAL_MODULES
    return "#cloud-config\n" + json.dumps(config, indent=1) + "\n"


def meta_data(hostname: str) -> str:
    # dsmode local: everything the seed holds is applied before the network is up.
    return json.dumps({"instance-id": f"racker-{hostname}-{secrets.token_hex(4)}", "local-hostname": hostname, "dsmode": "local"}) + "\n"


def build(path: Path, hostname: str, public_key: str, extra: dict | None = None, bootcmd: Sequence[Sequence[str]] = ()) -> Path:
    """Write the seed ISO at `path`; `extra`: more cloud-config for the user-data, `bootcmd`: racker's own.

    Root's alone whatever the umask: the caller's cloud-config may carry secrets (a password's hash)."""
    files = path.parent / f"{path.stem}.d"
    files.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(files / "meta-data", meta_data(hostname))
    write_atomic(files / "user-data", user_data(hostname, public_key, extra=extra, bootcmd=bootcmd))
    argv = ["xorriso", "-as", "mkisofs", "-quiet", "-output", str(path), "-volid", "cidata", "-joliet", "-rock", str(files)]
    proc.run(argv, umask=proc.PRIVATE)
    return path
