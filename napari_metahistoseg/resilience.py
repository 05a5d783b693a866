"""Out-of-memory fallback for tiled work: retry with smaller batches, then smaller tiles, or fail clearly.

:func:`with_oom_fallback` runs ``fn(tiling)`` and, when a device runs out of memory (``torch.OutOfMemoryError``
or a ``RuntimeError`` whose message says "out of memory", as older torch versions and MPS raise), retries with
the next smaller setting of :func:`smaller_tiling`: first the batch is halved down to
:attr:`OOMFallbackConfig.min_batch_size`, then the tile side is halved down to :attr:`OOMFallbackConfig.min_tile_px`
(the halo shrinks with it so that ``2 * halo_px < tile_px`` stays true). At the floor it raises one clear
``ValueError`` saying what was tried. :func:`oom_fallback_gen` does the same for the library's progress
generators (``predict``, ``predict_tiled``); a retry starts the work again and its progress restarts at 0.

Only out-of-memory errors are retried; any other exception propagates unchanged. Device memory is released
(``torch.cuda.empty_cache``) before each retry.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from .config import TilingConfig

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class OOMFallbackConfig:
    """How far :func:`with_oom_fallback` may shrink the tiling before it gives up."""

    min_tile_px: int = 64  # smallest tile side tried (model pixels); below it the model sees too little context
    min_batch_size: int = 1  # smallest number of tiles per forward pass and device

    def __post_init__(self) -> None:
        if self.min_tile_px < 1 or self.min_batch_size < 1:
            raise ValueError("OOMFallbackConfig needs min_tile_px >= 1 and min_batch_size >= 1")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is a device out-of-memory error (CUDA, MPS, or a CPU allocator failure reported by torch)."""
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if isinstance(t, type))
    if oom_types and isinstance(err, oom_types):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def smaller_tiling(cfg: TilingConfig, fallback: OOMFallbackConfig | None = None) -> TilingConfig | None:
    """The next smaller setting after an out-of-memory error (batch first, then tile side), or None at the floor."""
    fb = fallback or OOMFallbackConfig()
    if cfg.batch_size > fb.min_batch_size:
        return dataclasses.replace(cfg, batch_size=max(fb.min_batch_size, cfg.batch_size // 2))
    if cfg.tile_px > fb.min_tile_px:
        tile = max(fb.min_tile_px, cfg.tile_px // 2)
        return dataclasses.replace(cfg, tile_px=tile, halo_px=min(cfg.halo_px, (tile - 1) // 2))
    return None


def _release_device_memory() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _give_up(cfg: TilingConfig, first: TilingConfig, err: BaseException) -> ValueError:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return ValueError(
        f"out of memory even at the smallest tiling (tile_px={cfg.tile_px}, batch_size={cfg.batch_size}; "
        f"started at tile_px={first.tile_px}, batch_size={first.batch_size}): {reason}. Free device memory "
        "(close other programs), predict on the CPU, or downscale the image"
    )


def with_oom_fallback(
    fn: Callable[[TilingConfig], T], tiling_cfg: TilingConfig, *, fallback: OOMFallbackConfig | None = None
) -> T:
    """``fn(tiling)``, retried with smaller tilings on out-of-memory errors (module docstring); ValueError at the
    floor. ``fn`` must not keep partial results between calls: each retry starts from scratch."""
    cfg = tiling_cfg
    while True:
        try:
            return fn(cfg)
        except Exception as e:  # noqa: BLE001 - only out-of-memory errors are handled, the rest re-raised
            if not is_out_of_memory(e):
                raise
            nxt = smaller_tiling(cfg, fallback)
            if nxt is None:
                raise _give_up(cfg, tiling_cfg, e) from e
            log.warning("out of memory at tile_px=%d, batch_size=%d; retrying with tile_px=%d, batch_size=%d",
                        cfg.tile_px, cfg.batch_size, nxt.tile_px, nxt.batch_size)
        # retry outside the except block, so that the failed attempt's frames (and tensors) are released first
        _release_device_memory()
        cfg = nxt


def oom_fallback_gen(
    gen_fn: Callable[[TilingConfig], Generator[dict, None, T]],
    tiling_cfg: TilingConfig,
    *,
    fallback: OOMFallbackConfig | None = None,
) -> Generator[dict, Any, T]:
    """Generator version of :func:`with_oom_fallback`: ``yield from gen_fn(tiling)`` and return its value,
    restarting with a smaller tiling on out-of-memory errors."""
    cfg = tiling_cfg
    while True:
        try:
            return (yield from gen_fn(cfg))
        except Exception as e:  # noqa: BLE001 - only out-of-memory errors are handled, the rest re-raised
            if not is_out_of_memory(e):
                raise
            nxt = smaller_tiling(cfg, fallback)
            if nxt is None:
                raise _give_up(cfg, tiling_cfg, e) from e
            log.warning("out of memory at tile_px=%d, batch_size=%d; retrying with tile_px=%d, batch_size=%d",
                        cfg.tile_px, cfg.batch_size, nxt.tile_px, nxt.batch_size)
        _release_device_memory()
        cfg = nxt
