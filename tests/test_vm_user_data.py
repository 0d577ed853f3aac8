"""racker vm start|run --user-data FILE: more cloud-config for the VM's seed, as the library's VM(user_data=…)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import racker, racker_here
from racker import machines


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "cannot read --user-data {path}: No such file or directory"),
        ("write_files: []\n", "--user-data {path} is not cloud-config"),
        ("#cloud-config\nwrite_files: [\n", "--user-data {path} is not YAML: while parsing a flow node"),
        ("#cloud-config\n- a list\n", "--user-data {path} is not a cloud-config mapping (KEY: VALUE lines)"),
    ],
)
def test_bad_user_data_is_one_line_and_boots_nothing(text, message, tmp_path: Path, private_store) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "user-data.yaml"
    if text is not None:
        path.write_text(text)
    done = racker_here("vm", "run", "--user-data", str(path), "debian-bookworm", "--", "true")
    assert done.returncode == 125, done.stderr
    assert done.stderr.splitlines()[0] == "racker: error: " + message.format(path=path)
    assert len(done.stderr.splitlines()) <= 2  # the error and its hint
    assert not machines.all_states("qemu") and not os.path.exists(Path(private_store["RACKER_HOME"]) / "images")


def test_user_data_with_warm_is_one_line(tmp_path: Path, private_store) -> None:
    path = tmp_path / "user-data.yaml"
    path.write_text("#cloud-config\n{}\n")
    done = racker_here("vm", "start", "--warm", "--user-data", str(path), "debian-bookworm")
    assert done.returncode == 125 and done.stderr.splitlines()[0].startswith("racker: error: --user-data needs a cold boot"), done.stderr


@pytest.mark.slow
@pytest.mark.qemu
def test_vm_run_applies_the_user_data(tmp_path: Path) -> None:
    """One real boot: cloud-init writes the file the user-data names, and runs its runcmd."""
    path = tmp_path / "user-data.yaml"
    path.write_text(
        "#cloud-config\n"
        "write_files:\n  - path: /etc/from-user-data\n    content: written by cloud-init\n"
        "runcmd:\n  - [sh, -c, 'echo ran > /run/racker-runcmd']\n"
    )
    done = racker(
        "vm",
        "run",
        "--user-data",
        str(path),
        "debian-bookworm",
        "--",
        "sh",
        "-c",
        "cat /etc/from-user-data; echo; cat /run/racker-runcmd",
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["written by cloud-init", "ran"], done.stdout
