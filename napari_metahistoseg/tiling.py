"""Tiled inference: overlapping tiles with a halo, blended with a smooth (cosine) ramp, batched, split across a
device set, under ``torch.inference_mode()``; and stitching of per-window instance maps into one.

Pieces, used by :func:`predict_tiled` (in memory) and by :func:`napari_metahistoseg.inference.predict_large`
(streamed, bounded memory):

* :func:`tile_grid` / :func:`blend_window` — where the tiles are and how they are weighted.
* :class:`TileRunner` — a batch of equal-size crops → blended-ready maps, optionally resampled to the model's
  resolution and back, the batch split across the devices (all devices are launched before any result is
  fetched, so CUDA devices run concurrently).
* :class:`BandBlender` — accumulates one row of tiles at a time and releases the rows that no later tile touches.
* :class:`InstanceStitcher` — HoVer post-processing in overlapping windows; each nucleus is kept by the window
  whose core holds its centroid and relabelled to a global id, so nuclei crossing window borders appear once and
  whole.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from .config import TilingConfig
from .devices import tune_cpu_allocator, with_intra_op_threads
from .postprocess import instance_table

Forward = Callable[[torch.Tensor], dict[str, torch.Tensor]]
Segment = Callable[[int, int, int, int], tuple[np.ndarray, dict]]
_EPS = 1e-6  # floor of the blend-weight sum (the cosine ramp is > 0 everywhere, this only guards rounding)


def tile_grid(shape: tuple[int, int], tile: int, halo: int, multiple: int = 1) -> list[tuple[int, int, int, int]]:
    """Tiles ``(r0, c0, r1, c1)`` covering ``shape``, row by row, neighbours overlapping by at least ``2*halo``.

    Balanced: per axis, the fewest tiles of at most ``tile`` px that can overlap that much, all of one size
    (rounded up to ``multiple`` where that stays ≤ ``tile``) and evenly spaced — e.g. 3 tiles of 384 px instead
    of 3 of 512 px for 1024 px with ``tile=512, halo=32``. An axis shorter than ``tile`` is one tile.
    """
    if tile - 2 * halo <= 0:
        raise ValueError(f"tile {tile} px must exceed twice the halo {halo} px")
    rows, cols = (_axis(n, tile, halo, multiple) for n in shape)
    return [(r, c, r + th, c + tw) for r, th in rows for c, tw in cols]


def _axis(n: int, tile: int, halo: int, multiple: int) -> list[tuple[int, int]]:
    """``(start, size)`` of the tiles along one axis of ``n`` px."""
    if n <= tile:
        return [(0, n)]
    k = -(-(n - 2 * halo) // (tile - 2 * halo))
    t = -(-(n - 2 * halo) // k) + 2 * halo
    t = min(tile, -(-t // multiple) * multiple) if multiple > 1 else t
    while True:
        starts = [(i * (n - t)) // (k - 1) for i in range(k)] if k > 1 else [0]
        if all(b - a <= t - 2 * halo for a, b in zip(starts, starts[1:], strict=False)) or t >= tile:
            return [(s, t) for s in starts]
        t += 1


def image_tiling(cfg: TilingConfig, scale: float) -> tuple[int, int, int]:
    """``(tile, halo, multiple)`` in image pixels for a model seeing ``scale`` model pixels per image pixel."""
    halo = math.ceil(cfg.halo_px / scale) if cfg.halo_px else 0
    return max(2 * halo + 1, round(cfg.tile_px / scale)), halo, max(1, round(cfg.tile_multiple_px / scale))


def blend_window(th: int, tw: int, halo: int, edges: tuple[bool, bool, bool, bool]) -> np.ndarray:
    """``(th, tw)`` float32 weights: cosine ramp over ``halo`` px on sides that touch another tile (``edges`` =
    top, bottom, left, right touch the image border → weight 1 there). Every weight is > 0."""
    return blend_window_t(th, tw, halo, edges, torch.device("cpu")).numpy()


def blend_window_t(th: int, tw: int, halo: int, edges: tuple[bool, bool, bool, bool],
                   device: torch.device) -> torch.Tensor:
    """:func:`blend_window` made on ``device``: on a GPU no host-to-device copy, which would wait for every queued
    forward to finish and leave the GPU idle while the host catches up."""

    def ramp(n: int, lo_border: bool, hi_border: bool) -> torch.Tensor:
        w = torch.ones(n, dtype=torch.float32, device=device)
        k = min(halo, n // 2)
        if k > 0:
            i = torch.arange(k, dtype=torch.float64, device=device)
            r = (0.5 - 0.5 * torch.cos(math.pi * (i + 0.5) / k)).float()
            if not lo_border:
                w[:k] = r
            if not hi_border:
                w[n - k:] = r.flip(0)
        return w

    return torch.outer(ramp(th, edges[0], edges[1]), ramp(tw, edges[2], edges[3]))


class TileRunner:
    """Run a batch of crops ``(N, h, w, 3) uint8`` through ``forwards[d]`` on ``devices[d]``.

    ``channels`` names the outputs to keep and their channel counts; ``activations`` maps output names to a
    function applied on the device (e.g. softmax). With ``model_hw`` the crops are resized (bilinear, antialiased
    when shrinking) to it before the forward and the outputs resized back to ``(h, w)``. Returns
    ``{name: (N, C, h, w) float32}``. Inputs are made channels-last where ``cfg.channels_last_on`` the device, on
    a CPU only with ``cpu_channels_last`` (the caller's CPU model follows ``cfg``: faster when the weights are
    channels-last too, slower otherwise).
    """

    def __init__(self, forwards: Sequence[Forward], devices: Sequence[torch.device], cfg: TilingConfig,
                 channels: dict[str, int], activations: dict[str, Callable] | None = None, *,
                 cpu_channels_last: bool = False) -> None:
        if len(forwards) != len(devices):
            raise ValueError(f"{len(forwards)} forwards for {len(devices)} devices")
        self.devices, self.cfg = list(devices), cfg
        self.forwards = [compiled(f) if cfg.compile and torch.device(d).type == "cuda" else f
                         for f, d in zip(forwards, self.devices, strict=True)]
        self.channels, self.acts = dict(channels), dict(activations or {})
        self.cpu_channels_last = cpu_channels_last
        self.workers = cfg.workers_for(self.devices)
        if any(torch.device(d).type == "cpu" for d in self.devices):
            tune_cpu_allocator(cfg.malloc_keep_mb)

    def __call__(self, crops: np.ndarray, model_hw: tuple[int, int] | None = None, *,
                 on: torch.device | None = None) -> dict[str, np.ndarray] | dict[str, torch.Tensor]:
        """``on``: return the outputs as tensors on that device (for blending there) instead of host arrays."""
        n, h, w = crops.shape[:3]
        if self.workers > 1 and n > 1:  # CPU only: parts of the batch side by side, one intra-op thread each
            parts = np.array_split(np.arange(n), min(n, self.workers))
            pool = _cpu_pool(self.workers)
            futures = [(idx, pool.submit(with_intra_op_threads, 1, self._launch, self.devices[0],
                                         self.forwards[i % len(self.forwards)], crops[idx], model_hw))
                       for i, idx in enumerate(parts)]
            pending = [(idx, f.result()) for idx, f in futures]
        else:
            parts = np.array_split(np.arange(n), len(self.devices))
            pending = [(idx, self._launch(dev, fwd, crops[idx], model_hw))
                       for dev, fwd, idx in zip(self.devices, self.forwards, parts, strict=False) if len(idx)]
        if on is not None:
            if len(pending) == 1:
                return {k: v.to(on) for k, v in pending[0][1].items()}
            return {k: torch.cat([res[k].to(on) for _, res in pending]) for k in self.channels}
        outs = {k: np.empty((n, c, h, w), np.float32) for k, c in self.channels.items()}
        for idx, res in pending:
            for k in outs:
                outs[k][idx] = to_host(res[k])  # from a GPU through page-locked memory (streamed slides)
        return outs

    def _launch(self, dev: torch.device, fwd: Forward, crops: np.ndarray,
                model_hw: tuple[int, int] | None) -> dict[str, torch.Tensor]:
        h, w = crops.shape[1:3]
        x = crops if isinstance(crops, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(crops))
        x = x.to(dev, non_blocking=True).permute(0, 3, 1, 2)
        x = x.float().div_(255.0)
        resize = model_hw is not None and tuple(model_hw) != (h, w)
        if resize:
            x = F.interpolate(x, size=tuple(model_hw), mode="bilinear", align_corners=False,
                              antialias=model_hw[0] < h)
        if self.cfg.channels_last_on(dev) and (dev.type != "cpu" or self.cpu_channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16,
                                                    enabled=self.cfg.autocast_bf16 and dev.type == "cuda"):
            out = fwd(x)
            res = {}
            for k in self.channels:
                t = out[k].float()
                t = self.acts[k](t) if k in self.acts else t
                if resize:
                    t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
                res[k] = t.contiguous()
        return res


def compiled(fwd: Forward) -> Forward:
    """``torch.compile`` of a tile forward (:attr:`TilingConfig.compile`), static shapes. Compiled code is cached
    per code object, so the fresh forward closures of later predictions (other images, other heads of the same
    architecture) reuse it."""
    return torch.compile(fwd, dynamic=False)


_CPU_POOLS: dict[int, ThreadPoolExecutor] = {}
_CPU_POOLS_LOCK = threading.Lock()


def _cpu_pool(workers: int) -> ThreadPoolExecutor:
    """Shared tile threads (one pool per size, created on first use)."""
    with _CPU_POOLS_LOCK:
        if workers not in _CPU_POOLS:
            _CPU_POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="tile-cpu")
        return _CPU_POOLS[workers]


def group_by_shape(tiles: Sequence[tuple[int, int, int, int]]) -> list[list[tuple[int, int, int, int]]]:
    """Tiles grouped by ``(height, width)`` (each group can be stacked into one batch), in first-seen order."""
    groups: dict[tuple[int, int], list] = {}
    for t in tiles:
        groups.setdefault((t[2] - t[0], t[3] - t[1]), []).append(t)
    return list(groups.values())


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
    cpu_channels_last: bool = False,
    as_tensors: bool = False,
) -> Generator[dict, None, dict[str, np.ndarray] | dict[str, torch.Tensor]]:
    """Run ``forward`` over ``image (H,W,3) uint8`` (or any array-like readable by slicing, or a uint8 tensor on
    a device) tile by tile.

    ``channels`` names the outputs to keep and their channel counts; ``activations`` maps output names to a
    function applied on the device before blending (e.g. softmax). ``forwards[d]`` is the forward on
    ``devices[d]`` (default: ``forward`` for every device; tiles of a batch are split across devices).
    ``cpu_channels_last``: see :class:`TileRunner`. Tiles are blended on the first device when it is a GPU
    (:func:`blend_device`). Yields ``{"stage": "predict", "done", "total"}`` per batch; returns
    ``{name: (C, H, W) float32}`` arrays, or with ``as_tensors`` tensors where they were blended.
    """
    h, w = image.shape[:2]
    tiles = tile_grid((h, w), cfg.tile_px, cfg.halo_px, cfg.tile_multiple_px)
    on = blend_device(cfg, devices, (h, w), sum(channels.values()))
    if on is not None and not isinstance(image, torch.Tensor) and isinstance(image, np.ndarray):
        image = upload(image, on)  # up once; tiles are cut on the device
    stack = torch.stack if isinstance(image, torch.Tensor) else lambda crops: np.stack([np.asarray(c) for c in crops])
    if on is None:
        acc = {k: np.zeros((c, h, w), np.float32) for k, c in channels.items()}
        wsum = np.zeros((h, w), np.float32)
    else:  # blended where the tiles were computed: no per-tile copies to host memory
        acc = {k: torch.zeros((c, h, w), dtype=torch.float32, device=on) for k, c in channels.items()}
        wsum = torch.zeros((h, w), dtype=torch.float32, device=on)
    windows: dict[tuple, np.ndarray | torch.Tensor] = {}
    fwds = list(forwards) if forwards is not None else [forward] * len(devices)
    runner = TileRunner(fwds, devices, cfg, channels, activations, cpu_channels_last=cpu_channels_last)
    done = 0
    for batch in _batches(tiles, cfg.batch_for(devices) * len(devices)):
        for group in group_by_shape(batch):
            out = runner(stack([image[r0:r1, c0:c1] for r0, c0, r1, c1 in group]), on=on)
            for j, (r0, c0, r1, c1) in enumerate(group):
                key = (r1 - r0, c1 - c0, r0 == 0, r1 == h, c0 == 0, c1 == w)
                if key not in windows:
                    windows[key] = (blend_window(key[0], key[1], cfg.halo_px, key[2:]) if on is None
                                    else blend_window_t(key[0], key[1], cfg.halo_px, key[2:], on))
                win = windows[key]
                for k in channels:
                    acc[k][:, r0:r1, c0:c1] += out[k][j] * win
                wsum[r0:r1, c0:c1] += win
        done += len(batch)
        yield {"stage": "predict", "done": done, "total": len(tiles)}
    if on is not None:
        wsum = wsum.clamp_min_(_EPS)
        return {k: v.div_(wsum) if as_tensors else to_host(v / wsum) for k, v in acc.items()}
    for k in acc:
        acc[k] /= np.maximum(wsum, _EPS)
    return {k: torch.from_numpy(v) for k, v in acc.items()} if as_tensors else acc


def upload(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """``image`` as a tensor on ``device`` (one copy). A read-only array (a memory-mapped file, a napari layer's
    data) is uploaded as it is: the tensor over it is only read, so torch's warning about it does not apply."""
    a = np.ascontiguousarray(image)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a).to(device)


