"""A remote Dockerfile reference made into a local (build context, Dockerfile) pair.

Two forms, as `dockerfile:` targets:

    git+https://host[:port]/path/repo.git:/path/to/Dockerfile[#REF]   (also git+http, git, ssh, git+ssh)
        The path splits at the ':' after the repository. REF is a branch, tag or commit (default: the
        remote's default branch). Fetched shallow where the server allows it, into the store workdir;
        the context is the Dockerfile's directory in the checkout, so files keep git's modes.
    https://host/path/Dockerfile   (also http)
        The context is the Dockerfile's directory URL: every ADD/COPY source that is a relative path is
        fetched from there into a local context, keeping its relative path. Stage copies (--from=),
        URL sources (the builder fetches those) and heredocs need nothing. Directories and globs cannot
        be listed over HTTP, so they are refused; fetched files get mode 0644.

The image's recipe is the reference itself: a branch that moved since the image was built is built
again only with `racker pull --force`. The manifest records the commit actually built.
"""

from __future__ import annotations

import base64
import json
import os
import posixpath
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from racker import proc, progress, redact
from racker.errors import BadReference, RackerError

# dockerfile: URL scheme -> the scheme git is given
GIT_SCHEMES = {"git+https": "https", "git+http": "http", "git": "git", "ssh": "ssh", "git+ssh": "ssh"}
HTTP_SCHEMES = ("https", "http")
GIT_FORM = "git+https://HOST/REPOSITORY.git:/PATH/TO/Dockerfile[#BRANCH|TAG|COMMIT]"

FETCH_TIMEOUT = 900  # a whole repository, when the server cannot send a shallow one
HTTP_TIMEOUT = 60
DOCKERFILE_LIMIT = 1 << 20

