"""`racker diff A B`: the packages and files where two stored images differ, read from the store only."""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import racker, racker_here
from racker import store

STATUS = "Package: {name}\nStatus: install ok installed\nArchitecture: amd64\nVersion: {version}\n\n"


def _commit(
    name: str, packages: dict[str, str], files: dict[str, str], links: dict[str, str], modes: dict[str, int] | None = None
) -> store.StoredImage:
    with store.locked(f"image-{name}"), store.workdir("test") as work:
        root = work / "rootfs"
        (root / "var/lib/dpkg").mkdir(parents=True)
        (root / "var/lib/dpkg/status").write_text("".join(STATUS.format(name=n, version=v) for n, v in packages.items()))
        for rel, text in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        for rel, target in links.items():
            os.symlink(target, root / rel)
        for rel, mode in (modes or {}).items():
            os.chmod(root / rel, mode)
        return store.commit(name, root, source="test", recipe="test", manifest={"distro": {"id": "debian"}})


NIGHT_1 = ({"bash": "5.2.15-2", "zstd": "1.5.4", "gone": "1"}, {"etc/a": "a", "etc/b": "b", "etc/old": "x"}, {"etc/l": "a"})


def test_diff_lists_packages_and_files_that_differ(private_store: dict, tmp_path: Path) -> None:
    _commit("night-1", *NIGHT_1)
    _commit(
        "night-2",
        {"bash": "5.2.37-1", "zstd": "1.5.4", "new": "2"},
        {"etc/a": "a", "etc/b": "B", "etc/new": "y"},
        {"etc/l": "b"},
        {"etc/a": 0o600},
    )

    made = racker("diff", "night-1", "night-2", "--json")
    assert made.returncode == 0, made.stderr
    found = json.loads(made.stdout)
    assert found["packages"] == {
        "added": [{"manager": "dpkg", "name": "new", "version": "2", "arch": "amd64"}],
        "removed": [{"manager": "dpkg", "name": "gone", "version": "1", "arch": "amd64"}],
        "changed": [{"manager": "dpkg", "name": "bash", "version": "5.2.37-1", "arch": "amd64", "was": "5.2.15-2"}],
    }
    assert found["files"] == {
        "added": ["/etc/new"],
        "removed": ["/etc/old"],
        "changed": ["/etc/a (mode 644 → 600)", "/etc/b (content)", "/etc/l (link target)", "/var/lib/dpkg/status (content)"],
    }
    text = racker_here("diff", "night-1", "night-2").stdout
    assert "~ bash 5.2.15-2 → 5.2.37-1 (amd64, dpkg)" in text and "+ /etc/new" in text

    _commit("night-1-again", *NIGHT_1)
    same = racker_here("diff", "night-1", "night-1-again")
    assert same.returncode == 0 and same.stdout.strip() == "night-1 and night-1-again hold the same files and packages"

    missing = racker_here("diff", "night-1", "night-9")
    assert missing.returncode == 125 and missing.stderr.startswith("racker: error: ")