def to_host(t: torch.Tensor) -> np.ndarray:
    """A host array of a tensor; from a GPU through page-locked memory (torch's caching host allocator reuses it
    from call to call): 2.5 ms instead of 107 ms for two 16 MP float32 maps on an H200 (BENCHMARKS.md)."""
    if t.device.type != "cuda":
        return t.detach().cpu().numpy()  # (a no-op copy for CPU tensors; MPS tensors need it)
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t)
    return host.numpy()


def blend_device(cfg: TilingConfig, devices: Sequence[torch.device], shape: tuple[int, int],
                 channels: int, extra_mb: float = 0.0) -> torch.device | None:
    """The device that blends the tiles of an in-memory prediction: the first of ``devices`` when it is a CUDA GPU and
    the float32 accumulators (``channels`` maps + the weights of ``shape``) and ``extra_mb`` (e.g. the image) fit
    both ``cfg.device_blend_max_mb`` and half of the memory the device has free; else ``None`` (host memory)."""
    dev = torch.device(devices[0])
    if dev.type != "cuda":  # CPUs blend in host memory anyway; MPS keeps the host path (tested on CUDA only)
        return None
    need_mb = (channels + 1) * shape[0] * shape[1] * 4 / 2**20 + extra_mb
    return dev if need_mb <= min(cfg.device_blend_max_mb, _free_mb(dev) / 2) else None