# A ref git takes as one name, never as an option or a refspec ("a:b" would write a local ref, "+a" force it).
_REF = re.compile(r"^(?![-+])(?!.*\.\.)[A-Za-z0-9._/+-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{4,40}$")
# What git may pass on from the caller's environment: where ssh keys and agents are, and proxies.
_PASSED_ON = ("HOME", "SSH_AUTH_SOCK", "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


class FetchFailed(RackerError):
    """A remote repository, Dockerfile or build-context file could not be fetched."""


@dataclass(frozen=True)
class GitTarget:
    repository: str  # the URL git fetches from
    path: str  # the Dockerfile, relative to the repository's root
    ref: str | None  # None: the remote's default branch


@dataclass(frozen=True)
class Local:
    """The local build context and Dockerfile, and the manifest fields saying where they came from."""

    context: Path
    dockerfile: Path
    fields: dict


def scheme_of(target: str) -> str | None:
    """The remote scheme of a `dockerfile:` target, or None for a local directory."""
    scheme, sep, _ = target.partition("://")
    return scheme if sep and (scheme in GIT_SCHEMES or scheme in HTTP_SCHEMES) else None


def fetch(target: str, work: Path) -> Local:
    """Make the remote Dockerfile `target` local, inside `work` (which its caller removes)."""
    work.mkdir(parents=True, exist_ok=True)
    if scheme_of(target) in HTTP_SCHEMES:
        return from_url(target, work)
    return from_git(split_git(target), work)


# -- git ----------------------------------------------------------------------


def split_git(target: str) -> GitTarget:
    """`SCHEME://HOST/REPO:/PATH/TO/Dockerfile[#REF]` as the repository git fetches, the path and the ref."""
    spec, hashed, ref = target.partition("#")
    scheme, _, rest = spec.partition("://")
    authority, slash, path = rest.partition("/")
    repository, colon, dockerfile = path.partition(":")
    parts = [p for p in dockerfile.split("/") if p not in ("", ".")]
    bad = (
        "it names no host" if not authority or not slash else
        "it names no repository" if not repository else
        "it names no Dockerfile: put ':/PATH/TO/Dockerfile' after the repository" if not colon or not parts else
        "its Dockerfile path leaves the repository" if ".." in parts else
        "it names no ref after '#'" if hashed and not ref else
        f"{ref!r} is not a branch, tag or commit name" if ref and not _REF.match(ref) else
        None
    )  # fmt: skip
    if bad:
        raise BadReference(f"dockerfile:{redact.text(target)}: {bad}", hint=f"expected dockerfile:{GIT_FORM}")
    return GitTarget(f"{GIT_SCHEMES[scheme]}://{authority}/{repository}", "/".join(parts), ref or None)


def _git(*args: str, cwd: Path, timeout: float = 60) -> proc.Result:
    env = {key: os.environ[key] for key in _PASSED_ON if key in os.environ}
    # Fail instead of asking: no terminal prompt for a password, no ssh prompt for a passphrase or host key.
    env |= {"GIT_TERMINAL_PROMPT": "0", "GIT_SSH_COMMAND": "ssh -o BatchMode=yes"}
    return proc.run(["git", *args], cwd=str(cwd), env=env, timeout=timeout, check=False)


def from_git(spec: GitTarget, work: Path) -> Local:
    checkout = work / "checkout"
    checkout.mkdir()
    wanted = spec.ref or "HEAD"
    with progress.step(f"fetching {wanted} from {redact.url(spec.repository)}"):
        for setup in (["init", "--quiet"], ["remote", "add", "origin", spec.repository]):
            done = _git(*setup, cwd=checkout)
            if done.failed:
                _raise_git(spec, _last_line(done.stderr))
        commit = _fetch_commit(spec, wanted, checkout)
        checked = _git("-c", "advice.detachedHead=false", "checkout", "--quiet", commit, cwd=checkout)
        if checked.failed:
            _raise_git(spec, _last_line(checked.stderr))
    dockerfile = checkout / spec.path
    inside = all(p.resolve().is_relative_to(checkout.resolve()) for p in (dockerfile, dockerfile.parent))  # symlinks
    if not inside or not dockerfile.is_file():
        at = f"{spec.ref or 'its default branch'} ({commit[:12]})"
        raise BadReference(f"no Dockerfile at /{spec.path} in {redact.url(spec.repository)} at {at}")
    fields = {"repository": redact.url(spec.repository), "ref": spec.ref, "commit": commit, "dockerfile": f"/{spec.path}"}
    return Local(dockerfile.parent, dockerfile, dict(fields, context=f"/{posixpath.dirname(spec.path)}"))


def _fetch_commit(spec: GitTarget, wanted: str, checkout: Path) -> str:
    """The commit `wanted` names, fetched: shallow first; whole where the server cannot send a shallow
    fetch (dumb HTTP) or will not send a commit by its hash (an abbreviated one, or a strict server)."""
    attempts = [["--depth", "1", "origin", wanted], ["origin", wanted]]
    if _COMMIT.match(wanted):
        attempts.append(["--tags", "origin", "+refs/heads/*:refs/remotes/origin/*"])
    error = "git fetch failed"
    for number, attempt in enumerate(attempts, 1):
        fetched = _git("fetch", "--quiet", *attempt, cwd=checkout, timeout=FETCH_TIMEOUT)
        if fetched.failed:
            error = _last_line(fetched.stderr)
            continue
        name = "FETCH_HEAD" if number < 3 else wanted
        resolved = _git("rev-parse", "--verify", "--quiet", f"{name}^{{commit}}", cwd=checkout)
        if resolved.succeeded:
            return resolved.stdout.strip()
        error = f"no commit {wanted} there"
    _raise_git(spec, error)


def _raise_git(spec: GitTarget, error: str) -> NoReturn:
    what = f"{spec.ref!r}" if spec.ref else "the default branch"
    raise FetchFailed(
        f"cannot fetch {what} from {redact.url(spec.repository)}: {redact.text(error)}",
        hint="check the repository URL and the branch, tag or commit; a private repository needs credentials git can use without asking",
    )


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].removeprefix("fatal: ") if lines else "git failed"


# -- a Dockerfile by URL ------------------------------------------------------


def from_url(url: str, work: Path) -> Local:
    shown = redact.url(url)
    if url.endswith("/") or not urllib.parse.urlsplit(url).path.strip("/"):
        raise BadReference(f"dockerfile:{shown}: names no Dockerfile", hint="expected dockerfile:https://HOST/PATH/Dockerfile")
    directory_url = url.rsplit("/", 1)[0] + "/"
    with progress.step(f"fetching {shown}"):
        text = _get(url, f"the Dockerfile {shown}", limit=DOCKERFILE_LIMIT).decode("utf-8", "replace")
        dockerfile = work / "Dockerfile"  # beside the context, never in it: a source may be named Dockerfile too
        dockerfile.write_text(text)
        context = work / "context"
        context.mkdir()
        fetched = []
        for directive, source in context_sources(text):
            source_url = urllib.parse.urljoin(directory_url, urllib.parse.quote(source))
            destination = context / source
            if destination.exists():
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(_get(source_url, directive, directory=True))
            fetched.append(source)
    return Local(context, dockerfile, {"dockerfile": shown, "context": redact.url(directory_url), "fetched": fetched})


