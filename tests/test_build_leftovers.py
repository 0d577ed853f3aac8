"""What of the build and of the build host a prepared image and its disks hold (issue 28).

The rules (racker.prepare.build_leftovers) on small trees; then a real prepared
debian-bookworm promoted to a disk and read back without a mount, as
`racker pull file:DISK` reads it (qemu-img, debugfs).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from racker import prepare, promote
from racker.prepare import build_leftovers
from racker.sources import fetched
from racker.store import refs

LEFT = {
    "run/lock/x": "",
    "run/systemd/resolve/resolv.conf": "nameserver 10.255.255.53\n",
    "tmp/build.log": "x",
    "var/tmp/y": "y",
    "var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_InRelease": "x",
    "var/lib/apt/lists/lock": "",
    "var/lib/apt/lists/partial/z": "",
    "var/lib/apt/lists/auxfiles/a": "",
    "var/cache/apt/pkgcache.bin": "x",
    "var/cache/apt/archives/partial/b.deb": "x",
    "var/cache/ldconfig/aux-cache": "x",
    "var/cache/man/index.db": "x",
    "var/cache/debconf/config.dat-old": "x",
    "etc/.resolv.conf.systemd-resolved.bak": "nameserver 10.255.255.53\n",
}
KEPT = {rel: "kept" for rel in build_leftovers.KEPT}


def tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_every_rule_finds_its_leftovers_and_remove_takes_them_and_keeps_run_time_caches(tmp_path: Path) -> None:
    root = tree(tmp_path / "root", {**LEFT, **KEPT, "boot/vmlinuz-6.1": "k", "etc/hostname.d/keep": "k"})
    os.symlink("boot/vmlinuz-6.1", root / "vmlinuz")
    os.symlink("boot/vmlinuz-6.1", root / "vmlinuz.old")
    (root / "initrd.img").write_text("an image's own file of that name, not a link: not the kernel package's")
    found = build_leftovers.found(root)
    assert all(found.values()), {name: paths for name, paths in found.items() if not paths}
    removed = build_leftovers.remove(root, keep=frozenset({"vmlinuz.old"}))
    assert "vmlinuz" in removed and "vmlinuz.old" not in removed
    assert not any(build_leftovers.found(root)[rule.name] for rule in build_leftovers.RULES if rule.name != "kernel links at /")
    assert build_leftovers.found(root)["kernel links at /"] == ["vmlinuz.old"]
    for rel in KEPT:
        assert (root / rel).read_text() == "kept", rel
    assert (root / "initrd.img").is_file() and (root / "etc/hostname.d/keep").is_file()
    for directory in ("run", "tmp", "var/lib/apt/lists", "var/cache/apt"):
        assert (root / directory).is_dir() and not list((root / directory).iterdir()), directory


def test_a_link_where_a_rule_expects_a_directory_is_not_followed(tmp_path: Path) -> None:
    outside = tree(tmp_path / "host", {"precious": "the host's", "lists/lock": "the host's"})
    root = tmp_path / "root"
    (root / "var/lib/apt").mkdir(parents=True)
    os.symlink(outside, root / "run")  # an image's /run -> the host's directory
    os.symlink(outside / "lists", root / "var/lib/apt/lists")
    assert not any(build_leftovers.found(root).values())
    build_leftovers.remove(root)
    assert (outside / "precious").read_text() == "the host's" and (outside / "lists/lock").exists()
    assert (root / "run").is_symlink()


def test_host_traces_find_the_hosts_resolver_names_proxy_and_ca(tmp_path: Path) -> None:
    ca = "-----BEGIN CERTIFICATE-----\n" + "QUJD" * 16 + "\n" + "REVG" * 10 + "\n-----END CERTIFICATE-----\n"
    etc = tree(
        tmp_path / "host-etc",
        {
            "resolv.conf": "nameserver 10.255.255.53\nnameserver 10.1.2.3\n",
            "hosts": "127.0.0.1 localhost\n127.0.1.1 buildbox.example buildbox\n",
        },
    )
    cas = tree(tmp_path / "cas", {"proxy.crt": ca})
    host = build_leftovers.this_host(etc, cas)
    assert host.resolvers == ("10.255.255.53", "10.1.2.3")
    assert {"buildbox", "buildbox.example"} <= set(host.names) and "localhost" not in host.names
    clean = {
        "etc/resolv.conf": "nameserver 10.255.255.530\n",  # another address, not this one
        "etc/sysctl.conf": "vm.swappiness = 1 buildbox.other\n",
        "usr/share/doc/x": "buildbox",  # documentation is not where a build records its host
        "etc/apt/apt.conf.d/70debconf": 'DPkg::Pre-Install-Pkgs {"/usr/sbin/dpkg-preconfigure --apt || true";};\n',
    }
    assert not any(build_leftovers.host_traces(tree(tmp_path / "clean", clean), host).values())
    dirty = {
        "etc/resolv.conf": "nameserver 10.1.2.3\n",
        "etc/mailname": "buildbox\n",
        "etc/apt/apt.conf.d/99proxy": 'Acquire::http::Proxy "http://10.0.0.1:3128";\n',
        "usr/local/share/ca-certificates/proxy.crt": ca,
    }
    assert build_leftovers.host_traces(tree(tmp_path / "dirty", dirty), host) == {
        "host resolver": ["etc/resolv.conf"],
        "host name": ["etc/mailname"],
        "apt proxy": ["etc/apt/apt.conf.d/99proxy"],
        "host CA": ["usr/local/share/ca-certificates/proxy.crt"],
    }


def test_prepare_drops_apt_proxy_lines_and_keeps_the_rest(tmp_path: Path) -> None:
    root = tree(
        tmp_path / "root",
        {"etc/apt/apt.conf.d/99mmdebstrap": 'Acquire::Check-Valid-Until "false";\nAcquire::https::Proxy "http://p:3128";\n'},
    )
    prepare.remove_build_leftovers(root)
    assert (root / "etc/apt/apt.conf.d/99mmdebstrap").read_text() == 'Acquire::Check-Valid-Until "false";\n'


@pytest.mark.slow
def test_a_promoted_disk_holds_nothing_of_the_build_or_the_build_host(share_image, tmp_path: Path) -> None:
    share_image("debian-bookworm")
    image = share_image("debian-bookworm", prepared=True)
    result = promote.promote(image, tmp_path / "disk.qcow2", promote.Options(fmt="qcow2", profile="digitalocean", size=2 * 1024**3))
    rootfs = tmp_path / "rootfs"
    fetched.acquire(refs.parse(f"file:{result.path}"), None, rootfs)  # qemu-img and debugfs: no mount
    left = {name: paths for name, paths in build_leftovers.found(rootfs).items() if paths}
    assert not left, f"build leftovers in the promoted disk: {left}"
    host = build_leftovers.this_host()
    assert host.resolvers, "this host lists no resolver: nothing to look for"
    traces = {name: paths for name, paths in build_leftovers.host_traces(rootfs, host).items() if paths}
    assert not traces, f"the build host ({host.resolvers}, {host.names}) in the promoted disk: {traces}"
    resolv = rootfs / "etc/resolv.conf"
    assert resolv.is_symlink() and os.readlink(resolv) == prepare.CLOUD_DNS, "expected resolv.conf to be resolved's list of DHCP's servers"
    assert (rootfs / "etc/systemd/system/sysinit.target.wants" / prepare.RESOLVED_UNIT).is_symlink()
    for rel in build_leftovers.KEPT:
        assert (rootfs / rel).is_file(), f"{rel} is needed at run time: {build_leftovers.KEPT[rel]}"


def test_resolv_conf_links_to_resolveds_list_or_is_empty_without_resolved(tmp_path: Path) -> None:
    root = tree(tmp_path / "with", {"etc/resolv.conf": "nameserver 10.255.255.53\n", f"lib/systemd/system/{prepare.RESOLVED_UNIT}": ""})
    prepare.cloud_dns(root)
    assert os.readlink(root / "etc/resolv.conf") == prepare.CLOUD_DNS
    bare = tree(tmp_path / "without", {"etc/resolv.conf": "nameserver 10.255.255.53\n"})
    prepare.cloud_dns(bare)
    assert not (bare / "etc/resolv.conf").is_symlink() and (bare / "etc/resolv.conf").read_text() == ""