def _free_mb(dev: torch.device) -> float:
    """Free memory of a CUDA device in MB (inf where it cannot be asked)."""
    try:
        return torch.cuda.mem_get_info(dev)[0] / 2**20
    except (RuntimeError, AssertionError):
        return math.inf


class BandBlender:
    """Blend tiles of ``rows`` px height into ``(C, rows, width)`` buffers, one row of tiles at a time.

    Buffer row 0 is image row ``top``. :meth:`release` hands back the finished rows ``[top, until)`` normalised by
    the blend-weight sum, as views of the buffer that stay valid until the next :meth:`add` or :meth:`release`
    (which first moves the rest up), so memory stays ``(sum C * itemsize + 4) * rows * width`` bytes. ``dtype``
    of the accumulators: float32, or float16 to halve the memory of very wide bands (blend weights are float32).
    """

    def __init__(self, width: int, rows: int, channels: dict[str, int], dtype: type = np.float32) -> None:
        self.top, self.rows, self._released = 0, rows, 0
        self.acc = {k: np.zeros((c, rows, width), dtype) for k, c in channels.items()}
        self.wsum = np.zeros((rows, width), np.float32)

    def _settle(self) -> None:
        n, self._released = self._released, 0
        if n:
            for a in [*self.acc.values(), self.wsum[None]]:
                a[:, :self.rows - n] = a[:, n:]  # numpy buffers overlapping copies
                a[:, self.rows - n:] = 0

    def add(self, maps: dict[str, np.ndarray], win: np.ndarray, r0: int, c0: int) -> None:
        """Add ``maps {name: (C, h, w)}`` weighted by ``win (h, w)`` at image position ``(r0, c0)``."""
        self._settle()
        h, w = win.shape
        rr = r0 - self.top
        if rr < 0 or rr + h > self.rows:
            raise ValueError(f"tile rows {r0}:{r0 + h} outside the band {self.top}:{self.top + self.rows}")
        for k, a in self.acc.items():
            a[:, rr:rr + h, c0:c0 + w] += maps[k] * win
        self.wsum[rr:rr + h, c0:c0 + w] += win

    def release(self, until: int) -> dict[str, np.ndarray]:
        """Rows ``[top, until)`` normalised (``{name: (C, until - top, width)}`` views); the band moves down."""
        self._settle()
        n = until - self.top
        if not 0 <= n <= self.rows:
            raise ValueError(f"cannot release rows {self.top}:{until} of a {self.rows}-row band")
        norm = np.maximum(self.wsum[:n], _EPS)
        for a in self.acc.values():
            a[:, :n] /= norm
        self.top, self._released = until, n
        return {k: a[:, :n] for k, a in self.acc.items()}


