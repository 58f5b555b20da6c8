"""Measurement in one place: a firmware's sizes (sizes.py: flash into code and weights, RAM into arena, scratch,
stack), its cycle estimate (cycles.py: a core's cost model x QEMU's per-block counts) and the database every
measured build and layer goes into (database.py), which the predictor learns from."""
