"""Guest users and the image's own environment, as testinfra suites written for Docker expect them.

One machine for the module: the shared bookworm under a name whose manifest
config sets a Latin-1 LANG (a ref in a store of the module's own, no copy).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import racker
from conftest import ROOT, SHARED_HOME
from conftest import racker as racker_cli
from racker import images, machines, store
from racker.machines import guest_env
from racker.machines.nspawn import Machine

LATIN1 = "bookworm-latin1"


def host_for(machine, user: str | None = None):  # type: ignore[no-untyped-def]
    """testinfra is not in the unit environment (tox -e unit): imported by the tests that boot."""
    from racker.pytest.testinfra_backend import host_for

    return host_for(machine, user)


IMAGE_ENV = ["LANG=de_DE.ISO-8859-1", "FROM_IMAGE=yes"]


# -- logic, no machine -------------------------------------------------------


def test_image_env_over_the_base_with_c_utf8_only_as_fallback() -> None:
    assert guest_env.for_image({})["LANG"] == "C.UTF-8"
    env = guest_env.for_image({"config": {"Env": ["LANG=de_DE.ISO-8859-1", "PATH=/opt/bin:/usr/bin", "EMPTY="]}})
    assert (env["LANG"], env["PATH"], env["EMPTY"], env["HOME"]) == ("de_DE.ISO-8859-1", "/opt/bin:/usr/bin", "", "/root")
    assert "LANG" not in guest_env.for_image({"config": {"Env": ["LC_ALL=C.UTF-8"]}})


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"LANG": "de_DE.ISO-8859-1"}, "iso8859-1"),
        ({"LANG": "de_DE.ISO-8859-15@euro"}, "iso8859-15"),
        ({"LANG": "en_US.UTF-8"}, "utf-8"),
        ({"LANG": "C.utf8"}, "utf-8"),
        ({"LANG": "C"}, "utf-8"),
        ({"LANG": "POSIX"}, "utf-8"),
        ({"LANG": "en_US.ANSI_X3.4-1968"}, "utf-8"),
        ({"LANG": "xx.NO-SUCH-CHARSET"}, "utf-8"),
        ({"LANG": "en_US.UTF-8", "LC_ALL": "de_DE.ISO-8859-1"}, "iso8859-1"),
        ({"LANG": "de_DE.ISO-8859-1", "LC_CTYPE": "en_US.UTF-8"}, "utf-8"),
        ({}, "utf-8"),
    ],
)
def test_encoding_of_the_locale_in_effect(env: dict[str, str], expected: str) -> None:
    assert guest_env.encoding(env) == expected


# -- one machine -------------------------------------------------------------


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A machine of bookworm named LATIN1, whose config sets IMAGE_ENV, with alice (in group `crew`) added."""
    home = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RACKER_HOME", str(SHARED_HOME))
        shared = images.pull("debian-bookworm")
        patch.setenv("RACKER_HOME", str(home))
        linked = store.link_from(SHARED_HOME, shared.name)
        manifest = dict(linked.manifest, name=LATIN1, config={"Env": IMAGE_ENV})
        store.write_json(store.ref_path(LATIN1), {"digest": linked.digest, "source": "test", "recipe": "", "manifest": manifest})
        image = store.lookup(LATIN1)
        assert image is not None
        with Machine(image) as booted:
            booted.run_expect([0], ["groupadd", "crew"])
            booted.run_expect([0], ["useradd", "--create-home", "--shell", "/bin/bash", "--groups", "crew", "alice"])
            yield booted


@pytest.mark.slow
@pytest.mark.root
def test_racker_user_at_name_runs_as_the_user_with_a_login_environment(machine) -> None:  # type: ignore[no-untyped-def]
    import testinfra

    alice = testinfra.get_host(f"racker://alice@{machine.name}")
    out = alice.check_output("id -un; id -gn; id -Gn; echo $HOME $USER $LOGNAME $SHELL; pwd")
    assert out.splitlines() == ["alice", "alice", "alice crew", "/home/alice alice alice /bin/bash", "/home/alice"]
    assert alice.backend.get_pytest_id() == f"racker://alice@{machine.name}"
    root = host_for(machine)
    assert root.check_output("id -un; echo $HOME") == "root\n/root"
    # Arguments reach the command as they were given: no shell in between re-splits them.
    tricky = "a  b 'c' \"d\" $HOME `x` \\ ; *"
    assert alice.check_output("printf '[%%s]' %s", tricky) == f"[{tricky}]"
    login = machine.login("alice")
    printed = machine.run(["printf", "[%s]", tricky, "two words"], login=login)
    assert printed.stdout == f"[{tricky}][two words]"
    # uid[:gid] as docker takes them, known or not.
    assert host_for(machine, "alice:crew").check_output("id -gn") == "crew"
    assert host_for(machine, "4321:55").check_output("id -u; id -g; id -G; pwd") == "4321\n55\n55\n/"


