"""Who a guest command runs as: `USER[:GROUP]`, as `docker exec --user` takes it.

The user is looked up inside the guest (its own NSS, through getent), never in
the host's files. The command then runs under util-linux's setpriv, which sets
the uid, gid and supplementary groups and execs it: the argv stays an argv,
no shell is put in between to change its quoting.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from racker.errors import MachineError
from racker.proc import Result

# getent's exit status for "no such entry".
GETENT_NOT_FOUND = 2


@dataclass(frozen=True)
class Login:
    """A guest user, resolved: what setpriv and the login environment need."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str
    # In the guest's passwd: its supplementary groups come from the guest's group
    # database. A bare uid that is not (docker allows one) gets none.
    known: bool = True
    # Where its commands start: the home, or / if there is none (as login and su - do).
    workdir: str = "/"

    def env(self) -> dict[str, str]:
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name, "SHELL": self.shell}

    def setpriv(self) -> list[str]:
        groups = "--init-groups" if self.known else "--clear-groups"
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", groups, "--"]


def resolve(spec: str, run: Callable[[Sequence[str]], Result], where: str) -> Login:
    """`name`, `uid`, `name:group` or `uid:gid`, looked up with `run` (a command in the guest)."""
    user, _, group = spec.partition(":")
    if not user or (":" in spec and not group):
        raise MachineError(f"bad user {spec!r}: give NAME, UID, NAME:GROUP or UID:GID")
    entry = _getent(run, "passwd", user)
    if entry is None:
        if not user.isdigit():
            raise MachineError(f"no user {user!r} in {where}")
        login = Login(name=user, uid=int(user), gid=int(user), home="/", shell="/bin/sh", known=False)
    else:
        name, _pw, uid, gid, _gecos, home, shell = (entry + [""] * 7)[:7]
        home = home or "/"
        workdir = home if run(["test", "-d", home]).succeeded else "/"
        login = Login(name=name, uid=int(uid), gid=int(gid), home=home, shell=shell or "/bin/sh", workdir=workdir)
    if group:
        found = _getent(run, "group", group)
        if found is None and not group.isdigit():
            raise MachineError(f"no group {group!r} in {where}")
        login = dataclasses.replace(login, gid=int(found[2]) if found else int(group))
    return login


def _getent(run: Callable[[Sequence[str]], Result], database: str, key: str) -> list[str] | None:
    result = run(["getent", database, key])
    if result.returncode == GETENT_NOT_FOUND:
        return None
    if result.failed:
        raise MachineError(f"getent {database} {key} failed in the guest (status {result.returncode}): {result.stderr.strip()}")
    return result.stdout.splitlines()[0].split(":")
