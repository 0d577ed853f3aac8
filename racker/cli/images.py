"""The commands about stored images: pull, import, export, sbom, diff, push, images, rmi."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from racker import errors, machines, progress, sizes, store

if TYPE_CHECKING:
    pass

from racker.cli.options import Verb, add_pull_options, pull_options
from racker.cli.output import print_json, table


def cmd_pull(args: argparse.Namespace) -> int:
    from racker import images

    if args.refresh:
        done = images.refresh(args.image, **pull_options(args))
        if isinstance(done.error, errors.UpstreamUnreachable):
            progress.warn(f"{done.error}; kept the stored image, last reached {done.last_reached}")
        elif done.error is not None:
            raise done.error
        assert done.image is not None
        print(f"{done.image.name} {done.image.digest}")
        return 0
    image = images.pull(args.image, force=args.force, **pull_options(args))
    print(f"{image.name} {image.digest}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from pathlib import Path

    from racker import images

    image = images.import_image(args.name, Path(args.path))
    print(f"{image.name} {image.digest}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from racker import images
    from racker.sources import export

    print(export.export(images.find(args.image), Path(args.output), args.format))
    return 0


def cmd_sbom(args: argparse.Namespace) -> int:
    from racker import images
    from racker.store import sbom

    text = json.dumps(sbom.write(images.find(args.image), args.format), indent=2) + "\n"
    if args.output in (None, "-"):
        sys.stdout.write(text)
        return 0
    from pathlib import Path

    try:
        Path(args.output).write_text(text)
    except OSError as error:
        raise errors.RackerError(f"cannot write {args.output}: {error.strerror or error}") from None
    print(args.output)
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from racker import images
    from racker.store import diff

    found = diff.images(images.find(args.a), images.find(args.b))
    if args.json:
        print_json(found.as_json())
    else:
        print("\n".join(diff.lines(args.a, args.b, found)))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from racker import images
    from racker.sources import export

    print(export.push(images.find(args.image), args.destination, tls_verify=args.tls_verify))
    return 0


def _foreign_platform(image: store.StoredImage) -> str:
    """The platform a pulled image records, if it is not the host's ("" for the host's or none)."""
    from racker.store import platforms

    recorded = platforms.of_manifest(image.manifest)
    return str(recorded) if recorded is not None and recorded != platforms.host() else ""


def _last_checked(image: store.StoredImage) -> str:
    """When the image's upstream was last asked ("-": never, e.g. a local file's or a prepared image)."""
    return (image.manifest.get("upstream") or {}).get("checked") or "-"


def cmd_images(args: argparse.Namespace) -> int:
    from racker.store import platforms

    listed = store.images()
    if args.json:
        print_json(
            [
                dict(i.as_json(), platform=str(platforms.of_manifest(i.manifest) or ""), built=i.created, checked=_last_checked(i))
                for i in listed
            ]
        )
        return 0
    rows = [[i.name, i.short_digest, sizes.human(i.size), i.created, _last_checked(i), i.source] for i in listed]
    header = ["NAME", "DIGEST", "SIZE", "BUILT", "CHECKED", "SOURCE"]
    foreign = [_foreign_platform(i) for i in listed]
    if any(foreign):  # a column only when some image is not for this host
        rows = [[*row, platform] for row, platform in zip(rows, foreign, strict=True)]
        header.append("PLATFORM")
    table(rows, header)
    return 0


def cmd_rmi(args: argparse.Namespace) -> int:
    from racker import images
    from racker.vm import snapshots

    for name in args.images:
        image = images.find(name)
        users = machines.in_use(image.digest)
        if users and not args.force:
            names = ", ".join(s.name for s in users)
            raise errors.StoreError(f"image {image.name!r} is in use by {names}", hint="stop them first (racker stop NAME)")
        store.remove(image.name)
        if store.lookup(image.name) is None and not any(other.digest == image.digest for other in store.images()):
            snapshots.remove_image(image.digest)  # the image is gone: its VMs' saved states too
        print(f"removed {image.name} {image.digest}")
    return 0


def add_commands(verb: Verb, sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]

    p = verb("pull", cmd_pull, "build or fetch an image into the store")
    p.add_argument("image")
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    p.add_argument("--refresh", action="store_true", help="ask the image's upstream what it holds now; acquire again only if it moved")
    add_pull_options(p)

    p = verb("import", cmd_import, "store a root filesystem (a directory or a tarball) made by another tool")
    p.add_argument("name")
    p.add_argument("path", metavar="DIR|TARBALL")

    p = verb("export", cmd_export, "write an image as an OCI or docker archive (docker/podman load), or a root tarball (docker import)")
    p.add_argument("image")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--format", choices=["oci-archive", "docker-archive", "rootfs-tar"], default="oci-archive")

    p = verb("sbom", cmd_sbom, "write an image's software bill of materials (its packages) as SPDX or CycloneDX JSON")
    p.add_argument("image")
    p.add_argument("--format", choices=["spdx-json", "cyclonedx-json"], default="spdx-json")
    p.add_argument("-o", "--output", help="the file to write (default: standard output)")

    p = verb("diff", cmd_diff, "list the packages and files where two stored images differ")
    p.add_argument("a", metavar="IMAGE_A")
    p.add_argument("b", metavar="IMAGE_B")
    p.add_argument("--json", action="store_true")

    p = verb("push", cmd_push, "push an image to a registry: racker push IMAGE docker://HOST/NAME[:TAG]")
    p.add_argument("image")
    p.add_argument("destination")
    p.add_argument("--tls-verify", action=argparse.BooleanOptionalAction, default=True, help="(loopback registries: never)")

    p = verb("images", cmd_images, "list the images in the store")
    p.add_argument("--json", action="store_true")

    p = verb("rmi", cmd_rmi, "remove images from the store")
    p.add_argument("images", nargs="+")
    p.add_argument("--force", action="store_true", help="remove even while machines use it")
