"""Runners: build once, run anywhere a firmware ELF can run (QEMU with exact counts now; Ibex and Renode next)."""
