"""Tiled inference: overlapping tiles with a halo, blended with a smooth (cosine) ramp, batched, split across a
device set, under ``torch.inference_mode()``. A generator yielding ``{"stage", "done", "total"}`` per batch
(cancel by closing it between tiles) and returning the blended maps.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence

import numpy as np
import torch

from .config import TilingConfig

Forward = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def tile_grid(shape: tuple[int, int], tile: int, halo: int) -> list[tuple[int, int, int, int]]:
    """Tiles ``(r0, c0, r1, c1)`` covering ``shape``; neighbours overlap by ``2*halo``; every tile is
    ``tile`` wide unless the image is smaller."""
    h, w = shape
    step = tile - 2 * halo
    if step <= 0:
        raise ValueError(f"tile {tile} px must exceed twice the halo {halo} px")

    def starts(n: int) -> list[int]:
        if n <= tile:
            return [0]
        s = list(range(0, n - tile, step)) + [n - tile]
        return sorted(set(s))

    return [(r, c, min(r + tile, h), min(c + tile, w)) for r in starts(h) for c in starts(w)]


def blend_window(th: int, tw: int, halo: int, edges: tuple[bool, bool, bool, bool]) -> np.ndarray:
    """``(th, tw)`` weights: cosine ramp over ``halo`` px on sides that touch another tile (``edges`` =
    top, bottom, left, right touch the image border → weight 1 there)."""

    def ramp(n: int, lo_border: bool, hi_border: bool) -> np.ndarray:
        w = np.ones(n, np.float32)
        k = min(halo, n // 2)
        if k > 0:
            r = (0.5 - 0.5 * np.cos(np.pi * (np.arange(k) + 0.5) / k)).astype(np.float32)
            if not lo_border:
                w[:k] = r
            if not hi_border:
                w[n - k:] = r[::-1]
        return w

    return np.outer(ramp(th, edges[0], edges[1]), ramp(tw, edges[2], edges[3]))


def _batches(tiles: list, n: int) -> Iterator[list]:
    for i in range(0, len(tiles), n):
        yield tiles[i:i + n]


def predict_tiled(
    forward: Forward,
    image: np.ndarray,
    *,
    cfg: TilingConfig,
    devices: Sequence[torch.device],
    channels: dict[str, int],
    activations: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    forwards: Sequence[Forward] | None = None,
) -> Generator[dict, None, dict[str, np.ndarray]]:
    """Run ``forward`` over ``image (H,W,3) uint8`` (or any array-like readable by slicing) tile by tile.

    ``channels`` names the outputs to keep and their channel counts; ``activations`` maps output names to a
    function applied on the device before blending (e.g. softmax). ``forwards[d]`` is the forward on
    ``devices[d]`` (default: ``forward`` for every device; tiles of a batch are split across devices).
    Returns ``{name: (C, H, W) float32}``.
    """
    h, w = image.shape[:2]
    tiles = tile_grid((h, w), cfg.tile_px, cfg.halo_px)
    acc = {k: np.zeros((c, h, w), np.float32) for k, c in channels.items()}
    wsum = np.zeros((h, w), np.float32)
    fwds = list(forwards) if forwards is not None else [forward] * len(devices)
    acts = activations or {}
    done = 0
    per_batch = cfg.batch_size * len(devices)
    for batch in _batches(tiles, per_batch):
        shapes = {(r1 - r0, c1 - c0) for r0, c0, r1, c1 in batch}
        groups = [[t for t in batch if (t[2] - t[0], t[3] - t[1]) == s] for s in shapes]
        for group in groups:
            crops = np.stack([np.asarray(image[r0:r1, c0:c1]) for r0, c0, r1, c1 in group])
            parts = np.array_split(np.arange(len(group)), len(devices))
            for dev, fwd, idx in zip(devices, fwds, parts):
                if len(idx) == 0:
                    continue
                x = torch.from_numpy(crops[idx]).to(dev).permute(0, 3, 1, 2).float().div_(255.0)
                if cfg.channels_last and dev.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16,
                                                            enabled=cfg.autocast_bf16 and dev.type == "cuda"):
                    out = fwd(x)
                    out = {k: (acts[k](out[k].float()) if k in acts else out[k].float()).cpu().numpy()
                           for k in channels}
                for j, ti in enumerate(idx):
                    r0, c0, r1, c1 = group[ti]
                    win = blend_window(r1 - r0, c1 - c0, cfg.halo_px, (r0 == 0, r1 == h, c0 == 0, c1 == w))
                    for k in channels:
                        acc[k][:, r0:r1, c0:c1] += out[k][j] * win
                    wsum[r0:r1, c0:c1] += win
        done += len(batch)
        yield {"stage": "predict", "done": done, "total": len(tiles)}
    for k in acc:
        acc[k] /= np.maximum(wsum, 1e-6)
    return acc
