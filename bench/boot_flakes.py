"""Cold boots of the catalogue's VM disks under load, each failure classified from its console.

Issue 24 (3): the TCG boot flakes. Every boot is cold (no snapshot restore), from
a fresh overlay over the image's promoted disk, with the suite's boot timeout,
`--parallel` at a time (2 by default: the 2-way load of the suite's VM tests on
2 cores). The serial console of every boot is kept in --out, and the outcome is
read from it: ready, kernel panic (which), stuck in the initramfs, a clock or
RCU stall, cloud-init or sshd never done, or racker's timeout while the guest
was still writing to its console (still progressing: the timeout was too tight).

    /work/main/.venv/bin/python bench/boot_flakes.py [--boots 40] [--parallel 2]
        [--images debian-bullseye,debian-bookworm,debian-trixie,debian-sid]
        [--firmware bios] [--timeout 240] [--out /var/tmp/racker-boot-flakes/run-NAME]

Images come from RACKER_HOME (default /var/lib/racker-tests, the suite's store),
read only; their disks are promoted once into --disks (a shared store's cached
disk is used where one exists for this racker), so the store is not written.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import signal
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RACKER_HOME", "/var/lib/racker-tests")
os.environ.setdefault("RACKER_SEED_MODULES", "minimal")  # as the suite's conftest sets it

from racker import images, prepare, promote, settings, store
from racker.vm import qemu

IMAGES = ("debian-bullseye", "debian-bookworm", "debian-trixie", "debian-sid")
# A guest whose console grew this recently when racker gave up was still booting.
PROGRESSING_S = 20.0
# QEMU's start, firmware and GRUB: wall time before the kernel's clock starts (20-23 s at load 14-20,
# measured on ready boots: their length, less the last console line's kernel time and how long ago it came).
BEFORE_KERNEL_S = 20.0
# A guest that finished booting this long before racker gave up was missed (readiness detection).
MISSED_S = 60.0

# (class, pattern) in order of precedence: the first that matches a failed boot's console names it.
CLASSES: tuple[tuple[str, re.Pattern[bytes]], ...] = (
    ("kernel panic", re.compile(rb"Kernel panic - not syncing[^\r\n]*|---\[ end Kernel panic[^\r\n]*")),
    ("kernel oops", re.compile(rb"(?:BUG: [^\r\n]*|general protection fault[^\r\n]*|double fault[^\r\n]*|Oops: [^\r\n]*)")),
    ("root not found (initramfs)", re.compile(rb"Gave up waiting for root[^\r\n]*|ALERT! [^\r\n]*|\(initramfs\)|dropping to a shell")),
    (
        "clock/RCU stall",
        re.compile(
            rb"rcu[^\r\n]*(?:self-detected stall|detected stalls?)[^\r\n]*|soft lockup[^\r\n]*|blocked for more than \d+ seconds[^\r\n]*"
        ),
    ),
    ("emergency mode", re.compile(rb"You are in emergency mode[^\r\n]*|Entering emergency mode[^\r\n]*")),
    ("unit failed", re.compile(rb"\[FAILED\] Failed to start [^\r\n]*")),
)
# Notes worth counting on every boot, failed or not: how the clock and the entropy pool came up.
NOTES: dict[str, re.Pattern[bytes]] = {
    "tsc unstable": re.compile(rb"Marking TSC unstable|Marking clocksource tsc unstable"),
    "clocksource watchdog": re.compile(
        rb"clocksource: timekeeping watchdog|clocksource: Switched to clocksource (?:hpet|acpi_pm|refined-jiffies)"
    ),
    "rcu stall": re.compile(rb"rcu[^\r\n]*detected stall"),
    "soft lockup": re.compile(rb"soft lockup"),
    "crng late": re.compile(rb"random: crng init done"),  # its time is noted below
}
PRINTK_TIME = re.compile(rb"^\[\s*(\d+\.\d+)\]", re.MULTILINE)
CLOUD_INIT_DONE = re.compile(rb"Cloud-init v\. [^\r\n]* finished|Started cloud-final|Finished cloud-final")
SSHD_STARTED = re.compile(rb"Started (?:ssh|sshd)\.service|Started OpenBSD Secure Shell server|Started ssh\.service")
LOGIN_PROMPT = re.compile(rb"login: ?$", re.MULTILINE)
# The guest's boot is over: cloud-init's last stage has reported (what `is-system-running --wait` waits for).
CLOUD_FINAL_DONE = re.compile(
    rb"Finished cloud-final\.service|Completed socket interaction for boot stage final|Cloud-init v\. [^\r\n]* finished"
)


ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[78]")


def classify(console: bytes, error: str, console_idle_s: float | None, seconds: float = 0.0) -> tuple[str, str]:
    """(class, the console line that shows it) of one boot; error is the exception's type ("" if ready).

    Progressing: the console grew in the last PROGRESSING_S seconds before racker gave up, or (its
    time not known) the guest's last kernel timestamp is that close to the boot's length, less
    the time before the kernel started."""
    if not error:
        return "ready", ""
    console = ANSI.sub(b"", console)
    for name, pattern in CLASSES[:4]:
        if found := pattern.search(console):
            return name, found.group(0).decode(errors="replace").strip()
    if error == "VMLaunchFailure" and not console.strip():
        return "qemu did not start", ""
    if console_idle_s is None and seconds and (stamps := PRINTK_TIME.findall(console)):
        console_idle_s = seconds - BEFORE_KERNEL_S - float(stamps[-1])
    finished = LOGIN_PROMPT.search(console) or CLOUD_FINAL_DONE.search(console)
    if error == "BootTimeout" and finished:
        if console_idle_s is not None and console_idle_s >= MISSED_S:
            return "racker missed a finished guest", last_line(console)
        return "racker timeout, guest just finished", last_line(console)
    if error == "BootTimeout" and console_idle_s is not None and console_idle_s < PROGRESSING_S:
        return "racker timeout, guest progressing", last_line(console)
    for name, pattern in CLASSES[4:]:
        if found := pattern.search(console):
            return name, found.group(0).decode(errors="replace").strip()
    if not PRINTK_TIME.search(console) and b"Linux version" not in console:
        return "no kernel output (firmware/GRUB)", last_line(console)
    if SSHD_STARTED.search(console) and not CLOUD_INIT_DONE.search(console):
        return "cloud-init not done", last_line(console)
    if not SSHD_STARTED.search(console):
        return "sshd not up", last_line(console)
    return f"other ({error})", last_line(console)


def last_line(console: bytes) -> str:
    lines = [line for line in ANSI.sub(b"", console).replace(b"\r", b"").splitlines() if line.strip()]
    return lines[-1].decode(errors="replace").strip()[:200] if lines else ""


def notes(console: bytes) -> dict[str, object]:
    found: dict[str, object] = {name: True for name, pattern in NOTES.items() if name != "crng late" and pattern.search(console)}
    crng = re.search(rb"^\[\s*(\d+\.\d+)\][^\r\n]*random: crng init done", console, re.MULTILINE)
    if crng:
        found["crng_init_s"] = float(crng.group(1))
    stamps = PRINTK_TIME.findall(console)
    if stamps:
        found["last_printk_s"] = float(stamps[-1])
    return found


class KeptVM(qemu.VM):
    """A VM whose console is copied out before stop() removes its run directory."""

    kept: Path
    console_idle_s: float | None = None

    def stop(self, grace: float = 0.0) -> None:
        if self.state is not None:
            try:
                self.console_idle_s = time.time() - self.console_log.stat().st_mtime
                shutil.copyfile(self.console_log, self.kept)
            except FileNotFoundError:
                pass
        super().stop(grace)


def boot_once(index: int, image: str, disk: str, out: str, timeout: float, tcg_cpu: str) -> dict:
    """One cold boot (in a worker process): its record, its console kept as out/NNN-image.console."""
    kept = Path(out) / f"{index:03d}-{image}.console"
    vm = KeptVM(Path(disk), image=image, boot_timeout=timeout, tcg_cpu=tcg_cpu)
    vm.kept = kept
    started = time.monotonic()
    error, message, state = "", "", ""
    try:
        with vm:
            state = vm.system_state
    except Exception as failed:  # a bench counts every way a boot fails
        error, message = type(failed).__name__, (str(failed).splitlines() or [""])[0][:300]
    seconds = round(vm.boot_seconds if not error else time.monotonic() - started, 1)
    console = kept.read_bytes() if kept.exists() else b""
    outcome, evidence = classify(console, error, vm.console_idle_s, seconds)
    return {
        "index": index,
        "image": image,
        "timeout": timeout,
        "outcome": outcome,
        "evidence": evidence,
        "seconds": seconds,
        "system_state": state,
        "error": error,
        "message": message,
        "console_idle_s": None if vm.console_idle_s is None else round(vm.console_idle_s, 1),
        "console": str(kept),
        "load": os.getloadavg()[0],
        **notes(console),
    }


def disk_for(name: str, firmware: str, disks: Path) -> Path:
    """The image's prepared (+vm) disk: the store's cached one if this racker made it, else promoted into `disks`."""
    image = prepare.prepare(images.pull(name))  # both in the store already: read only
    cached = store.home() / "disks" / promote.cached_disk_name(image.digest, firmware)
    if cached.exists():
        return cached
    path = disks / promote.cached_disk_name(image.digest, firmware)
    if not path.exists():
        disks.mkdir(parents=True, exist_ok=True)
        print(f"promoting {image.name} to {path}", file=sys.stderr)
        promote.promote(image, path, promote.Options(fmt="raw", firmware=firmware))
    return path


def progress_line(r: dict) -> str:
    return f"{r['index']:3d} {r['image']:<16} {r['outcome']:<34} {r['seconds']:6.1f} s  load {r['load']:.1f}  {r['evidence'][:80]}"


def table(records: list[dict]) -> str:
    counts = Counter(r["outcome"] for r in records)
    by_image = {name: Counter(r["outcome"] for r in records if r["image"] == name) for name in dict.fromkeys(r["image"] for r in records)}
    width = max([len(c) for c in counts] + [7])
    lines = [f"{'outcome':<{width}}  {'all':>4}  " + "  ".join(f"{n.removeprefix('debian-'):>8}" for n in by_image)]
    for outcome, count in counts.most_common():
        lines.append(f"{outcome:<{width}}  {count:>4}  " + "  ".join(f"{by_image[n][outcome]:>8}" for n in by_image))
    ready = [r["seconds"] for r in records if r["outcome"] == "ready"]
    failed = len(records) - len(ready)
    lines.append(f"failures: {failed}/{len(records)} ({100 * failed / max(len(records), 1):.0f}%)")
    if late := [r for r in records if r["outcome"] == "ready" and r.get("timeout") and r["seconds"] > r["timeout"]]:
        lines.append(f"ready past the wall timeout (a starved boot given more time): {len(late)}")
    for note in ("tsc unstable", "rcu stall", "soft lockup"):
        if marked := sum(1 for r in records if r.get(note)):
            lines.append(f"console notes '{note}': {marked}/{len(records)}")
    loads = [r["load"] for r in records if "load" in r]
    if loads:
        lines.append(f"host load (1 min) at the end of each boot: {min(loads):.1f}-{max(loads):.1f}")
    if ready:
        lines.append(f"time to ready: median {statistics.median(ready):.1f} s, max {max(ready):.1f} s (n={len(ready)})")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=40)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--images", default=",".join(IMAGES))
    parser.add_argument("--firmware", default="bios", choices=("bios", "uefi"))
    parser.add_argument("--timeout", type=float, default=None, help="per boot (default: RACKER_VM_BOOT_TIMEOUT, as in the suite)")
    parser.add_argument("--tcg-cpu", default=None, help="default: RACKER_TCG_CPU")
    parser.add_argument("--disks", type=Path, default=Path("/var/tmp/racker-boot-flakes/disks"))
    parser.add_argument("--out", type=Path, default=Path(f"/var/tmp/racker-boot-flakes/run-{time.strftime('%Y%m%dT%H%M%S')}"))
    parser.add_argument("--table", type=Path, metavar="DIR", help="only print the table of an earlier run's records.jsonl")
    args = parser.parse_args()
    if args.table:
        print(table([json.loads(line) for line in (args.table / "records.jsonl").read_text().splitlines()]))
        return 0

    # Ctrl-C, or SIGINT to this process and its workers, stops every VM on the way out,
    # even when started in the background (where a shell starts jobs with SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.timeout is None:
        args.timeout = settings.VM_BOOT_TIMEOUT.value()
    args.tcg_cpu = args.tcg_cpu or settings.TCG_CPU.value()
    names = args.images.split(",")
    disks = {name: str(disk_for(name, args.firmware, args.disks)) for name in names}
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{args.boots} cold boots, {args.parallel} at a time, timeout {args.timeout:.0f} s; consoles in {args.out}", file=sys.stderr)
    print(f"load before: {os.getloadavg()}", file=sys.stderr)
    records: list[dict] = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.parallel) as pool:
        futures = [
            pool.submit(boot_once, i, names[i % len(names)], disks[names[i % len(names)]], str(args.out), args.timeout, args.tcg_cpu)
            for i in range(args.boots)
        ]
        for future in concurrent.futures.as_completed(futures):
            record = future.result()
            records.append(record)
            with open(args.out / "records.jsonl", "a") as jsonl:  # kept as they come: a run cut short still counts
                jsonl.write(json.dumps(record) + "\n")
            print(progress_line(record), file=sys.stderr, flush=True)
    records.sort(key=lambda r: r["index"])
    summary = {
        "boots": args.boots, "parallel": args.parallel, "timeout": args.timeout, "firmware": args.firmware,
        "tcg_cpu": args.tcg_cpu, "disks": disks, "load_after": os.getloadavg(), "records": records,
    }  # fmt: skip
    (args.out / "boot_flakes.json").write_text(json.dumps(summary, indent=2))
    print(table(records))
    print(f"JSON: {args.out / 'boot_flakes.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
