"""What of the build and of the build host a promoted disk holds, for each format and profile.

IMAGE+vm (prepared in the current store, RACKER_HOME) is promoted to every
format (raw, qcow2, vmdk, vhd, vhdx, vdi, gce, firecracker, ova, the Vagrant
boxes) with the generic profile, and to each cloud's format with its profile
(qcow2 digitalocean, gce gcp, vhd azure). Each disk is read back as a user's
`racker pull file:DISK` reads it (qemu-img, debugfs: no mount), and the rules
of racker.prepare.build_leftovers are run over its files: what the build left
(build_leftovers.RULES) and what of this host (its resolvers, names, apt
proxy, local CAs). Prints a Markdown table: a count per rule, and the paths.

    RACKER_HOME=... python bench/build_leftovers.py [--image debian-bookworm] [--only raw,qcow2]

To compare with another commit, run it from that commit's worktree (its prepare
makes its own IMAGE+vm in the store given).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from racker import images, prepare, promote
from racker.prepare import build_leftovers
from racker.sources import fetched
from racker.store import refs

CASES = [
    *(
        (fmt, "generic")
        for fmt in ("raw", "qcow2", "vmdk", "vhd", "vhdx", "vdi", "gce", "firecracker", "ova", "vagrant-libvirt", "vagrant-virtualbox")
    ),
    ("qcow2", "digitalocean"),
    ("gce", "gcp"),
    ("vhd", "azure"),
]
SIZE = 2 * 1024**3


def read_back(disk: Path, work: Path) -> Path:
    """The disk's root filesystem, as `racker pull file:DISK` reads it (debugfs, no mount)."""
    rootfs = work / "rootfs"
    fetched.acquire(refs.parse(f"file:{disk}"), None, rootfs)
    return rootfs


def measure(image, fmt: str, profile: str, host: build_leftovers.Host) -> tuple[dict[str, list[str]], float]:  # type: ignore[no-untyped-def]
    with tempfile.TemporaryDirectory(prefix="racker-bench-leftovers-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        started = time.monotonic()
        result = promote.promote(
            image, work / f"disk{promote.formats.get(fmt).suffix}", promote.Options(fmt=fmt, size=SIZE, profile=profile)
        )
        rootfs = read_back(result.path, work)
        found = build_leftovers.found(rootfs) | build_leftovers.host_traces(rootfs, host)
        return found, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="debian-bookworm")
    parser.add_argument("--only", default="", help="comma-separated formats")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    host = build_leftovers.this_host()
    print(f"host: resolvers {', '.join(host.resolvers)}; names {', '.join(host.names)}; {len(host.cas)} local CA(s)", file=sys.stderr)
    rows = []
    for fmt, profile in CASES:
        if only and fmt not in only:
            continue
        kernel = prepare.kernel_for(promote.formats.get(fmt).drivers)
        image = prepare.prepare(images.pull(args.image), kernel=kernel)
        found, seconds = measure(image, fmt, profile, host)
        rows.append((fmt, profile, found))
        print(f"{fmt} {profile}: {sum(map(len, found.values()))} found in {seconds:.0f} s", file=sys.stderr)
    names = list(rows[0][2]) if rows else []
    print("| format | profile | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for fmt, profile, found in rows:
        print(f"| {fmt} | {profile} | " + " | ".join(str(len(found[n])) for n in names) + " |")
    paths = sorted({p for _fmt, _profile, found in rows for n in names for p in found[n]})
    print("\nfound: " + (", ".join(paths) if paths else "nothing"))


if __name__ == "__main__":
    main()
