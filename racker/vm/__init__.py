"""VMs: a disk booted in QEMU, its boards, disk checks, ports, warm snapshots and the channels into it."""
