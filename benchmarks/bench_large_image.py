"""Benchmark: a whole-slide-sized image end to end with bounded memory.

1. Writes a ``--size`` x ``--size`` RGB tiled, JPEG-compressed TIFF of a synthetic H&E-like texture (pink tissue
   with purple nuclei and patches of white glass) at ``--mpp`` µm/px to ``--dir``, tile by tile from a generator,
   in a child process (so writing is bounded-memory too, and its peak RSS is measured separately).
2. Runs :func:`napari_metahistoseg.inference.predict_large` on it with the real backbone (bundled, else
   ``runs/backbone/last``): semantic segmentation and, unless ``--no-instances``, HoVer instances (stitched over
   windows) and the nuclei CSV, streamed into ``<dir>/slide_<size>.zarr``.
3. Reports wall time, time in prediction vs instance post-processing, throughput and the peak resident memory
   (``resource.getrusage`` ``ru_maxrss`` and a psutil sampling thread). Target: peak RSS ≤ 2 GB for 20000².

Writes ``benchmarks/results/large_image_<size>.json``. Quick run: ``--size 4096``.

    .venv/bin/python benchmarks/bench_large_image.py --size 4096
    nohup .venv/bin/python benchmarks/bench_large_image.py --size 20000 > /tmp/large.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py)

TILE = 256  # TIFF tile side
CELL_UM = 12.0  # one potential nucleus per cell of this side
NUCLEUS_RADIUS_UM = (2.5, 4.5)  # nucleus radius range
GLASS_CELL_UM = 400.0  # coarse cells of tissue or empty glass
GLASS_FRACTION = 0.25
SEED = 0


# ------------------------------------------------------------------------------------------ synthetic slide


def _hash(*keys: np.ndarray) -> np.ndarray:
    """Deterministic uniform [0, 1) numbers from integer keys (splitmix64 over a key combination)."""
    with np.errstate(over="ignore"):
        x = np.uint64(SEED + 0x9E3779B97F4A7C15)
        for i, k in enumerate(keys):
            x = x ^ (np.asarray(k, np.int64).astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9 + 2 * i + 1))
            x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def texture_tile(r0: int, c0: int, h: int, w: int, mpp: float) -> np.ndarray:
    """``(h, w, 3) uint8`` of the synthetic slide at ``(r0, c0)``: any tile can be made independently."""
    cell = CELL_UM / mpp
    ci = np.floor(np.arange(r0, r0 + h) / cell).astype(np.int64)
    cj = np.floor(np.arange(c0, c0 + w) / cell).astype(np.int64)
    gi = np.arange(ci[0] - 1, ci[-1] + 2)[:, None]  # the cells around the tile, and their nuclei
    gj = np.arange(cj[0] - 1, cj[-1] + 2)[None, :]
    cy, cx = (gi + 0.2 + 0.6 * _hash(gi, gj, 1)) * cell, (gj + 0.2 + 0.6 * _hash(gi, gj, 2)) * cell
    rad = (NUCLEUS_RADIUS_UM[0] + (NUCLEUS_RADIUS_UM[1] - NUCLEUS_RADIUS_UM[0]) * _hash(gi, gj, 3)) / mpp
    present, shade_of = _hash(gi, gj, 4) < 0.6, _hash(gi, gj, 5)
    rr, cc = np.arange(r0, r0 + h, dtype=np.float32)[:, None], np.arange(c0, c0 + w, dtype=np.float32)[None, :]
    li, lj = (ci - gi[0, 0])[:, None], (cj - gj[0, 0])[None, :]
    best = np.full((h, w), np.inf, np.float32)
    shade = np.zeros((h, w), np.float32)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            a, b = li + di, lj + dj
            d = np.hypot(rr - cy[a, b], cc - cx[a, b]) / rad[a, b]
            d[~present[a, b]] = np.inf
            closer = d < best
            best[closer] = d[closer]
            shade[closer] = shade_of[a, b][closer]
    g = GLASS_CELL_UM / mpp
    glass = _hash(np.floor(rr / g).astype(np.int64), np.floor(cc / g).astype(np.int64), 6) < GLASS_FRACTION
    noise = np.random.default_rng((SEED, r0, c0)).random((h, w), np.float32) - 0.5
    tissue = np.array([228.0, 170.0, 205.0], np.float32) + 18 * noise[..., None]
    nucleus = np.array([95.0, 60.0, 140.0], np.float32) * (0.8 + 0.4 * shade[..., None]) + 12 * noise[..., None]
    edge = np.clip((1.15 - best) / 0.3, 0, 1)[..., None]  # soft nucleus border
    rgb = tissue * (1 - edge) + nucleus * edge
    rgb = np.where(glass[..., None], np.array([245.0, 243.0, 246.0], np.float32) + 4 * noise[..., None], rgb)
    return np.clip(rgb, 0, 255).astype(np.uint8)


GLAND_CELL_UM = 120.0  # one potential gland per cell of this side (object-instance benchmark)
GLAND_RADIUS_UM = (30.0, 58.0)  # neighbours can touch: the rules must split them at the neck
LUMEN_FRACTION = 0.35  # lumen radius / gland radius (a hole the rules fill)


def gland_rows(r0: int, h: int, w: int, mpp: float) -> np.ndarray:
    """``(h, w) uint8`` semantic map (1 = gland) of a synthetic gland layout, rows ``r0 .. r0 + h``."""
    cell = GLAND_CELL_UM / mpp
    ci = np.floor(np.arange(r0, r0 + h) / cell).astype(np.int64)
    gi = np.arange(ci[0] - 1, ci[-1] + 2)[:, None]
    gj = np.arange(-1, int(w / cell) + 2)[None, :]
    cy, cx = (gi + 0.15 + 0.7 * _hash(gi, gj, 11)) * cell, (gj + 0.15 + 0.7 * _hash(gi, gj, 12)) * cell
    rad = (GLAND_RADIUS_UM[0] + (GLAND_RADIUS_UM[1] - GLAND_RADIUS_UM[0]) * _hash(gi, gj, 13)) / mpp
    present = _hash(gi, gj, 14) < 0.7
    out = np.zeros((h, w), bool)
    for a, b in zip(*np.nonzero(present), strict=True):  # each gland drawn inside its bounding box only
        y, x, r = cy[a, b] - r0, cx[a, b], rad[a, b]
        y0, y1, x0, x1 = max(0, int(y - r)), min(h, int(y + r) + 2), max(0, int(x - r)), min(w, int(x + r) + 2)
        if y1 <= y0 or x1 <= x0:
            continue
        d = np.hypot(np.arange(y0, y1)[:, None] - y, np.arange(x0, x1)[None, :] - x)
        out[y0:y1, x0:x1] |= (d <= r) & (d > LUMEN_FRACTION * r)
    return out.astype(np.uint8)


def write_slide(path: Path, size: int, mpp: float) -> dict:
    """Write the synthetic slide tile by tile (bounded memory); returns timing and peak RSS."""
    import tifffile

    t0 = time.time()

    def tiles():
        for r in range(0, size, TILE):
            for c in range(0, size, TILE):
                yield texture_tile(r, c, TILE, TILE, mpp)  # edge tiles are written full size and cropped

    tifffile.imwrite(path, tiles(), shape=(size, size, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                     compression="jpeg", compressionargs={"level": 90}, resolution=(1e4 / mpp, 1e4 / mpp),
                     resolutionunit="CENTIMETER", bigtiff=size * size * 3 > 2**31)
    return {"write_s": time.time() - t0, "write_peak_rss_mb": _ru_maxrss_mb(), "file_mb": path.stat().st_size / 1e6}


# ------------------------------------------------------------------------------------------ memory


def _ru_maxrss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


class RSSSampler(threading.Thread):
    """Peak resident set size by sampling (psutil, if installed) every ``every_s`` seconds."""

    def __init__(self, every_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.every_s, self.peak_mb, self._halt = every_s, 0.0, threading.Event()
        try:
            import psutil

            self._proc = psutil.Process()
        except ImportError:
            self._proc = None

    def run(self) -> None:
        while self._proc is not None and not self._halt.is_set():
            self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)
            self._halt.wait(self.every_s)

    def stop(self) -> float | None:
        self._halt.set()
        self.join()
        return self.peak_mb if self._proc is not None else None


# ------------------------------------------------------------------------------------------ run


def predict(args, slide: Path) -> dict:
    import torch

    from napari_metahistoseg.config import MAMLConfig, TilingConfig
    from napari_metahistoseg.inference import predict_large
    from napari_metahistoseg.pipeline import AdaptedHead, initial_head, load_backbone

    torch.set_num_threads(args.threads)
    bb = load_backbone(common.resolve_checkpoint("auto", "backbone"))
    head = AdaptedHead(["background", "foreground"], initial_head(bb, 2), bb.sha256, MAMLConfig(), bb.mpp)
    tiling = TilingConfig(tile_px=args.tile, batch_size=args.batch)
    sampler = RSSSampler()
    sampler.start()
    t0 = last = time.time()
    cpu0 = time.process_time()
    spent = {"predict": 0.0, "instances": 0.0}
    gen = predict_large(bb, head, slide, out_dir=Path(args.dir) / f"slide_{args.size}.zarr", tiling=tiling,
                        instances=not args.no_instances, np_source="hover", devices=args.devices,
                        objects=args.objects)
    shown = 0.0
    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            res = stop.value
            break
        now = time.time()
        spent[p["stage"]] = spent.get(p["stage"], 0.0) + now - last
        last = now
        if now - shown > 30:
            shown = now
            print(f"  [{p['stage']}] {p['done']}/{p['total']} after {now - t0:.0f} s, "
                  f"RSS {sampler.peak_mb:.0f} MB peak", flush=True)
    wall, cpu = time.time() - t0, time.process_time() - cpu0
    peak = sampler.stop()
    mp = args.size * args.size / 1e6
    return {"wall_s": wall, "cpu_s": cpu, "predict_s": spent["predict"], "instances_s": spent["instances"],
            "objects_s": spent.get("objects", 0.0), "objects": res.n_objects, "pyramid_s": spent.get("pyramid", 0.0),
            "tiles": res.tiles, "nuclei": res.n_instances, "image_mp": mp, "image_mp_per_s": mp / wall,
            "model_mp": mp * (args.mpp / bb.mpp) ** 2, "peak_rss_mb_sampled": peak, "peak_rss_mb_ru_maxrss":
            _ru_maxrss_mb(), "threads": args.threads, "tile_px": args.tile, "batch": args.batch,
            "devices": args.devices, "backbone": bb.name, "store": str(res.store),
            "store_mb": sum(f.stat().st_size for f in Path(res.store).rglob("*") if f.is_file()) / 1e6}


def objects_only(args) -> dict:
    """Large-object instances (``inference.large_objects``) of a synthetic whole-slide gland map (written to
    ``<dir>/glands_<size>.zarr`` row block by row block: glands with lumens on a jittered grid, some touching)."""
    import zarr

    from napari_metahistoseg.config import ObjectPostConfig
    from napari_metahistoseg.inference import LargePrediction, large_objects
    from napari_metahistoseg.maml import run
    from napari_metahistoseg.slide import create_outputs

    store = Path(args.dir) / f"glands_{args.size}.zarr"
    t0 = time.time()
    root = create_outputs(store, (args.size, args.size), {"semantic": ((), "uint8")}, chunk_px=512)
    for r in range(0, args.size, 512):
        root["semantic"][r:r + 512] = gland_rows(r, min(512, args.size - r), args.size, args.mpp)
    root.attrs.update({"complete": True, "classes": ["background", "gland"], "mpp": args.mpp})
    print(f"synthetic gland map written in {time.time() - t0:.0f} s", flush=True)
    res = LargePrediction(store, (args.size, args.size), ["background", "gland"], args.mpp, 0)
    cfg = ObjectPostConfig()
    sampler = RSSSampler()
    sampler.start()
    t0, cpu0 = time.time(), time.process_time()
    n = run(large_objects(res, cfg, store.with_suffix(".objects.csv")))
    wall, cpu = time.time() - t0, time.process_time() - cpu0
    fg = float(np.mean([(root["semantic"][r:r + 1000] > 0).mean() for r in range(0, res.shape[0], 1000)]))
    return {"objects_only": True, "objects_s": wall, "cpu_s": cpu, "objects": n, "foreground_fraction": fg,
            "work_factor": int(zarr.open_group(str(store), mode="r").attrs["objects_work_factor"]),
            "object_cfg": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
            "peak_rss_mb_sampled": sampler.stop(), "peak_rss_mb_ru_maxrss": _ru_maxrss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=20000, help="image side in pixels (4096 for a quick run)")
    ap.add_argument("--mpp", type=float, default=0.25, help="µm per pixel of the synthetic slide (40x: 0.25)")
    ap.add_argument("--dir", default="/tmp/metahistoseg_large", help="where the slide and the outputs go")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tile", type=int, default=512, help="TilingConfig.tile_px (model px)")
    ap.add_argument("--batch", type=int, default=2, help="TilingConfig.batch_size")
    ap.add_argument("--devices", default="cpu")
    ap.add_argument("--no-instances", action="store_true")
    ap.add_argument("--objects", action="store_true", help="also large-object (gland) instances of the foreground")
    ap.add_argument("--objects-only", action="store_true",
                    help="only the large-object instances, of a synthetic gland map of the same size")
    ap.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    slide = d / f"slide_{args.size}_{args.mpp}.tif"
    if args.write_only:
        print(json.dumps(write_slide(slide, args.size, args.mpp)))
        return
    if args.objects_only:
        res = {**objects_only(args), "size": args.size, "mpp": args.mpp, "commit": common.git_commit(),
               "load_avg_end": [round(x, 2) for x in os.getloadavg()],
               "command": " ".join([".venv/bin/python", *sys.argv])}
        print(f"{args.size}²: {res['objects']} objects in {res['objects_s']:.0f} s (grid factor {res['work_factor']}, "
              f"foreground {res['foreground_fraction']:.1%}); peak RSS {res['peak_rss_mb_ru_maxrss']:.0f} MB")
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"large_objects_{args.size}.json").write_text(json.dumps(res, indent=1) + "\n")
        return
    write = {"reused": True, "file_mb": slide.stat().st_size / 1e6} if slide.exists() else None
    if write is None:
        print(f"writing {slide} ({args.size}² at {args.mpp} µm/px) ...", flush=True)
        out = subprocess.run([sys.executable, __file__, "--write-only", "--size", str(args.size), "--mpp",
                              str(args.mpp), "--dir", str(d)], capture_output=True, text=True, check=True)
        write = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  written in {write['write_s']:.0f} s, {write['file_mb']:.0f} MB, writer peak RSS "
              f"{write['write_peak_rss_mb']:.0f} MB", flush=True)
    print(f"predicting ({'semantic' if args.no_instances else 'semantic + instances'}) ...", flush=True)
    res = {**predict(args, slide), "write": write, "size": args.size, "mpp": args.mpp,
           "load_avg_end": [round(x, 2) for x in os.getloadavg()], "command": " ".join([".venv/bin/python", *sys.argv])}
    res["target_rss_mb"] = 2048
    res["rss_ok"] = max(res["peak_rss_mb_ru_maxrss"], res["peak_rss_mb_sampled"] or 0) <= 2048
    print(f"\n{args.size}² at {args.mpp} µm/px: {res['wall_s']:.0f} s wall ({res['predict_s']:.0f} s prediction, "
          f"{res['instances_s']:.0f} s instances; {res['cpu_s']:.0f} s CPU), {res['tiles']} tiles, "
          f"{res['nuclei']} nuclei, "
          f"{res['image_mp_per_s']:.2f} image MP/s; peak RSS {res['peak_rss_mb_ru_maxrss']:.0f} MB (ru_maxrss), "
          f"{res['peak_rss_mb_sampled'] or float('nan'):.0f} MB (sampled); target ≤ 2048 MB: "
          f"{'met' if res['rss_ok'] else 'NOT met'}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    res["commit"] = common.git_commit()
    (RESULTS / f"large_image_{args.size}.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
