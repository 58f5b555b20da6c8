"""Seeded mutations of TFLite flatbuffers: what a corrupt upload, a bad converter or a truncated copy produce."""

import numpy as np

BOUNDARY = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    buf = bytearray(data)
    kind = int(rng.integers(0, 6))
    if kind == 0:  # a few random bytes
        for _ in range(int(rng.integers(1, 8))):
            buf[int(rng.integers(8, len(buf)))] = int(rng.integers(0, 256))
    elif kind == 1:  # a 32-bit word (offsets, lengths, shapes, indices) set to a boundary value
        pos = int(rng.integers(8, len(buf) - 4)) & ~3
        buf[pos:pos + 4] = int(BOUNDARY[int(rng.integers(0, len(BOUNDARY)))]).to_bytes(4, "little")
    elif kind == 2:  # a small signed change of a word: an index or a dimension one off
        pos = int(rng.integers(8, len(buf) - 4)) & ~3
        word = int.from_bytes(buf[pos:pos + 4], "little", signed=True) + int(rng.integers(-3, 4))
        buf[pos:pos + 4] = (word & 0xFFFFFFFF).to_bytes(4, "little")
    elif kind == 3:  # truncated
        buf = buf[: int(rng.integers(8, len(buf)))]
    elif kind == 4:  # a span copied over another
        a, b = sorted(int(v) for v in rng.integers(8, len(buf), size=2))
        n = min(int(rng.integers(4, 64)), len(buf) - b)
        buf[b:b + n] = buf[a:a + n]
    else:  # the header's root offset
        buf[0:4] = int(rng.integers(0, len(buf) + 16)).to_bytes(4, "little")
    return bytes(buf)
