"""The host-side code that reaches into image trees, on small hostile trees: nothing outside is touched.

No root and nothing booted: the trees are made in tmp_path, with links (absolute,
relative, `..` chains) where prepare, promote's profiles and stage, distros.detect
and the app and vagrant steps read, write or delete. The real images get the same
treatment in test_hostile_images.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_imagetree import sentinel

from conftest import tree_checksum
from racker import prepare
from racker.errors import PrepareError, PromoteError
from racker.promote import app, profiles
from racker.promote import stage as stage_tree
from racker.store import distros

STYLES = ("absolute", "relative", "dotdot")


def _target(root: Path, rel: str, host: Path, style: str) -> str:
    if style == "absolute":
        return str(host)
    up = "../" * rel.count("/")
    if style == "relative":
        return up + "../" * (len(root.parts) + 2) + str(host).lstrip("/")
    return up + "../.." + "/.." * 20 + str(host)


def hostile_tree(tmp_path: Path, style: str, links: dict[str, str], *, mirror: bool = False) -> tuple[Path, Path]:
    """A small Debian-looking tree with `links` (path: "dir" or a host file's name) pointing at the sentinel.

    With `mirror`, the tree has a directory at the sentinel's path too, so that the links
    resolve inside it and every step goes through (on the host they would reach the sentinel)."""
    host = sentinel(tmp_path)
    for name in ("ssh_host_ed25519_key", "x_y", "a.cfg", "b.network", "c.log", "keep.bin"):
        (host / name).write_text(f"SECRET {name}\n")
    root = tmp_path / "image"
    for directory in ("etc/ssh", "usr/lib/systemd/system", "var/lib/apt", "var/cache", "var/log", "boot", "usr/bin", "lib/modules/6.1"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "etc/os-release").write_text('ID=debian\nPRETTY_NAME="Debian"\n')
    (root / "usr/bin/apt-get").write_text("")
    if mirror:
        inside = root / str(host).lstrip("/")
        for path in sorted(host.rglob("*")):
            copy = inside / path.relative_to(host)
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.mkdir() if path.is_dir() else copy.write_text("inside\n")
    for rel, kind in links.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        elif path.exists():
            path.unlink()
        target = _target(root, rel, host, style)
        path.symlink_to(target if kind == "dir" else f"{target}/{kind}")
    return root, host


@pytest.mark.parametrize("style", STYLES)
def test_prepare_leaves_the_host_alone(tmp_path: Path, style: str, monkeypatch: pytest.MonkeyPatch) -> None:
    links = {
        "var/lib/apt/lists": "dir",
        "var/cache/apt": "dir",
        "var/log/apt": "dir",
        "etc/ssh": "dir",
        "etc/machine-id": "passwd",
        "var/lib/dbus/machine-id": "passwd",
        "var/lib/cloud": "dir",
        "etc/hostname": "passwd",
        "etc/resolv.conf": "passwd",
        "usr/sbin/policy-rc.d": "passwd",
        "etc/systemd/system-generators": "dir",
        "etc/cloud/cloud.cfg.d": "dir",
    }
    root, host = hostile_tree(tmp_path, style, links, mirror=True)
    before = tree_checksum(host)
    prepare.remove_leftovers(root)
    assert tree_checksum(host) == before, "remove_leftovers reached the host"
    saved = prepare._save_link_or_file(prepare.imagetree.Tree(root), "etc/resolv.conf")
    prepare._restore_link_or_file(prepare.imagetree.Tree(root), "etc/resolv.conf", saved)
    monkeypatch.setattr(prepare, "in_container", lambda *a, **k: None)  # systemctl inside: not this test's business
    inside = root / str(host).lstrip("/")
    written: list[bool] = []
    cleanup = prepare.remove_build_leftovers

    def seen_then_cleaned(rootfs: Path, own_links: frozenset[str] = frozenset()) -> None:
        # The mirror of the host's directory is under the image's /tmp (pytest's tmp_path), which the
        # build's cleanup empties: look at what configure wrote there before it does.
        written.append((inside / "50-racker.conf").exists() or (inside / "sshd_config.d/50-racker.conf").exists())
        assert not (inside / "x_y").exists() and not (inside / "ssh_host_ed25519_key").exists()  # removed inside
        cleanup(rootfs, own_links)

    monkeypatch.setattr(prepare, "remove_build_leftovers", seen_then_cleaned)
    prepare.configure(root)
    assert tree_checksum(host) == before
    assert written == [True], "the sshd drop-in was not written inside the image"


def test_a_link_to_nowhere_inside_is_one_line(tmp_path: Path) -> None:
    root, _host = hostile_tree(tmp_path, "absolute", {"etc/cloud/cloud.cfg.d": "dir"})
    with pytest.raises(PrepareError, match=r"cannot write /etc/cloud/cloud\.cfg\.d/90-racker\.cfg in the image"):
        prepare.write_file(root, "etc/cloud/cloud.cfg.d/90-racker.cfg", "x")


@pytest.mark.parametrize("style", STYLES)
def test_reading_an_image_reads_only_the_image(tmp_path: Path, style: str) -> None:
    links = {
        "etc/os-release": "passwd",
        "etc/passwd": "passwd",
        "etc/shadow": "passwd",
        "root": "dir",
        "etc/apt/sources.list.d": "dir",
        "etc/systemd/network": "dir",
        "var/log": "dir",
        "boot/vmlinuz-6.1": "keep.bin",
        "boot/initrd.img-6.1": "keep.bin",
        "lib/modules/6.1/modules.builtin": "passwd",
    }
    root, host = hostile_tree(tmp_path, style, links)
    before = tree_checksum(host)
    assert distros.detect(root).id == "unknown"  # the host's os-release is not the image's
    with pytest.raises(PrepareError):
        prepare.find_kernel(root)  # the links lead nowhere inside: no kernel
    for profile in profiles.PROFILES.values():
        for result in profiles.verify_tree(profile, root):
            assert "SECRET" not in result.detail
    spec = app.AppSpec(("passwd",), (("PATH", "/boot:/root"),), "/", "", "", "", None)
    with pytest.raises(PromoteError):
        app.resolved(spec, root)
    assert tree_checksum(host) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="stage keeps the overlay's owners: chown needs root")
@pytest.mark.parametrize("style", STYLES)
def test_staging_the_overlay_stays_inside(tmp_path: Path, style: str) -> None:
    root, host = hostile_tree(tmp_path, style, {"home": "dir", "boot/grub": "dir"}, mirror=style != "dotdot")
    overlay = tmp_path / "overlay"
    for rel in ("home/vagrant/.ssh", "etc/sudoers.d", "boot/grub"):
        (overlay / rel).mkdir(parents=True)
    (overlay / "home/vagrant/.ssh/authorized_keys").write_text("key\n")
    (overlay / "etc/sudoers.d/vagrant").write_text("rule\n")
    (overlay / "boot/grub/grub.cfg").write_text("menu\n")
    before = tree_checksum(host)
    try:
        stage_tree(root, tmp_path / "tree", overlay)
    except PromoteError as error:
        assert style == "dotdot", error  # no mirror: a link to a directory the image lacks, refused in one line
    assert tree_checksum(host) == before


@pytest.mark.parametrize("style", STYLES)
def test_build_mount_points_are_removed_inside_only(tmp_path: Path, style: str) -> None:
    """buildah's empty mount points go; a path through a link (to the host) is left alone."""
    from racker.sources import build_mounts

    root, host = hostile_tree(tmp_path, style, {"run": "dir"})
    (host / "empty").mkdir()
    (host / "zero").write_text("")
    (root / "data/volume").mkdir(parents=True)
    before = tree_checksum(host)
    removed = build_mounts.clean(root, ["/run/empty", "/run/zero", "/data/volume"], since=0)
    assert removed == ["/data/volume", "/data"]
    assert tree_checksum(host) == before
