"""Files from https:// (http:// only where the caller allows it) into the store's download cache:
streamed, resumed with HTTP Range after an interruption, checked against a sha256 before anyone reads them.

    downloads/sha256/HEX            finished files, named by content: a pinned digest found here is not fetched again
    downloads/partial/KEY           what an interrupted download of one URL got so far (KEY: sha256 of the URL),
    downloads/partial/KEY.json      kept across pulls, with the URL and the validator (ETag or Last-Modified)
                                    that makes a resumed request (If-Range) fall back to a full one if the file changed

TLS is verified against the system's CA store; SSL_CERT_FILE and SSL_CERT_DIR are honoured (OpenSSL reads them).
Disk images, Vagrant boxes and OVAs come through here too: this module knows URLs and bytes, not what they hold.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO

from racker import progress, redact, store
from racker.errors import DownloadError

CHUNK = 1 << 20
ATTEMPTS = 3  # connections per pull: an interrupted one is resumed from where it stopped
TIMEOUT = 60  # seconds a connection may stay silent
SMALL_LIMIT = 1 << 20  # a checksum list or signature larger than this is not one


class _Interrupted(Exception):
    """The connection broke mid-transfer: what arrived is kept and the next attempt resumes it."""


def cache_dir() -> Path:
    return store.home() / "downloads"


def cached(sha256: str) -> Path | None:
    """The finished download with this content, if the cache has it."""
    path = cache_dir() / "sha256" / sha256
    return path if path.is_file() else None


def forget(sha256: str) -> None:
    """Drop a cached download (its content turned out to be unusable)."""
    with contextlib.suppress(FileNotFoundError):
        (cache_dir() / "sha256" / sha256).unlink()


def lock_key(key: str) -> str:
    """The lock held while the download of one URL (KEY: sha256 of the URL) is written; gc waits for it."""
    return f"download-{key[:32]}"


def fetch(url: str, *, sha256: str | None, plain_ok: bool = False, title: str = "downloading") -> tuple[Path, str]:
    """(the cached file, its sha256) for `url`; with `sha256` given, a file of other content is refused.

    A digest already in the cache is not downloaded again. Otherwise up to ATTEMPTS connections,
    each resuming the last; if all break, what arrived stays for the next pull to resume.
    """
    check_scheme(url, plain_ok)
    if sha256 and (found := cached(sha256)):
        return found, sha256
    shown = redact.url(url)
    key = hashlib.sha256(shown.encode()).hexdigest()  # what is kept on disk names no secret
    partial_dir = cache_dir() / "partial"
    partial_dir.mkdir(parents=True, exist_ok=True)
    partial, meta = partial_dir / key, partial_dir / f"{key}.json"
    with store.locked(lock_key(key)):
        if sha256 and (found := cached(sha256)):
            return found, sha256  # another process finished it while we waited
        failure = ""
        for attempt in range(ATTEMPTS):
            if attempt:
                time.sleep(0.5 * attempt)
            try:
                digest = _transfer(url, partial, meta, plain_ok, title)
                break
            except _Interrupted as error:
                failure = str(error)
        else:
            raise DownloadError(
                f"downloading {shown} was interrupted {ATTEMPTS} times ({failure})",
                hint="what arrived is kept: pull again to resume",
            )
        if sha256 and digest != sha256:
            partial.unlink()
            meta.unlink(missing_ok=True)
            raise DownloadError(f"{shown} does not match its checksum: sha256 {digest}, expected {sha256}")
        target = cache_dir() / "sha256" / digest
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, target)
        meta.unlink(missing_ok=True)
        return target, digest


def fetch_small(url: str, *, plain_ok: bool = False, missing_ok: bool = False, timeout: float = TIMEOUT) -> bytes | None:
    """A small file (a checksum list, a signature) into memory; None where the server has none and `missing_ok`."""
    check_scheme(url, plain_ok)
    try:
        with _open(url, {}, plain_ok, timeout) as answer:
            data = answer.read(SMALL_LIMIT + 1)
    except DownloadError as error:
        if missing_ok and getattr(error, "status", None) in (403, 404, 410):
            return None
        raise
    except (OSError, http.client.HTTPException) as error:
        raise _unreachable(f"downloading {redact.url(url)} failed: {redact.text(str(error))}") from None
    if len(data) > SMALL_LIMIT:
        raise DownloadError(f"{redact.url(url)} is larger than {SMALL_LIMIT} bytes, too large for what it should be")
    return data


def check_scheme(url: str, plain_ok: bool) -> None:
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme == "https" or (scheme == "http" and plain_ok):
        return
    if scheme == "http":
        hint = "use https://, or pull with --insecure if you trust the network"
        raise DownloadError(f"{redact.url(url)} is plain HTTP, which anyone on the way can change", hint=hint)
    raise DownloadError(f"racker downloads https:// URLs, not {redact.url(url)}")


def _transfer(url: str, partial: Path, meta: Path, plain_ok: bool, title: str) -> str:
    """One connection: resume `partial` (or start it), return the whole file's sha256; _Interrupted if it breaks."""
    offset = partial.stat().st_size if partial.exists() else 0
    validator = _validator(meta, url) if offset else None
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    if offset and validator:
        headers["If-Range"] = validator
    try:
        answer = _open(url, headers, plain_ok)
    except DownloadError as error:
        if getattr(error, "status", None) == 416 and offset:  # what we kept is no prefix of the file now
            partial.unlink()
            return _transfer(url, partial, meta, plain_ok, title)
        raise
    with answer:
        resumed = answer.status == 206 and _range_start(answer) == offset
        if not resumed:
            offset = 0
            _write_validator(meta, url, answer)
        hasher = hashlib.sha256()
        if resumed:
            with open(partial, "rb") as kept:
                while chunk := kept.read(CHUNK):
                    hasher.update(chunk)
        length = answer.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        got = 0
        with open(partial, "ab" if resumed else "wb") as out, progress.meter(title, expected and offset + expected, offset) as bar:
            while True:
                try:
                    chunk = answer.read(CHUNK)
                except (OSError, http.client.HTTPException) as error:
                    raise _Interrupted(f"the connection broke after {offset + got} bytes: {error}") from None
                if not chunk:
                    break
                out.write(chunk)
                hasher.update(chunk)
                got += len(chunk)
                bar.add(len(chunk))
        if expected is not None and got < expected:
            raise _Interrupted(f"the connection closed after {offset + got} of {offset + expected} bytes")
        return hasher.hexdigest()


