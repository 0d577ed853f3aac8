"""The user Vagrant logs in as, added to a staged tree only when asked (`--vagrant-user`).

`vagrant`, with passwordless sudo and Vagrant's insecure public keys in its
authorized_keys: anyone holding their private halves (published with Vagrant)
logs in, which is why no box gets them unasked. Vagrant swaps them for a key of
its own on the first `vagrant up`.
"""

from __future__ import annotations

import os
from pathlib import Path

from racker import prepare
from racker.errors import PromoteError

USER = "vagrant"
HOME = f"home/{USER}"
SUDOERS = f"etc/sudoers.d/{USER}"
# hashicorp/vagrant keys/vagrant.pub.ed25519 and keys/vagrant.pub.rsa; Vagrant tries both.
INSECURE_KEYS = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN1YdxBpNlzxDqfJyw/QKow1F+wvG9hXGoqiysfJOn5Y vagrant insecure public key",
    "ssh-rsa AAAAB3NzaC1yc2EAAAABIwAAAQEA6NF8iallvQVp22WDkTkyrtvp9eWW6A8YVr+kz4TjGYe7gHzIw+niNltGEFHzD8+v1I2YJ6oXevct1YeS0o9HZyN1Q9qgC"
    "gzUFtdOKLv6IedplqoPkcmF0aYet2PkEDo3MlTBckFXPITAMzF8dJSIFo9D8HfdOV0IAdx4O7PtixWKn5y2hMNG0zQPyUecp4pzC6kivAIhyfHilFR61RGL+GPXQ2"
    "MWZWFYbAGjyiYJnAmCP3NOTd0jMZEnDkbUvxhMmBYSdETk1rRgm+R4LOzFUGaHqHDLKLX+FIPKcF96hrucXzcWyLbIbEgE98OHlnVYCzRdK8jlqm8tehUc9c9WhQ== "
    "vagrant insecure public key",
)
FIRST_UID = 1000
SUDO_RULE = f"# Written by racker promote --vagrant-user.\n{USER} ALL=(ALL) NOPASSWD: ALL\nDefaults:{USER} !requiretty\n"


def add(tree: Path) -> None:
    """Add the user to the tree's account files (unless the image has one), its sudo rule and keys."""
    passwd = _read(tree, "etc/passwd")
    if passwd is None:
        raise PromoteError("the image has no /etc/passwd to add the vagrant user to")
    entry = next((line.split(":") for line in passwd.splitlines() if line.startswith(f"{USER}:")), None)
    if entry is None:
        groups = _read(tree, "etc/group") or ""
        uid = _free_id(passwd, groups)
        shell = "/bin/bash" if (tree / "bin/bash").exists() or (tree / "usr/bin/bash").exists() else "/bin/sh"
        _append(tree, "etc/passwd", f"{USER}:x:{uid}:{uid}:Vagrant:/{HOME}:{shell}", 0o644)
        _append(tree, "etc/group", f"{USER}:x:{uid}:", 0o644)
        # '*': no password, yet not locked ('!'), which sshd would refuse a key login for; empty aging fields: none.
        _append(tree, "etc/shadow", f"{USER}:*::0:99999:7:::", 0o640)
        if (tree / "etc/gshadow").exists():
            _append(tree, "etc/gshadow", f"{USER}:!::", 0o640)
        uid_gid, home = (uid, uid), HOME
    else:
        uid_gid, home = (int(entry[2]), int(entry[3])), entry[5].lstrip("/")
    prepare.write_file(tree, SUDOERS, SUDO_RULE, mode=0o440)
    for rel, mode in ((home, 0o755), (f"{home}/.ssh", 0o700)):
        directory = tree / rel
        if not directory.resolve().is_relative_to(tree.resolve()):
            raise PromoteError(f"/{rel} points outside the image")
        directory.mkdir(mode=mode, parents=True, exist_ok=True)
        _chown(directory, *uid_gid)
    keys = f"{home}/.ssh/authorized_keys"
    prepare.write_file(tree, keys, "".join(f"{key}\n" for key in INSECURE_KEYS), mode=0o600)
    _chown(tree / keys, *uid_gid)


def _read(tree: Path, rel: str) -> str | None:
    path = tree / rel
    return path.read_text() if path.is_file() and not path.is_symlink() else None


def _append(tree: Path, rel: str, line: str, mode: int) -> None:
    """A new copy of the file with the line added, with the old one's mode and owner (root:shadow
    0640 for Debian's shadow files): the tree's file is a hard link into the store, never written."""
    path = tree / rel
    old = os.lstat(path) if path.is_file() and not path.is_symlink() else None
    text = _read(tree, rel) or ""
    if text and not text.endswith("\n"):
        text += "\n"
    prepare.write_file(tree, rel, text + line + "\n", mode=old.st_mode & 0o7777 if old else mode)
    if old:
        _chown(path, old.st_uid, old.st_gid)


def _chown(path: Path, uid: int, gid: int) -> None:
    try:
        os.chown(path, uid, gid, follow_symlinks=False)
    except PermissionError:
        raise PromoteError("--vagrant-user needs root: the user's files must belong to it", hint="run racker promote as root") from None


def _free_id(passwd: str, groups: str) -> int:
    """The first id from 1000 that is neither a uid nor a gid: the user's private group gets the same number."""
    taken = {int(f[2]) for f in (line.split(":") for line in (passwd + groups).splitlines()) if len(f) > 2 and f[2].isdigit()}
    return next(i for i in range(FIRST_UID, 60000) if i not in taken)
