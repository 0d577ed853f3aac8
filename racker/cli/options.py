"""What several commands share of their options: pulling an image on the way, a guest user."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from racker import errors

Verb = Callable[..., argparse.ArgumentParser]
USER_HELP = "run as this guest user: NAME, UID, NAME:GROUP or UID:GID (as docker's --user), with a login environment"


def pull_options(args: argparse.Namespace) -> dict:
    """images.pull's keywords from --platform and --insecure (add_pull_options)."""
    from pathlib import Path

    from racker.store import platforms

    keyring = Path(args.keyring).absolute() if args.keyring else None
    if keyring is not None and not keyring.is_file():
        raise errors.RackerError(f"--keyring {args.keyring}: no such file")
    return {"platform": platforms.parse(args.platform) if args.platform else None, "insecure": args.insecure, "keyring": keyring}


def add_pull_options(p: argparse.ArgumentParser) -> None:
    """--platform and --insecure, for every command that may pull its image."""
    p.add_argument(
        "--platform", metavar="OS/ARCH[/VARIANT]", help="the image of a multi-arch index to pull, e.g. linux/arm64 (default: the host's)"
    )
    p.add_argument("--insecure", action="store_true", help="let this pull's registry answer plain HTTP or unverified TLS")
    p.add_argument("--keyring", metavar="FILE", help="an OpenPGP keyring: a download's SHA256SUMS must be signed by a key in it (gpgv)")
