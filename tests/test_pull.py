"""Pulling into the store for real: one build under concurrency, no network when present, clean failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import racker
from racker import store

pytestmark = pytest.mark.slow


def _store_is_empty() -> bool:
    home = store.home()
    leftovers = [p for p in (home / "tmp").iterdir() if p.name != ".new"] if (home / "tmp").exists() else []
    refs = list((home / "refs").glob("*.json")) if (home / "refs").exists() else []
    return not leftovers and not refs


def test_eight_concurrent_pulls_build_once(private_store: dict) -> None:
    pulls = [
        subprocess.Popen(
            [sys.executable, "-m", "racker", "--debug", "pull", "tiny"],
            env={**os.environ, **private_store},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    outputs = [p.communicate(timeout=900) for p in pulls]
    assert [p.returncode for p in pulls] == [0] * 8, [err for _out, err in outputs]
    digests = {out.split()[1] for out, _err in outputs}
    assert len(digests) == 1
    builds = sum("run: " in err and "mmdebstrap" in err for _out, err in outputs)
    assert builds == 1
    assert len(list((store.home() / "images").iterdir())) == 1
    assert list((store.home() / "tmp").glob("pull.*")) == []

    # Present: the next pull needs no network at all (a namespace without one proves it).
    offline = subprocess.run(
        ["unshare", "--net", sys.executable, "-m", "racker", "--debug", "pull", "tiny"],
        env={**os.environ, **private_store},
        capture_output=True,
        text=True,
    )
    assert offline.returncode == 0, offline.stderr
    assert "run: " not in offline.stderr
    assert offline.stdout.split()[1] in digests

    listed = json.loads(racker("images", "--json", env=private_store).stdout)
    assert [(i["name"], i["source"]) for i in listed] == [("tiny", "bootstrap:debian/bookworm")]
    assert listed[0]["size"] > 50_000_000

    removed = racker("rmi", "tiny", env=private_store)
    assert removed.returncode == 0, removed.stderr
    assert list((store.home() / "images").iterdir()) == []


def test_missing_tool_names_the_package_and_changes_nothing(private_store: dict) -> None:
    result = racker("pull", "tiny", env={**private_store, "RACKER_PATH": "/nonexistent"})
    assert result.returncode == 125
    # The bootstrap's first tool: gpgv verifies the archive's InRelease (its date) before mmdebstrap runs.
    assert result.stderr.splitlines()[0] == "racker: error: gpgv is not installed"
    assert "apt-get install gpgv" in result.stderr
    assert _store_is_empty()


def test_unknown_image_is_one_line_with_suggestions(private_store: dict) -> None:
    result = racker("pull", "tinny")
    assert result.returncode == 125
    assert result.stderr.strip() == "racker: error: unknown image 'tinny'; did you mean tiny?"


def test_bad_reference_is_one_line() -> None:
    result = racker("pull", "docker://UPPER/case")
    assert result.returncode == 125
    assert len(result.stderr.strip().splitlines()) == 1
    assert "malformed docker reference" in result.stderr


def _wait_for_build(timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rootfs = [p for p in (store.home() / "tmp").glob("pull.*/rootfs")] if (store.home() / "tmp").exists() else []
        if rootfs and any(rootfs[0].iterdir()):
            return rootfs[0].parent
        time.sleep(0.2)
    raise AssertionError("the build never started")


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{pid}: {cmdline}")
    return found


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_pull_leaves_nothing(private_store: dict, signum: int) -> None:
    pull = subprocess.Popen(
        [sys.executable, "-m", "racker", "pull", "tiny"], env={**os.environ, **private_store}, stderr=subprocess.PIPE, text=True
    )
    work = _wait_for_build()
    pull.send_signal(signum)
    _out, err = pull.communicate(timeout=60)
    assert pull.returncode == 128 + signum
    assert "interrupted" in err
    assert not work.exists()
    assert _processes_mentioning(str(work)) == []
    assert _store_is_empty()
    assert store.lookup("tiny") is None


def test_killed_pull_is_cleaned_by_gc(private_store: dict) -> None:
    pull = subprocess.Popen([sys.executable, "-m", "racker", "pull", "tiny"], env={**os.environ, **private_store})
    work = _wait_for_build()
    pull.kill()
    pull.wait()
    gc = racker("gc", env=private_store)
    assert gc.returncode == 0
    assert f"removed unfinished {work}" in gc.stdout
    assert _processes_mentioning(str(work)) == []
    assert _store_is_empty()
