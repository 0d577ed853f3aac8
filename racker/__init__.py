"""racker: boot OS images under systemd-nspawn and QEMU, and test that they work."""

__version__ = "0.1.0"