def _get(url: str, what: str, *, limit: int | None = None, directory: bool = False) -> bytes:
    """GET `url` (HTTPS verified); FetchFailed naming `what` if it cannot be had, or is a directory.
    A URL's `user:password@` is sent as basic auth, never shown."""
    url, credentials = redact.split_userinfo(url)
    headers = {"User-Agent": "racker"}
    if credentials is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
    request = urllib.request.Request(url, headers=headers)
    url = redact.url(url)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as answer:
            if directory and answer.geturl().endswith("/") and not url.endswith("/"):
                raise FetchFailed(f"{what}: {url} is a directory, which cannot be fetched over HTTP")
            body = answer.read(limit + 1 if limit else -1)
    except urllib.error.HTTPError as error:
        raise FetchFailed(f"{what}: cannot fetch {url}: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise FetchFailed(f"{what}: cannot fetch {url}: {redact.text(str(reason))}") from None
    if limit and len(body) > limit:
        raise FetchFailed(f"{what}: {url} is larger than {limit} bytes; is it a Dockerfile?")
    return body


# -- which files a Dockerfile's ADD and COPY read from the context -----------------

_HEREDOC = re.compile(r"<<(-?)([\"']?)([A-Za-z_][A-Za-z0-9_]*)\2")
_GLOB = re.compile(r"[*?\[]")


def context_sources(text: str) -> list[tuple[str, str]]:
    """(directive, path) for every ADD/COPY source read from the build context, the path relative to it.
    A source that cannot be fetched as one file (a directory, a glob, a variable) is FetchFailed."""
    sources = []
    for instruction, arguments in instructions(text):
        if instruction not in ("ADD", "COPY"):
            continue
        words = _words(arguments)
        flags = [w for w in words if w.startswith("--")]
        paths = [w for w in words if not w.startswith("--")]
        if any(flag.startswith("--from=") for flag in flags) or len(paths) < 2:
            continue  # a stage or image copy; or malformed, which the builder reports
        for source in paths[:-1]:
            relative = _context_path(instruction, source)
            if relative is not None:
                sources.append((f"{instruction} {source}", relative))
    return sources


def _context_path(instruction: str, source: str) -> str | None:
    """The context-relative file a source names; None for what the builder gets itself."""
    if source.startswith("<<") or "://" in source or (instruction == "ADD" and source.startswith("git@")):
        return None
    where = f"{instruction} {source}"
    normal = posixpath.normpath(source.lstrip("/"))
    bad = (
        "uses a variable, which cannot be resolved before the build" if "$" in source else
        "is a glob, which cannot be listed over HTTP" if _GLOB.search(source) else
        "is a directory, which cannot be fetched over HTTP" if normal == "." or source.endswith("/") else
        "leaves the build context" if normal.startswith("..") else
        None
    )  # fmt: skip
    if bad:
        raise FetchFailed(f"{where}: the source {bad}", hint="build from a git repository instead: dockerfile:git+https://…")
    return normal


def _words(arguments: str) -> list[str]:
    """An ADD/COPY argument list: flags, then a JSON array or whitespace-separated words."""
    words = arguments.split()
    flags = []
    while words and words[0].startswith("--"):
        flags.append(words.pop(0))
    rest = " ".join(words)
    if rest.startswith("["):
        try:
            parsed = json.loads(rest)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, list) and all(isinstance(p, str) for p in parsed):
            return flags + parsed
    return flags + words


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction: continuation lines joined, comments and heredoc
    bodies skipped (a `COPY` inside a `RUN <<EOF` body is shell, not an instruction)."""
    lines = text.splitlines()
    escape = _escape_character(lines)
    found = []
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = []
        while line.rstrip().endswith(escape) and index < len(lines):
            parts.append(line.rstrip()[:-1])
            line = lines[index]
            index += 1
            while line.lstrip().startswith("#") and index < len(lines):  # comments inside a continuation
                line = lines[index]
                index += 1
        parts.append(line)
        instruction, _, arguments = " ".join(parts).strip().partition(" ")
        for heredoc in _HEREDOC.finditer(arguments):
            strip_tabs, terminator = heredoc[1] == "-", heredoc[3]
            while index < len(lines) and (lines[index].lstrip("\t") if strip_tabs else lines[index]) != terminator:
                index += 1
            index += 1
        found.append((instruction.upper(), arguments.strip()))
    return found


def _escape_character(lines: list[str]) -> str:
    """The `# escape=` parser directive, if the Dockerfile starts with one; else a backslash."""
    for line in lines:
        match = re.match(r"^#\s*([a-zA-Z]+)\s*=\s*(\S+)\s*$", line.strip())
        if not match:
            break
        if match[1].lower() == "escape":
            return match[2]
    return "\\"
