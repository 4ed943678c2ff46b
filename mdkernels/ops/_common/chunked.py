"""Helpers of the chunked torch backends: the class chunk size, one chunk's cosines, target positions."""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 20  # B x chunk logits per step: 4 MB in fp32


def chunk_size(B: int, C: int) -> int:
    return max(256, min(C, CHUNK_ELEMENTS // max(B, 1)))


def chunk_cos(xh, w, rw, c0, c1):
    """Raw cosines of all rows against centers [c0, c1): (B, c1-c0). The center chunk is never
    normalised in memory: its (B, chunk) product is scaled by 1/|w_j| instead (fewer elements)."""
    return (xh @ w[c0:c1].to(xh.dtype).T).mul_(rw[None, c0:c1])


def target_mask(labels, c0, c1):
    rows = ((labels >= c0) & (labels < c1)).nonzero().squeeze(1)
    return rows, labels[rows] - c0



def target_cos(x, w, labels, rx, rw, ignore_index):
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    raw = (x.to(rx.dtype) * w[safe].to(rx.dtype)).sum(1) * rx * rw[safe]
    return valid, safe, raw


