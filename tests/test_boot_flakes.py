"""bench/boot_flakes.py's classifier: a failed boot's class read from its console."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("boot_flakes", ROOT / "bench" / "boot_flakes.py")
assert spec is not None and spec.loader is not None
boot_flakes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(boot_flakes)

BOOTING = b"[    0.000000] Linux version 6.12\r\n[    0.000000] tsc: Fast TSC calibration failed\r\n"
FINISHED = BOOTING + (
    b"[\x1b[0;32m  OK  \x1b[0m] Started \x1b[0;1;39mssh.service\x1b[0m - OpenBSD Secure Shell server.\r\n"
    b"[  219.09] sh[366]: Completed socket interaction for boot stage final\r\n\r\nbox login: "
)


@pytest.mark.parametrize(
    ("console", "error", "idle", "expected"),
    [
        (FINISHED, "", 1.0, "ready"),
        (BOOTING + b"[   3.1] Kernel panic - not syncing: Attempted to kill init!\r\n", "GuestDied", 1.0, "kernel panic"),
        (
            BOOTING + b"Gave up waiting for root file system device.\r\nALERT!  UUID=x does not exist.\r\n(initramfs) ",
            "BootTimeout",
            200.0,
            "root not found (initramfs)",
        ),
        (BOOTING + b"[  80.0] rcu: INFO: rcu_preempt self-detected stall on CPU\r\n", "BootTimeout", 5.0, "clock/RCU stall"),
        (FINISHED, "BootTimeout", 12.0, "racker timeout, guest just finished"),
        (FINISHED, "BootTimeout", 120.0, "racker missed a finished guest"),
        (
            BOOTING + b"[ 222.4] cloud-init[321]: Cloud-init v. 25.1.4 running 'modules:config'\r\n",
            "BootTimeout",
            3.0,
            "racker timeout, guest progressing",
        ),
        (BOOTING + b"[  40.0] systemd[1]: Starting ssh.service\r\n", "BootTimeout", 150.0, "sshd not up"),
        (b"SeaBIOS (version 1.16)\r\nBooting from Hard Disk...\r\n", "BootTimeout", 200.0, "no kernel output (firmware/GRUB)"),
    ],
)
def test_a_boot_is_classified_from_its_console(console: bytes, error: str, idle: float, expected: str) -> None:
    assert boot_flakes.classify(console, error, idle)[0] == expected


def test_a_benign_tsc_message_is_a_note_not_a_stall() -> None:
    console = BOOTING + b"[  55.05] clocksource: Marking clocksource tsc unstable due to frequency skew\r\n"
    assert boot_flakes.classify(console, "BootTimeout", 3.0)[0] == "racker timeout, guest progressing"
    assert boot_flakes.notes(console)["tsc unstable"] is True
