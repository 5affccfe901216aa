"""Random multimodal token batches for the index tests (Qwen2-VL layout, or Qwen3-VL's frame by frame
videos; tiny grids)."""

from __future__ import annotations

import random

import torch

IMG, VID, VS, VE = 151, 152, 150, 153  # image/video placeholders, <vision_start>, <vision_end>
M = 2  # spatial merge size
IDS = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, spatial_merge_size=M)


def text(n: int) -> list[int]:
    return [random.randrange(0, 100) for _ in range(n)]


def random_row(*, max_items=4, p_image=0.55, p_video=0.2, max_t=5, split_frames=False):
    """Token list of one sample and its grids: text runs, images and videos, each vision run wrapped
    as <vision_start> placeholders <vision_end>. Videos have 1..max_t frames; with ``split_frames``
    they are laid out as Qwen3-VL's processor does, frame by frame: a few timestamp text tokens,
    <vision_start>, the frame's placeholders, <vision_end>."""
    toks, images, videos = text(random.randint(0, 4)), [], []
    for _ in range(random.randint(0, max_items)):
        u = random.random()
        if u < p_image:
            g = (1, M * random.randint(1, 4), M * random.randint(1, 4))
            images.append(g)
            toks += [VS] + [IMG] * (g[1] // M) * (g[2] // M) + [VE]
        elif u < p_image + p_video:
            g = (random.randint(1, max_t), M * random.randint(1, 3), M * random.randint(1, 3))
            videos.append(g)
            frame = [VID] * (g[1] // M) * (g[2] // M)
            if split_frames:
                for _ in range(g[0]):
                    toks += text(random.randint(1, 3)) + [VS] + frame + [VE]
            else:
                toks += [VS] + frame * g[0] + [VE]
        else:
            toks += text(random.randint(1, 5))
            continue
        toks += text(random.randint(0, 4))
    if not toks:
        toks = text(1)
    return toks, images, videos


def pack(rows, *, extra=0, padding="random"):
    """Pad token lists into input_ids [B,S] and attention_mask [B,S]; padding 'left', 'right' or 'random'."""
    S = max(len(r) for r in rows) + extra
    ids = torch.full((len(rows), S), 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        side = padding if padding != "random" else random.choice(["left", "right"])
        off = S - len(r) if side == "left" else 0
        ids[b, off : off + len(r)] = torch.tensor(r, dtype=torch.long)
        mask[b, off : off + len(r)] = 1
    return ids, mask


def random_batch(B, *, extra=3, padding="random", text_only_every=3, **row_kw):
    """(input_ids, attention_mask, image_grid_thw [n,3], video_grid_thw [n,3], rows) with some text-only rows;
    ``row_kw`` go to ``random_row``."""
    rows, images, videos = [], [], []
    for b in range(B):
        if text_only_every and b % text_only_every == text_only_every - 1:
            r, im, vi = text(random.randint(1, 9)), [], []
        else:
            r, im, vi = random_row(**row_kw)
        rows.append(r)
        images += im
        videos += vi
    ids, mask = pack(rows, extra=extra, padding=padding)
    grid = lambda gs: torch.tensor(gs, dtype=torch.long).view(-1, 3)  # noqa: E731
    return ids, mask, grid(images), grid(videos), rows


def mm_token_types(ids):
    """Stock ``mm_token_type_ids`` as the processor builds them: 1 image placeholders, 2 video, 0 else."""
    return (ids == IMG).int() + 2 * (ids == VID).int()


def random_intervals(n: int) -> torch.Tensor:
    """float32 [n] time intervals: whole, fractional, zero and large ones."""
    pick = lambda: random.choice([0.0, 0.5, 1.0, 1.7, 3.4, 0.7, 25.0, random.uniform(0, 6)])  # noqa: E731
    return torch.tensor([pick() for _ in range(n)], dtype=torch.float32)
