"""settings.py: every RACKER_* variable declared once, read when used, one clear error for a bad value."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import ROOT, racker, racker_here
from racker import settings
from racker.errors import BadSetting
from racker.vm import ports

DOCS = ROOT / "docs" / "settings.md"


def test_a_setting_set_after_import_takes_effect(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The modules that read a setting were imported long before (conftest imports racker): each
    reads it when used, so setting it now changes what they do."""
    from racker import proc, progress, store
    from racker.sources import bootstrap, extract, upstream_timeout

    monkeypatch.setenv("RACKER_HOME", str(tmp_path / "elsewhere"))
    assert store.home() == tmp_path / "elsewhere"
    monkeypatch.setenv("RACKER_EXTRACT_LIMIT", "16M")
    assert extract.size_limit() == 16 << 20
    monkeypatch.setenv("RACKER_UPSTREAM_TIMEOUT", "2.5")
    assert upstream_timeout() == 2.5
    monkeypatch.setenv("RACKER_DEBIAN_MIRROR", "http://127.0.0.1:9/debian")
    assert bootstrap.sources("debian", "sid") == ["deb http://127.0.0.1:9/debian sid main"]
    monkeypatch.setenv("RACKER_SSH_PORTS", "20000-20009")
    assert ports.port_range() == range(20000, 20010)
    monkeypatch.setattr(proc, "DEBUG", False)
    monkeypatch.setenv("RACKER_DEBUG", "1")
    assert proc.debugging()
    monkeypatch.setenv("RACKER_PROGRESS", "1")
    assert progress.interactive()
    monkeypatch.setenv("RACKER_PROGRESS", "0")
    assert not progress.interactive()


def test_unset_and_empty_mean_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RACKER_BOOT_TIMEOUT", raising=False)
    assert settings.BOOT_TIMEOUT.value() == 60.0 and settings.BOOT_TIMEOUT.source() == "default"
    monkeypatch.setenv("RACKER_BOOT_TIMEOUT", "")
    assert settings.BOOT_TIMEOUT.value() == 60.0 and settings.BOOT_TIMEOUT.source() == "default"
    monkeypatch.setenv("RACKER_BOOT_TIMEOUT", "90")
    assert settings.BOOT_TIMEOUT.value() == 90.0 and settings.BOOT_TIMEOUT.source() == "environment"
    monkeypatch.setenv("RACKER_BINFMT_DIRS", "")  # the one where empty says something: no directories
    assert settings.BINFMT_DIRS.value() == []


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("RACKER_BOOT_TIMEOUT", "sixty", "RACKER_BOOT_TIMEOUT='sixty' is not a number of seconds"),
        ("RACKER_VM_BOOT_TIMEOUT", "-5", "RACKER_VM_BOOT_TIMEOUT='-5' is not a number of seconds"),
        ("RACKER_EXTRACT_LIMIT", "lots", "RACKER_EXTRACT_LIMIT='lots' is not a size"),
        ("RACKER_DEBUG", "yes", "RACKER_DEBUG='yes' is not 0 or 1"),
        ("RACKER_SSH_PORTS", "70000-70001", "RACKER_SSH_PORTS='70000-70001' is not a port range"),
        ("RACKER_NETWORK_RANGE", "10.213.0.0/33", "RACKER_NETWORK_RANGE='10.213.0.0/33' is not an IPv4 network"),
        ("RACKER_SEED_MODULES", "some", "RACKER_SEED_MODULES='some' is not all or minimal"),
    ],
)
def test_an_invalid_value_is_one_error_naming_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, text: str, message: str) -> None:
    monkeypatch.setenv(name, text)
    with pytest.raises(BadSetting, match="^" + re.escape(message)) as raised:
        settings.named(name).get()
    assert "\n" not in str(raised.value) and name in (raised.value.hint or "")


def test_racker_config_lists_every_setting_with_its_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RACKER_BOOT_TIMEOUT", "75")
    monkeypatch.setenv("RACKER_VAGRANT_SERVER", "https://me:s3cret@boxes.lan")
    result = racker_here("config", "--json")  # in this process: read when used, so the variables set now count
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {s.name for s in settings.SETTINGS}
    assert rows["RACKER_BOOT_TIMEOUT"]["value"] == "75" and rows["RACKER_BOOT_TIMEOUT"]["source"] == "environment"
    assert rows["RACKER_VM_BOOT_TIMEOUT"]["value"] == "240" and rows["RACKER_VM_BOOT_TIMEOUT"]["source"] == "default"
    assert "s3cret" not in result.stdout  # a URL's credentials are sent, never shown


def test_racker_config_says_which_value_is_invalid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RACKER_BOOT_TIMEOUT", "sixty")
    result = racker_here("config")
    assert result.returncode == 1
    assert re.search(r"^RACKER_BOOT_TIMEOUT\s+sixty\s+environment \(invalid\)$", result.stdout, re.MULTILINE), result.stdout
    assert result.stderr == "racker: error: RACKER_BOOT_TIMEOUT='sixty' is not a number of seconds\n"


def test_an_invalid_setting_ends_a_command_in_one_line(tmp_path: Path) -> None:
    """Read when the VM is made, before its disk is looked at: the error names the variable, not the disk.
    The real command, in a process of its own: nothing read at import may hide the variable."""
    (tmp_path / "disk.raw").write_bytes(bytes(4096))
    result = racker(
        "vm", "start", str(tmp_path / "disk.raw"), env={"RACKER_HOME": str(tmp_path / "store"), "RACKER_VM_BOOT_TIMEOUT": "sixty"}
    )
    assert result.returncode == 125
    assert result.stderr == "racker: error: RACKER_VM_BOOT_TIMEOUT='sixty' is not a number of seconds\ne.g. RACKER_VM_BOOT_TIMEOUT=240\n"


def test_docs_settings_md_is_generated_from_the_module() -> None:
    assert DOCS.read_text() == settings.markdown(), "docs/settings.md is stale: run python -m racker.settings --markdown > docs/settings.md"


def test_every_racker_variable_racker_reads_is_declared() -> None:
    """No module reads a RACKER_* variable but through settings, and every one named is declared."""
    declared = {s.name for s in settings.SETTINGS}
    for path in (ROOT / "racker").rglob("*.py"):
        text = path.read_text()
        if path.name != "settings.py":
            assert not re.search(r"(environ|getenv)\W+[^\n]*[\"']RACKER_", text), f"{path} reads a RACKER_ variable directly"
        named = set(re.findall(r"\bRACKER_[A-Z_]+[A-Z]\b", text))
        assert named <= declared, f"{path} names {named - declared}, which settings.py does not declare"