@pytest.mark.slow
@pytest.mark.root
def test_an_unknown_user_is_one_clear_error(machine) -> None:  # type: ignore[no-untyped-def]
    from racker.errors import MachineError

    with pytest.raises(MachineError, match=r"^no user 'bob' in machine"):
        host_for(machine, "bob").run("true")
    with pytest.raises(MachineError, match=r"^no group 'nosuch' in machine"):
        host_for(machine, "alice:nosuch").run("true")
    done = racker_cli("exec", "--user", "bob", machine.name, "--", "true")
    assert done.returncode == 125
    assert done.stderr.splitlines() == [f"racker: error: no user 'bob' in machine {machine.name!r}"]


@pytest.mark.slow
@pytest.mark.root
def test_exec_user(machine) -> None:  # type: ignore[no-untyped-def]
    done = racker_cli("exec", "--user", "alice", machine.name, "--", "sh", "-c", 'id -un; echo "$HOME"; pwd')
    assert (done.returncode, done.stdout) == (0, "alice\n/home/alice\n/home/alice\n"), done.stderr
    done = racker_cli("exec", "-u", "1000", machine.name, "--", "id", "-un")
    assert done.stdout == "alice\n"
    # alice's own login shell, from the guest's passwd.
    shell = racker_cli("shell", "--user", "alice", machine.name, input="shopt -q login_shell && echo $BASH login; id -un\n")
    assert (shell.returncode, shell.stdout) == (0, "/bin/bash login\nalice\n"), shell.stderr


@pytest.mark.slow
@pytest.mark.root
def test_commands_run_with_the_image_env_and_decode_in_its_encoding(machine) -> None:  # type: ignore[no-untyped-def]
    host = host_for(machine)
    assert host.check_output("printenv LANG FROM_IMAGE") == "de_DE.ISO-8859-1\nyes"
    assert host.backend.encoding == "iso8859-1"
    # The guest writes Latin-1 (0xFC is ü there); it reads back as ü, not as a decoding error.
    result = host.run("printf 'gr\\374n'; printf '\\374' >&2")
    assert (result.stdout, result.stderr) == ("grün", "ü")
    # The login variables go over the image's, the image's LANG stays.
    assert host_for(machine, "alice").check_output("printenv LANG HOME") == "de_DE.ISO-8859-1\n/home/alice"


@pytest.mark.slow
@pytest.mark.root
def test_get_host_and_hosts_option_outside_racker_plugin_fixtures(machine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = f"import racker, testinfra; host = testinfra.get_host('racker://{machine.name}'); print(host.run('true').rc, host.user().name)"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert (done.returncode, done.stdout) == (0, "0 root\n"), done.stderr
    # testinfra's own runner, choosing the host with --hosts: testinfra's `host` fixture, our backend.
    (tmp_path / "test_hosts.py").write_text(
        "def test_whoami(host):\n    assert host.backend.NAME == 'racker'\n    assert host.check_output('id -un') == 'alice'\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--hosts=racker://alice@{machine.name}", "-v", "test_hosts.py"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"test_whoami[racker://alice@{machine.name}] PASSED" in done.stdout


@pytest.mark.slow
@pytest.mark.root
def test_racker_host_boots_and_tears_down(machine) -> None:  # type: ignore[no-untyped-def]
    with racker.host(LATIN1, user="nobody") as host:
        name = host.backend.name
        assert name != machine.name
        # nobody's home (/nonexistent) is not there: it starts in /, as login does.
        assert host.check_output("id -un; pwd; printenv LANG HOME") == "nobody\n/\nde_DE.ISO-8859-1\n/nonexistent"
        assert machines.load("nspawn", name) is not None
    assert machines.load("nspawn", name) is None
