"""Random inputs for the attention tests: Qwen2-VL-style inverse frequencies, M-RoPE sections and
positions with real image runs (text, gap, a (t, h, w) grid, gap, text), built by hand."""

from __future__ import annotations

import torch

SECTIONS = {64: (8, 12, 12), 72: (0, 18, 18), 80: (8, 16, 16), 96: (12, 18, 18), 128: (16, 24, 24)}


def inv_freq(d: int, base: float = 1e6) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d).float()


def image_run_positions(length: int, *, gap: int = 2, generator=None) -> torch.Tensor:
    """[3, length] positions: text 0..a-1, then image grids of (t, h, w) tokens at base (last + gap),
    token (ti, hi, wi) → (base+ti, base+hi, base+wi), then text from (max + gap), repeated."""
    rows, nxt = [torch.zeros(3, 0, dtype=torch.long)], 0
    while sum(r.shape[1] for r in rows) < length:
        a = int(torch.randint(1, 6, (1,), generator=generator))
        rows.append(torch.arange(nxt, nxt + a).expand(3, a))
        nxt = nxt + a - 1 + gap
        t, h, w = (int(x) for x in torch.randint(1, 4, (3,), generator=generator))
        ti, hi, wi = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        grid = torch.stack([ti.flatten(), hi.flatten(), wi.flatten()]) + nxt
        rows.append(grid)
        nxt = int(grid.max()) + gap
    return torch.cat(rows, dim=1)[:, :length].contiguous()


def positions(kind: str, batch_lengths: list[int]) -> list[torch.Tensor]:
    """Per-sequence [3, L] positions: "text" (0..L-1 on all rows) or "image" (image runs)."""
    if kind == "text":
        return [torch.arange(n).expand(3, n).contiguous() for n in batch_lengths]
    return [image_run_positions(n) for n in batch_lengths]


def padding_mask(b: int, s: int, side: str) -> torch.Tensor:
    """[B, S] long mask, 1 keep / 0 pad: the last row keeps all S tokens, the others a random 1..S-1
    (so every batch with B > 1 and S > 1 has padding)."""
    mask = torch.zeros(b, s, dtype=torch.long)
    for i in range(b):
        keep = s if i == b - 1 or s == 1 else int(torch.randint(1, s, (1,)))
        if side == "left":
            mask[i, s - keep :] = 1
        else:
            mask[i, :keep] = 1
    return mask
