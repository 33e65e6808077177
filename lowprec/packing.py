"""Sub-byte packing: 4-bit (FP4 codes), 2-bit (ternary) and 1-bit (binary) codes in uint8.

Codes are packed little-end first: element ``i`` of a byte sits in bits
``[b*i, b*(i+1))``. A flat tensor of ``n`` codes becomes ``ceil(n * b / 8)`` bytes.
"""

from __future__ import annotations

import torch

PACKED_BITS = (1, 2, 4)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer ``codes`` (each < 2**bits) into a flat uint8 tensor."""
    if bits not in PACKED_BITS:
        raise ValueError(f"can pack {PACKED_BITS}-bit codes, not {bits}")
    per = 8 // bits
    flat = codes.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    lanes = flat.view(-1, per)
    shifts = torch.arange(0, 8, bits, device=flat.device, dtype=torch.uint8)
    return (lanes << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``n`` codes, as a flat uint8 tensor."""
    if bits not in PACKED_BITS:
        raise ValueError(f"can unpack {PACKED_BITS}-bit codes, not {bits}")
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    mask = (1 << bits) - 1
    codes = (packed.reshape(-1, 1) >> shifts) & mask
    return codes.reshape(-1)[:n]