def unreachable(error: BaseException) -> bool:
    """Whether a DownloadError says the server did not answer (refused, timed out, a 5xx),
    not that its answer was wrong: a refresh keeps the stored image then."""
    return bool(getattr(error, "unreachable", False))


def _unreachable(message: str, status: int | None = None) -> DownloadError:
    failed = DownloadError(message)
    failed.unreachable = True  # type: ignore[attr-defined]
    if status is not None:
        failed.status = status  # type: ignore[attr-defined]
    return failed


def _open(url: str, headers: dict[str, str], plain_ok: bool, timeout: float = TIMEOUT) -> http.client.HTTPResponse:
    """The server's answer to a GET; DownloadError (with .status for an HTTP error) in one line otherwise.

    A URL's `user:password@` is sent as HTTP basic auth (as curl and pip do), never as part of the host."""
    url, credentials = redact.split_userinfo(url)
    headers = dict(headers)
    if credentials is not None:
        token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    shown = redact.url(url)
    host = urllib.parse.urlsplit(url).netloc
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ssl.create_default_context()), _RedirectHandler(plain_ok))
    try:
        return opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code >= 500:
            raise _unreachable(f"{shown}: the server answered {error.code} {error.reason}", error.code) from None
        failed = DownloadError(f"{shown}: the server answered {error.code} {error.reason}")
        failed.status = error.code  # type: ignore[attr-defined]
        raise failed from None
    except urllib.error.URLError as error:
        reason = error.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise DownloadError(
                f"{host}'s TLS certificate is not trusted ({reason.verify_message})",
                hint="add its CA to the system's store, or point SSL_CERT_FILE at a bundle that has it",
            ) from None
        if isinstance(reason, DownloadError):
            raise reason from None
        raise _unreachable(f"cannot download {shown}: {redact.text(str(reason))}") from None
    except (OSError, http.client.HTTPException) as error:
        raise _unreachable(f"cannot download {shown}: {redact.text(str(error))}") from None


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Redirects are followed, but never from https:// down to plain http:// unless allowed, and
    credentials go to the host they were given for only (as curl does)."""

    def __init__(self, plain_ok: bool) -> None:
        self.plain_ok = plain_ok

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if urllib.parse.urlsplit(newurl).scheme != "https" and not self.plain_ok:
            raise urllib.error.URLError(
                DownloadError(f"{redact.url(req.full_url)} redirects to {redact.url(newurl)}, which is not https://")
            )
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


def _range_start(answer: http.client.HTTPResponse) -> int | None:
    """Where a 206 answer's bytes start (Content-Range: bytes START-END/TOTAL)."""
    text = answer.headers.get("Content-Range", "")
    unit, _, rest = text.partition(" ")
    start = rest.split("-", 1)[0]
    return int(start) if unit == "bytes" and start.isdigit() else None


def _validator(meta: Path, url: str) -> str | None:
    try:
        record = json.loads(meta.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return record.get("validator") if record.get("url") == redact.url(url) else None


def _write_validator(meta: Path, url: str, answer: IO[bytes] | http.client.HTTPResponse) -> None:
    headers = answer.headers  # type: ignore[union-attr]
    validator = headers.get("ETag") if not (headers.get("ETag") or "").startswith("W/") else None
    store.write_json(meta, {"url": redact.url(url), "validator": validator or headers.get("Last-Modified")})
