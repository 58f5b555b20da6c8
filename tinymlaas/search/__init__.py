"""Variant search (quantization, kernel implementations, schedules, memory placement): the space per layer comes
from the operator registry (`tinymlaas.ops.registry.candidates`)."""
