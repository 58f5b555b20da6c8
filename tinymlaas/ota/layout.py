"""The board's flash as updates use it, and where a firmware finds its model.

Partition (MCUboot multi-image style): a boot area (bootloader and boot records), two firmware slots, two model
slots. A firmware image holds the code and the model it was built with; a model image holds a model alone, for
firmware whose code expects exactly that model section (its ABI, see package.py).

The model region: firmware linked for a machine keeps its model's constants (weights, biases, requantization
tables: everything that `_pack_constants` puts in `weights.bin`) at a fixed flash address, after a code budget,
so that new constants of the same layout change nothing in the code. The code budget is a firmware slot less a
model slot, so a firmware image (code, then its model) always fits its slot.
"""

from __future__ import annotations

from tinymlaas.targets import MemoryRegion, Target

BOOT_AREA = 0x8000
SECTOR_ALIGN = ~0xFFF
MODEL_IMAGE_ROOM = 0x1000  # a model slot's image header and TLVs


def model_slot_size(target: Target) -> int:
    """An eighth of the board's flash, 4 KiB aligned."""
    return (target.board.flash_bytes // 8) & SECTOR_ALIGN


def slot_size(target: Target) -> int:
    """What the boot area and the two model slots leave, halved, 4 KiB aligned."""
    return ((target.board.flash_bytes - BOOT_AREA - 2 * model_slot_size(target)) // 2) & SECTOR_ALIGN


def model_region(target: Target, flash: MemoryRegion) -> MemoryRegion | None:
    """Where firmware linked for a machine whose flash is `flash` reads its model's constants; None where that flash
    cannot hold the code budget and the region."""
    size = model_slot_size(target) - MODEL_IMAGE_ROOM
    code_budget = slot_size(target) - model_slot_size(target)
    if size <= 0 or code_budget <= 0 or code_budget + size > flash.size:
        return None
    return MemoryRegion(flash.base + code_budget, size)
