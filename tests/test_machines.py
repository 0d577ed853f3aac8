"""Real nspawn boots of every catalogue image, and exec semantics through the CLI."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest

from conftest import CATALOG_IMAGES, racker
from racker import images, machines
from racker.errors import NameTaken
from racker.machines.nspawn import Machine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session", params=CATALOG_IMAGES)
def image(request: pytest.FixtureRequest):
    return images.pull(request.param)


@pytest.fixture(scope="session")
def bookworm():
    return images.pull("debian-bookworm")


def test_image_boots_to_running_without_failed_units(image) -> None:
    with Machine(image) as machine:
        state = machine.run(["systemctl", "is-system-running"])
        failed = machine.run(["systemctl", "--failed", "--no-legend", "--plain"]).stdout
        assert state.stdout.strip() == "running", f"failed units:\n{failed}"
        assert machine.run(["hostname"]).stdout.strip() == machine.name
        assert machine.run_expect([0], ["systemctl", "is-enabled", "ssh"]).stdout.strip() == "enabled"
        assert image.manifest["distro"]["id"] == "debian"
    assert not image.rootfs.joinpath("etc/hostname").exists(), "the image itself was written to"


def test_run_passes_exit_code_streams_and_stdin(bookworm) -> None:
    result = racker("run", "--rm", "debian-bookworm", "--", "sh", "-c", "cat; echo to-err >&2; exit 42", input="from-stdin\n")
    assert result.returncode == 42
    assert result.stdout == "from-stdin\n"
    assert result.stderr == "to-err\n"


def test_command_not_found_is_127_with_a_message(bookworm) -> None:
    result = racker("run", "debian-bookworm", "--", "no-such-command")
    assert result.returncode == 127
    assert "no-such-command" in result.stderr and "No such file" in result.stderr


def _on_a_terminal(argv: list[str], keys: bytes = b"", timeout: float = 60) -> tuple[int, str]:
    """Run argv with a pseudo-terminal as stdin/stdout, type `keys`, return (status, screen)."""
    main, secondary = pty.openpty()
    child = subprocess.Popen(argv, stdin=secondary, stdout=secondary, stderr=secondary, env={**os.environ, "TERM": "xterm"})
    os.close(secondary)
    output = b""
    deadline = time.monotonic() + timeout
    typed = False
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(main, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                output += chunk
                if keys and not typed and (b"#" in output or b"$" in output):
                    os.write(main, keys)
                    typed = True
            elif child.poll() is not None:
                break
        status = child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        os.close(main)
    return status, output.decode(errors="replace")


def test_tty_is_a_terminal_inside_the_machine(bookworm) -> None:
    status, screen = _on_a_terminal([sys.executable, "-m", "racker", "run", "-t", "debian-bookworm", "--", "tty"])
    assert status == 0, screen
    assert "/dev/pts/" in screen


def test_start_exec_ps_shell_stop(bookworm) -> None:
    name = f"t-{os.getpid()}"
    started = racker("start", "debian-bookworm", "--name", name)
    assert started.returncode == 0, started.stderr
    try:
        listed = json.loads(racker("ps", "--json").stdout)
        assert name in [m["name"] for m in listed]
        assert racker("exec", name, "--", "sh", "-c", "exit 5").returncode == 5
        # The same machine answers every exec: state persists between them.
        racker("exec", name, "--", "touch", "/root/marker")
        assert racker("exec", name, "--", "test", "-e", "/root/marker").returncode == 0
        taken = racker("start", "debian-bookworm", "--name", name)
        assert taken.returncode == 125 and "already in use" in taken.stderr
        status, screen = _on_a_terminal([sys.executable, "-m", "racker", "shell", name], b"echo MARK-$((6*7)); exit 3\n")
        assert "MARK-42" in screen, screen
        assert status == 3
    finally:
        stopped = racker("stop", name)
    assert stopped.returncode == 0, stopped.stderr
    assert name not in [m["name"] for m in json.loads(racker("ps", "--json").stdout)]
    assert racker("exec", name, "--", "true").returncode == 125


def test_shell_with_an_image_name_boots_one(bookworm) -> None:
    status, screen = _on_a_terminal([sys.executable, "-m", "racker", "shell", "debian-bookworm"], b"hostname; exit\n")
    assert status == 0, screen
    assert "debian-bookworm-" in screen


def test_shell_with_an_image_reference_boots_it(share_image) -> None:
    """bootstrap:debian/bookworm is no machine name (it has a '/'): shell boots that image."""
    from racker import store
    from racker.sources import recipe_for
    from racker.store import refs

    base = share_image("debian-bookworm")
    with store.workdir("test") as work:
        subprocess.run(["cp", "-al", str(base.rootfs), str(work / "rootfs")], check=True)
        store.commit(
            "bootstrap:debian/bookworm",
            work / "rootfs",
            source="bootstrap:debian/bookworm",
            # the recipe a pull expects (the apt sources), so that shell finds it stored, not to be built
            recipe=recipe_for(refs.parse("bootstrap:debian/bookworm")),
            manifest=base.manifest,
        )
    status, screen = _on_a_terminal([sys.executable, "-m", "racker", "shell", "bootstrap:debian/bookworm"], b"hostname; exit\n")
    assert status == 0, screen
    assert "bookworm-" in screen


def test_machine_names_are_unique(bookworm) -> None:
    name = f"dup-{os.getpid()}"  # unique to this run: other runs may share the store
    with Machine(bookworm, name), pytest.raises(NameTaken):
        Machine(bookworm, name).start()
    assert machines.load("nspawn", name) is None


def test_rmi_refuses_while_in_use(bookworm) -> None:
    with Machine(bookworm):
        refused = racker("rmi", "debian-bookworm")
    assert refused.returncode == 125
    assert "in use" in refused.stderr
    assert images.find("debian-bookworm").rootfs.is_dir()


def test_a_store_deep_in_the_filesystem_boots_machines(share_image, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A unix socket path has at most 108 bytes; RACKER_HOME may be far longer."""
    deep = tmp_path / ("a-long-directory-name-" * 5) / "store"
    monkeypatch.setenv("RACKER_HOME", str(deep))
    share_image("debian-bookworm")
    name = f"a-rather-long-machine-name-too-{os.getpid()}"  # host-wide unique: nspawn's propagate directory
    ran = racker("run", "--name", name, "debian-bookworm", "--", "systemctl", "is-system-running", "--wait")
    assert (ran.returncode, ran.stdout.strip()) == (0, "running"), ran.stderr
