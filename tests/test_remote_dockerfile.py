"""dockerfile: remote Dockerfiles, from a git repository (served over dumb HTTP and git://) or by URL,
built with buildah FROM an image docker.io's mirror (a loopback registry) serves."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import free_port, pulled, racker
from racker import store
from racker.errors import BadReference
from racker.sources import remote_context
from racker.sources.remote_context import FetchFailed, GitTarget

# -- parsing (fast) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (
            "git+https://github.com/hashicorp/docker-consul.git:/0.X/Dockerfile#master",
            GitTarget("https://github.com/hashicorp/docker-consul.git", "0.X/Dockerfile", "master"),
        ),
        ("git+http://host:8080/a/b.git:/Dockerfile", GitTarget("http://host:8080/a/b.git", "Dockerfile", None)),
        ("git://host/repo.git:/sub/Dockerfile#v1.0", GitTarget("git://host/repo.git", "sub/Dockerfile", "v1.0")),
        ("ssh://git@host:2222/org/repo.git:/Dockerfile#0123abc", GitTarget("ssh://git@host:2222/org/repo.git", "Dockerfile", "0123abc")),
        (
            "git+ssh://git@host/org/repo:x/./Containerfile#feature/one",
            GitTarget("ssh://git@host/org/repo", "x/Containerfile", "feature/one"),
        ),
    ],
)
def test_a_git_target_splits_into_repository_path_and_ref(target: str, expected: GitTarget) -> None:
    assert remote_context.scheme_of(target) is not None
    assert remote_context.split_git(target) == expected


@pytest.mark.parametrize(
    ("target", "says"),
    [
        ("git+https://host/repo.git", "names no Dockerfile"),
        ("git+https://host/repo.git:/", "names no Dockerfile"),
        ("git+https://host/repo.git#main", "names no Dockerfile"),
        ("git+https://host/:/Dockerfile", "names no repository"),
        ("git+https://host", "names no host"),
        ("git+https://h/r.git:/../etc/Dockerfile", "leaves the repository"),
        ("git+https://h/r.git:/Dockerfile#", "names no ref"),
        ("git+https://h/r.git:/Dockerfile#--upload-pack=touch", "not a branch, tag or commit"),
        ("git+https://h/r.git:/Dockerfile#main:refs/heads/x", "not a branch, tag or commit"),
        ("git+https://h/r.git:/Dockerfile#+main", "not a branch, tag or commit"),
    ],
)
def test_a_malformed_git_target_is_one_bad_reference(target: str, says: str) -> None:
    with pytest.raises(BadReference, match=says) as raised:
        remote_context.split_git(target)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("target", ["path/to/dir", "/abs/dir#Other.dockerfile", "ftp://host/Dockerfile", "./odd://dir"])
def test_a_local_directory_is_not_remote(target: str) -> None:
    assert remote_context.scheme_of(target) is None


SOURCES_DOCKERFILE = """\
# escape=\\
# a comment: COPY not-this /x
FROM debian:bookworm AS base
RUN <<EOF
COPY inside-a-heredoc /x
EOF
COPY --chown=1:1 app.txt \\
  # a comment inside a continuation
  ./conf/../conf/a.conf /srv/
