"""Which sha256 a download must have, decided before a byte of it is trusted:

- pinned in the reference: `https://host/root.tar.xz#sha256=HEX`;
- else listed in the `SHA256SUMS` beside the URL (GNU `HEX  NAME` or BSD `SHA256 (NAME) = HEX` lines);
- with a keyring (`--keyring FILE`), that list must carry a good detached signature
  (`SHA256SUMS.gpg`, else `SHA256SUMS.asc`) by a key in it, checked with gpgv.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from racker import proc, redact
from racker.errors import BadReference, DownloadError, ToolFailed

SUMS = "SHA256SUMS"
SIGNATURES = (f"{SUMS}.gpg", f"{SUMS}.asc")
_HEX = re.compile(r"^[0-9a-f]{64}$")
_GNU = re.compile(r"^(?P<hex>[0-9a-fA-F]{64}) [ *](?P<name>.+)$")
_BSD = re.compile(r"^SHA256 \((?P<name>.+)\) = (?P<hex>[0-9a-fA-F]{64})$")

# fetch_small(url, missing_ok=…) -> bytes | None: download.fetch_small with the pull's transport settings.
Fetch = Callable[..., "bytes | None"]


# What each way of knowing a digest proves, as the manifest's `verified` says it: a SHA256SUMS
# from the server the file comes from catches a broken download, not a changed one.
WHAT_IT_PROVES = {
    "pin": "pinned sha256",
    "SHA256SUMS": f"integrity ({SUMS} from the same server)",
    "SHA256SUMS+gpg": "signed (keyring)",
}


@dataclass(frozen=True)
class Expected:
    sha256: str
    verified_by: str  # "pin", "SHA256SUMS", "SHA256SUMS+gpg"

    @property
    def verified(self) -> str:
        return WHAT_IT_PROVES[self.verified_by]

    @property
    def authentic(self) -> bool:
        """Whether the digest comes from elsewhere than the file's own server: a pin, or a signature."""
        return self.verified_by != "SHA256SUMS"


def split_pin(url: str) -> tuple[str, str | None]:
    """(the URL without its fragment, the pinned sha256 or None); BadReference for a fragment that is no pin."""
    base, sep, fragment = url.partition("#")
    if not sep:
        return url, None
    algorithm, _, value = fragment.partition("=")
    if algorithm != "sha256" or not _HEX.match(value.lower()):
        raise BadReference(f"{redact.url(url)!r}: the fragment must pin a digest as #sha256=<64 hex digits>")
    return base, value.lower()


def expected(url: str, pin: str | None, *, fetch: Fetch, keyring: Path | None, work: Path) -> Expected:
    """The digest `url`'s content must have; DownloadError if nothing vouches for it."""
    if keyring is None and pin is not None:
        return Expected(pin, "pin")
    sums_url = urllib.parse.urljoin(url, SUMS)  # with the URL's credentials: the same server's list
    shown, shown_sums = redact.url(url), redact.url(sums_url)
    sums = fetch(sums_url, missing_ok=True)
    if sums is None:
        if keyring is not None:
            raise DownloadError(f"--keyring was given, but there is no {SUMS} beside {shown} to check")
        raise DownloadError(
            f"nothing vouches for {shown}: no {SUMS} beside it and no digest pinned",
            hint="pin it: append #sha256=<its digest> to the URL",
        )
    how = SUMS
    if keyring is not None:
        _check_signature(sums_url, sums, keyring, fetch, work)
        how = f"{SUMS}+gpg"
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    listed = listed_digest(sums.decode(errors="replace"), name)
    if listed is None:
        raise DownloadError(f"{shown_sums} does not list {name}")
    if pin is not None and pin != listed:
        raise DownloadError(f"{shown}: the pinned sha256 {pin} differs from {listed} in {shown_sums}")
    return Expected(listed, how)


def listed_digest(text: str, name: str) -> str | None:
    """The sha256 a checksum list gives for the file `name`, or None."""
    for line in text.splitlines():
        match = _GNU.match(line.strip()) or _BSD.match(line.strip())
        if match and match["name"].removeprefix("./") == name:
            return match["hex"].lower()
    return None


def _check_signature(sums_url: str, sums: bytes, keyring: Path, fetch: Fetch, work: Path) -> None:
    for signature_name in SIGNATURES:
        signature = fetch(urllib.parse.urljoin(sums_url, signature_name), missing_ok=True)
        if signature is not None:
            break
    else:
        raise DownloadError(f"--keyring was given, but {redact.url(sums_url)} has no detached signature ({' or '.join(SIGNATURES)})")
    directory = work / "gpgv"
    directory.mkdir(mode=0o700)
    (directory / SUMS).write_bytes(sums)
    (directory / signature_name).write_bytes(signature)
    signed = [str(directory / signature_name), str(directory / SUMS)]
    argv = ["gpgv", "--homedir", str(directory), "--keyring", str(keyring.absolute()), *signed]
    try:
        proc.run(argv, timeout=60)
    except ToolFailed as failed:
        said = [line for line in failed.stderr.splitlines() if "BAD signature" in line or "No public key" in line or "Can't check" in line]
        reason = said[-1].removeprefix("gpgv: ") if said else "gpgv refused it"
        raise DownloadError(f"{redact.url(sums_url)}: its signature does not verify against {keyring} ({reason})") from None
