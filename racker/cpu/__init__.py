"""What this host's CPU can run: KVM that really works (accel), other architectures (emulation)."""