copy /abs.txt /srv/abs.txt
ADD https://example.org/file.tar /srv/
ADD ["json one.txt", "/srv/"]
COPY --from=base /etc/os-release /srv/
COPY <<-END /srv/heredoc
\tCOPY also-not-this /x
\tEND
COPY app.txt /srv/again
"""


def test_context_sources_are_the_relative_add_and_copy_paths() -> None:
    assert remote_context.context_sources(SOURCES_DOCKERFILE) == [
        ("COPY app.txt", "app.txt"),
        ("COPY ./conf/../conf/a.conf", "conf/a.conf"),
        ("COPY /abs.txt", "abs.txt"),
        ("ADD json one.txt", "json one.txt"),
        ("COPY app.txt", "app.txt"),
    ]


def test_the_escape_directive_changes_the_continuation_character() -> None:
    text = "# escape=`\nFROM scratch\nCOPY a.txt `\n  b.txt /\n"
    assert [path for _, path in remote_context.context_sources(text)] == ["a.txt", "b.txt"]


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("COPY *.txt /srv/", "is a glob"),
        ("COPY . /srv/", "is a directory"),
        ("ADD conf/ /srv/", "is a directory"),
        ("COPY $FILE /srv/", "uses a variable"),
        ("COPY ../secret /srv/", "leaves the build context"),
    ],
)
def test_a_source_http_cannot_fetch_as_one_file_is_refused(line: str, says: str) -> None:
    with pytest.raises(FetchFailed, match=says) as raised:
        remote_context.context_sources(f"FROM scratch\n{line}\n")
    assert str(raised.value).startswith(line.rsplit(" ", 1)[0])


# -- a repository served over dumb HTTP and git:// ------------------------------------

DOCKERFILE = "FROM debian:bookworm\nCOPY app.txt /srv/app.txt\n"
SUB_DOCKERFILE = "FROM debian:bookworm\nCOPY sub.txt /srv/sub.txt\n"
# By URL: a nested source, a JSON-form ADD, and a URL source buildah fetches itself. (No `COPY --from`:
# buildah 1.28 leaves a working container, and its mount, behind for a stage copied from.)
URL_DOCKERFILE = """\
FROM debian:bookworm
COPY app.txt conf/nested.txt /srv/
ADD ["conf/nested.txt", "/srv/again.txt"]
ADD {http}/files/conf/nested.txt /srv/by-url.txt
"""


def _git(*args: str, cwd: Path) -> str:
    argv = ["git", "-c", "user.name=racker", "-c", "user.email=racker@localhost", "-c", "init.defaultBranch=main", *args]
    return subprocess.run(argv, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _wait_for(port: int, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{server.args[0]} did not start") from None
            time.sleep(0.05)


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A repository (main: two commits, tag v1 on the first; branch feature: a third), its bare clone
    served over dumb HTTP beside plain files, and over git:// where git daemon is installed."""
    root = tmp_path_factory.mktemp("remote")
    work = root / "work"
    work.mkdir()
    _git("init", "--quiet", cwd=work)
    (work / "Dockerfile").write_text(DOCKERFILE)
    (work / "sub").mkdir()
    (work / "sub/Dockerfile").write_text(SUB_DOCKERFILE)
    (work / "sub/sub.txt").write_text("sub one\n")
    (work / "app.txt").write_text("one\n")
    _git("add", ".", cwd=work)
    _git("commit", "--quiet", "-m", "one", cwd=work)
    _git("tag", "-a", "v1", "-m", "version 1", cwd=work)
    (work / "app.txt").write_text("two\n")
    (work / "sub/sub.txt").write_text("sub two\n")
    _git("commit", "--quiet", "-am", "two", cwd=work)
    main = _git("rev-parse", "HEAD", cwd=work)
    _git("checkout", "--quiet", "-b", "feature", cwd=work)
    (work / "app.txt").write_text("feature\n")
    _git("commit", "--quiet", "-am", "feature", cwd=work)
    feature = _git("rev-parse", "HEAD", cwd=work)
    _git("checkout", "--quiet", "main", cwd=work)
    served = root / "served"
    served.mkdir()
    _git("clone", "--quiet", "--bare", str(work), str(served / "repo.git"), cwd=root)
    _git("update-server-info", cwd=served / "repo.git")
    files = served / "files"  # the Dockerfile by URL, and one whose ADD source is missing
    (files / "conf").mkdir(parents=True)
    port = free_port()
    (files / "Dockerfile").write_text(URL_DOCKERFILE.format(http=f"http://127.0.0.1:{port}"))
    (files / "app.txt").write_text("fetched by URL\n")
    (files / "conf/nested.txt").write_text("nested\n")
    (files / "Missing.dockerfile").write_text("FROM debian:bookworm\nADD not-there.txt /srv/\n")
    servers = []
    try:
        servers.append(subprocess.Popen(  # this Python: a `python3` on PATH may be a slow shim, or absent
            [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(served), str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
        _wait_for(port, servers[-1])
        found = {"http": f"http://127.0.0.1:{port}", "main": main, "feature": feature, "git": None}
        if subprocess.run(["git", "daemon", "-h"], capture_output=True).returncode != 127:
            git_port = free_port()
            servers.append(subprocess.Popen(
                ["git", "daemon", "--export-all", "--reuseaddr", f"--base-path={served}", "--listen=127.0.0.1", f"--port={git_port}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))  # fmt: skip
            _wait_for(git_port, servers[-1])
            found["git"] = f"git://127.0.0.1:{git_port}"
        yield found
    finally:
        for server in servers:
            server.terminate()
            server.wait(10)


@pytest.fixture
def offline_build(hub_mirror: dict, private_store: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in hub_mirror.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DOCKER_HOST", raising=False)  # buildah, not an engine


@pytest.mark.parametrize("transport", ["http", "git"])
@pytest.mark.parametrize(("ref", "content"), [("#v1", "one\n"), ("#feature", "feature\n"), ("#{feature}", "feature\n"), ("", "two\n")])
def test_each_kind_of_ref_fetches_its_commit(remote: dict, tmp_path: Path, transport: str, ref: str, content: str) -> None:
    """Ref resolution, over both transports, without a build: a tag (annotated), a branch, a commit, the default."""
    if remote[transport] is None:
        pytest.skip("git daemon is not installed")
    repository = f"{remote[transport]}/repo.git"
    ref = ref.format(**remote)
    local = remote_context.fetch(
        f"git+{repository}:/Dockerfile{ref}" if transport == "http" else f"{repository}:/Dockerfile{ref}", tmp_path
    )
    assert (local.context / "app.txt").read_text() == content
    assert local.dockerfile == local.context / "Dockerfile"
    assert local.fields == {
        "repository": repository,
        "ref": ref.removeprefix("#") or None,
        "commit": {"one\n": local.fields["commit"], "two\n": remote["main"], "feature\n": remote["feature"]}[content],
        "dockerfile": "/Dockerfile",
        "context": "/",
    }


@pytest.mark.slow
def test_each_remote_form_builds(remote: dict, offline_build: None) -> None:
    """One build per form (each unpacks a whole Debian, ~30 s), in one store so that buildah pulls the
    base image once: git+http by commit, git:// by tag from a subdirectory, and a Dockerfile URL."""
    by_commit = pulled(f"dockerfile:git+{remote['http']}/repo.git:/Dockerfile#{remote['feature']}")
    assert (by_commit.rootfs / "srv/app.txt").read_text() == "feature\n"
    build = by_commit.manifest["build"]
    assert (build["repository"], build["ref"], build["commit"]) == (f"{remote['http']}/repo.git", remote["feature"], remote["feature"])
    assert (build["dockerfile"], build["builder"]) == ("/Dockerfile", "buildah")

    if remote["git"]:
        sub = pulled(f"dockerfile:{remote['git']}/repo.git:/sub/Dockerfile#v1")
        assert (sub.rootfs / "srv/sub.txt").read_text() == "sub one\n"
        assert (sub.manifest["build"]["context"], sub.manifest["build"]["ref"]) == ("/sub", "v1")

    by_url = pulled(f"dockerfile:{remote['http']}/files/Dockerfile")
    srv = by_url.rootfs / "srv"
    assert (srv / "app.txt").read_text() == "fetched by URL\n"
    assert (srv / "nested.txt").read_text() == (srv / "again.txt").read_text() == (srv / "by-url.txt").read_text() == "nested\n"
    assert by_url.manifest["build"]["fetched"] == ["app.txt", "conf/nested.txt"]
    assert by_url.manifest["build"]["context"] == f"{remote['http']}/files/"
    tmp = store.home() / "tmp"
    assert list(tmp.rglob("*")) == [tmp / ".new"], "the checkouts and fetched contexts went with the pull's workdir"
    buildah = ["buildah", "--root", str(store.home() / "buildah/root"), "--runroot", str(store.home() / "buildah/run")]
    assert subprocess.run([*buildah, "containers", "--quiet"], capture_output=True, text=True, check=True).stdout == ""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("target", "says"),
    [
        ("git+{http}/missing.git:/Dockerfile", "cannot fetch the default branch from {http}/missing.git"),
        ("git+{http}/repo.git:/Dockerfile#no-such-branch", "cannot fetch 'no-such-branch' from {http}/repo.git"),
        ("git+{http}/repo.git:/nope/Dockerfile#v1", "no Dockerfile at /nope/Dockerfile in {http}/repo.git at v1"),
        ("{http}/files/Missing.dockerfile", "ADD not-there.txt: cannot fetch {http}/files/not-there.txt: HTTP 404"),
    ],
    ids=["no-repository", "no-ref", "no-dockerfile", "add-404"],
)
def test_a_remote_that_cannot_be_had_is_one_line_and_leaves_nothing(remote: dict, offline_build: None, target: str, says: str) -> None:
    result = racker("pull", "dockerfile:" + target.format(http=remote["http"]))
    assert result.returncode == 125, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("racker: error: " + says.format(http=remote["http"])), result.stderr
    assert len(lines) <= 2 and "Traceback" not in result.stderr
    assert store.images() == []
    tmp = store.home() / "tmp"
    assert list(tmp.rglob("*")) == [tmp / ".new"], "nothing left in the store's tmp/"
    if shutil.which("buildah"):
        buildah = ["buildah", "--root", str(store.home() / "buildah/root"), "--runroot", str(store.home() / "buildah/run")]
        left = subprocess.run([*buildah, "images", "--format", "{{.Name}}"], capture_output=True, text=True).stdout
        assert "racker-build" not in left
