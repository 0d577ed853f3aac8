"""The user Vagrant logs in as, added to a promoted disk only when asked (`--vagrant-user`).

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
from racker.store import imagetree

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


def add(rootfs: Path, overlay: Path) -> None:
    """Add the user to the image's account files (unless it has one), its sudo rule and keys: the
    changed and new files go into promote's overlay, read from it first, else from the image."""
    passwd = _read(rootfs, overlay, "etc/passwd")
    if passwd is None:
        raise PromoteError("the image has no /etc/passwd to add the vagrant user to")
    entry = next((line.split(":") for line in passwd.splitlines() if line.startswith(f"{USER}:")), None)
    if entry is None:
        groups = _read(rootfs, overlay, "etc/group") or ""
        uid = _free_id(passwd, groups)
        image = imagetree.Tree(rootfs)
        shell = "/bin/bash" if image.exists("bin/bash") or image.exists("usr/bin/bash") else "/bin/sh"
        _append(rootfs, overlay, "etc/passwd", f"{USER}:x:{uid}:{uid}:Vagrant:/{HOME}:{shell}", 0o644)
        _append(rootfs, overlay, "etc/group", f"{USER}:x:{uid}:", 0o644)
        # '*': no password, yet not locked ('!'), which sshd would refuse a key login for; empty aging fields: none.
        _append(rootfs, overlay, "etc/shadow", f"{USER}:*::0:99999:7:::", 0o640)
        if image.exists("etc/gshadow"):
            _append(rootfs, overlay, "etc/gshadow", f"{USER}:!::", 0o640)
        uid_gid, home = (uid, uid), HOME
    else:
        uid_gid, home = (int(entry[2]), int(entry[3])), entry[5].strip("/")
    if not home or ".." in home.split("/"):
        raise PromoteError(f"the vagrant user's home /{home} is not a directory inside the image")
    prepare.write_file(overlay, SUDOERS, SUDO_RULE, mode=0o440)
    for rel, mode in ((home, 0o755), (f"{home}/.ssh", 0o700)):
        directory = overlay / rel
        directory.mkdir(mode=mode, parents=True, exist_ok=True)
        directory.chmod(mode)
        _chown(directory, *uid_gid)
    keys = f"{home}/.ssh/authorized_keys"
    prepare.write_file(overlay, keys, "".join(f"{key}\n" for key in INSECURE_KEYS), mode=0o600)
    _chown(overlay / keys, *uid_gid)


def _read(rootfs: Path, overlay: Path, rel: str) -> str | None:
    """The file as promote's overlay has it, else as the image has it (a regular file, not a link)."""
    for tree in (imagetree.Tree(overlay), imagetree.Tree(rootfs)):
        if tree.is_file(rel) and not tree.is_symlink(rel):
            return tree.read_text(rel, errors="replace")
    return None


def _append(rootfs: Path, overlay: Path, rel: str, line: str, mode: int) -> None:
    """The file with the line added, in the overlay, with the image's file's mode and owner
    (root:shadow 0640 for Debian's shadow files); the image's own is never written."""
    image = imagetree.Tree(rootfs)
    old = image.lstat(rel) if image.is_file(rel) and not image.is_symlink(rel) else None
    text = _read(rootfs, overlay, rel) or ""
    if text and not text.endswith("\n"):
        text += "\n"
    prepare.write_file(overlay, rel, text + line + "\n", mode=old.st_mode & 0o7777 if old else mode)
    if old:
        _chown(overlay / rel, old.st_uid, old.st_gid)


def _chown(path: Path, uid: int, gid: int) -> None:
    try:
        os.chown(path, uid, gid, follow_symlinks=False)
    except PermissionError:
        raise PromoteError("--vagrant-user needs root: the user's files must belong to it", hint="run racker promote as root") from None


def _free_id(passwd: str, groups: str) -> int:
    """The first id from 1000 that is neither a uid nor a gid: the user's private group gets the same number."""
    taken = {int(f[2]) for f in (line.split(":") for line in (passwd + groups).splitlines()) if len(f) > 2 and f[2].isdigit()}
    return next(i for i in range(FIRST_UID, 60000) if i not in taken)