class InstanceStitcher:
    """Instance segmentation in overlapping windows, stitched into one map of shape ``(H, W)`` with global ids.

    Windows tile the image with cores of ``core`` px and ``margin`` px of context on every side. ``segment(r0, c0,
    r1, c1)`` segments one window and returns ``(instances (h, w) uint32, table)`` with the table of
    :func:`napari_metahistoseg.postprocess.instance_table` in window coordinates. An instance is kept only by the
    window whose core holds its centroid, so a nucleus crossing a core border is kept once, and whole as long as
    ``margin`` exceeds its diameter. Kept instances get ids 1, 2, ... in processing order and are pasted onto
    pixels that no earlier instance holds; the area, bbox and centroid of one that loses pixels are those of the
    pixels written (its type and type probability those of the whole segmented nucleus), and one that loses
    every pixel is dropped. Finished rows go to ``write(r0, block (h, W) uint32)``, per-window tables (global
    ids and coordinates; contours too when the segmenter's table has them) to ``emit(table)``.

    Call :meth:`advance` with the number of image rows whose maps are final; it processes every window row whose
    context is then available (yielding progress per window).
    """

    def __init__(self, shape: tuple[int, int], *, core: int, margin: int, segment: Segment,
                 write: Callable[[int, np.ndarray], None], emit: Callable[[dict], None]) -> None:
        if core <= 0 or margin < 0:
            raise ValueError(f"instance windows need core > 0 and margin >= 0, got {core} and {margin}")
        self.h, self.w = shape
        self.core, self.margin = core, margin
        self.segment, self.write, self.emit = segment, write, emit
        self.rows = [(a, min(a + core, self.h)) for a in range(0, self.h, core)]
        self.cols = [(c, min(c + core, self.w)) for c in range(0, self.w, core)]
        self.total = len(self.rows) * len(self.cols)
        self.next_row = 0
        self.done = 0
        self.n_instances = 0
        self.buf_top = 0
        self.buf = np.zeros((min(self.h, core + 2 * margin), self.w), np.uint32)

    @property
    def finished(self) -> bool:
        return self.next_row >= len(self.rows)

    def needs(self) -> int:
        """Image rows that must be final before the next window row can run."""
        return min(self.h, self.rows[self.next_row][1] + self.margin) if not self.finished else self.h

    def advance(self, available_rows: int) -> Generator[dict, None, None]:
        while not self.finished and self.needs() <= available_rows:
            yield from self._row(self.next_row)
            self.next_row += 1

    def _row(self, j: int) -> Generator[dict, None, None]:
        a, b = self.rows[j]
        e0, e1 = max(0, a - self.margin), min(self.h, b + self.margin)
        if e0 != self.buf_top:
            raise RuntimeError(f"window row {j} starts at row {e0}, the buffer at {self.buf_top}")
        for c, d in self.cols:
            x0, x1 = max(0, c - self.margin), min(self.w, d + self.margin)
            inst, table = self.segment(e0, x0, e1, x1)
            self._paste(inst, table, (e0, x0), (a, b, c, d))
            self.done += 1
            yield {"stage": "instances", "done": self.done, "total": self.total}
        last = j == len(self.rows) - 1
        fin = e1 if last else max(e0, b - self.margin)
        self.write(e0, self.buf[:fin - e0].copy())
        n = fin - e0
        self.buf[:self.buf.shape[0] - n] = self.buf[n:]
        self.buf[self.buf.shape[0] - n:] = 0
        self.buf_top = fin

    def _paste(self, inst: np.ndarray, table: dict, origin: tuple[int, int], core: tuple[int, int, int, int]) -> None:
        (r0, c0), (a, b, c, d) = origin, core
        cy = np.asarray(table["centroid_row"], np.float64) + r0
        cx = np.asarray(table["centroid_col"], np.float64) + c0
        k = np.flatnonzero((cy >= a) & (cy < b) & (cx >= c) & (cx < d))  # the table rows this window keeps
        if not k.size:
            return
        lut = np.zeros(int(inst.max()) + 1, np.int64)
        lut[np.asarray(table["id"], np.int64)[k]] = np.arange(1, k.size + 1)
        rank = lut[inst]  # i + 1 on the pixels of kept instance k[i], 0 elsewhere
        view = self.buf[r0 - self.buf_top:r0 - self.buf_top + inst.shape[0], c0:c0 + inst.shape[1]]
        free = (view == 0) & (rank > 0)
        cy, cx = cy[k], cx[k]
        bbox = np.asarray(table["bbox"], np.int64).reshape(-1, 4)[k]
        area = np.asarray(table["area_px"], np.int64)[k]
        contours = [np.asarray(table["contour"][j], np.float64) + (r0, c0) for j in k] if "contour" in table else None
        for i in np.unique(rank[(rank > 0) & ~free]) - 1:  # the (few) instances that lose pixels to earlier ones
            y0, x0, y1, x1 = bbox[i]
            written = free[y0:y1, x0:x1] & (rank[y0:y1, x0:x1] == i + 1)
            rr, cc = np.nonzero(written)
            area[i] = rr.size
            if rr.size:
                bbox[i] = (y0 + rr.min(), x0 + cc.min(), y0 + rr.max() + 1, x0 + cc.max() + 1)
                cy[i], cx[i] = y0 + rr.mean() + r0, x0 + cc.mean() + c0
                if contours is not None:  # the outline of what was written
                    contours[i] = instance_table(written.astype(np.uint32))["contour"][0] + (y0 + r0, x0 + c0)
        kept = area > 0  # an instance covered entirely by earlier ones is dropped
        gid = np.zeros(k.size + 1, np.uint32)
        gid[1:][kept] = np.arange(self.n_instances + 1, self.n_instances + 1 + int(kept.sum()), dtype=np.uint32)
        self.n_instances += int(kept.sum())
        view[free] = gid[rank[free]]
        out = {"id": gid[1:][kept], "centroid_row": cy[kept], "centroid_col": cx[kept],
               "bbox": bbox[kept] + np.array([r0, c0, r0, c0]), "area_px": area[kept]}
        for key in ("type", "type_prob"):
            if key in table:
                out[key] = np.asarray(table[key])[k][kept]
        if contours is not None:
            out["contour"] = [c for c, keep in zip(contours, kept, strict=True) if keep]
        self.emit(out)
