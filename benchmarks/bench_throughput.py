"""Benchmark: semantic prediction throughput (megapixels per second) vs tile size and batch size.

Runs :func:`napari_metahistoseg.inference.predict` (the GUI's and the CLI's in-memory path: tiles, blending,
softmax, arg-max) with the real backbone (bundled ``weights/backbone``, else ``runs/backbone/last``) on a
synthetic H&E image at the backbone's resolution, on the CPU with each ``--threads`` setting and, when CUDA is
available, on the GPU (fp32 and bf16 autocast). Each configuration is timed ``--repeats`` times after one warm-up
run; the median wall-clock time and the median CPU time of the process are reported (on a shared machine the CPU
time shows what the code costs when other jobs take the cores). Also the time to predict a 1024x1024 image (at
the model's 0.5 µm/px, and a 1024x1024 image at 0.25 µm/px, which the model sees at half size — the usual 40x
slide case).

Prints a table; writes ``benchmarks/results/throughput.json`` and ``throughput.png``.

    .venv/bin/python benchmarks/bench_throughput.py [--threads 1,2] [--workers both] [--tiles 256,384,512,768]
        [--batches 1,2,4]

On the CPU each thread count is run with one tile at a time (all threads on one forward pass) and, with
``--workers both``, with as many tile threads as threads (``TilingConfig.cpu_workers``: tiles side by side, one
intra-op thread each). ``batch`` is the tiles per forward pass (per tile thread).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py)

SEED = 0


def machine() -> dict:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.lower().startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__,
            "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else []}


def image(size: int, mpp: float):
    """A synthetic H&E image of ``size`` x ``size`` (tiled from 512 px synthetic tiles, to keep it quick)."""
    import numpy as np

    from napari_metahistoseg.data.synthetic import synthetic_tile

    t = synthetic_tile((512, 512), seed=SEED, mpp=mpp).image
    reps = -(-size // 512)
    return np.ascontiguousarray(np.tile(t, (reps, reps, 1))[:size, :size])


def sgemm_gmac_per_s(threads: int, n: int = 2048, repeats: int = 8) -> float:
    """This machine's fp32 matrix-product rate now (GMAC/s, ``threads`` threads): the ceiling the convolutions
    compare with. The 2-core VM's speed drifts by ±30 % between hours; this says how fast it was for this run."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(2):
            a @ b
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        return n**3 * repeats / (time.perf_counter() - t0) / 1e9
    finally:
        torch.set_num_threads(before)


def macs_per_model_px(backbone, head) -> float:
    """Multiply-adds per model pixel of backbone + head, counted with hooks on every convolution of a 256² forward."""
    import torch

    from napari_metahistoseg.pipeline import TASK

    model = head.module_for(backbone, inference=True)
    total = [0]

    def hook(mod, inp, out):
        total[0] += out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.inference_mode():
            model(torch.rand(1, 3, 256, 256), TASK)
    finally:
        for h in hooks:
            h.remove()
    return total[0] / 256**2


def model_px(size: int, mpp: float, model_mpp: float, tiling) -> int:
    """Pixels the network processes for a ``size``² image: its model-scale tiles, overlaps counted each time."""
    from napari_metahistoseg.tiling import tile_grid

    scale = mpp / model_mpp
    m = size if abs(scale - 1) < 1e-3 else max(1, round(size * scale))
    return sum((r1 - r0) * (c1 - c0) for r0, c0, r1, c1 in
               tile_grid((m, m), tiling.tile_px, tiling.halo_px, tiling.tile_multiple_px))


def time_predict(backbone, head, img, mpp, tiling, device: str, repeats: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds of each of ``repeats`` predictions (after one warm-up)."""
    from napari_metahistoseg.inference import predict

    def once() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        gen = predict(backbone, head, img, mpp=mpp, devices=device, tiling=tiling)
        for _ in gen:
            pass
        if device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0

    once()  # warm-up (allocations, oneDNN/cuDNN kernel choice)
    runs = [once() for _ in range(repeats)]
    return [w for w, _ in runs], [c for _, c in runs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="auto", help="checkpoint stem (default: bundled, else runs/backbone/last)")
    ap.add_argument("--threads", default="1,2", help="CPU thread counts to test")
    ap.add_argument("--tiles", default="256,384,512,768", help="tile sides (model px)")
    ap.add_argument("--batches", default="1,2,4", help="tiles per forward")
    ap.add_argument("--size", type=int, default=1024, help="image side (px) for the tile/batch sweep")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", default="both",
                    help="CPU tile threads (TilingConfig.cpu_workers): 'both' = 1 and the thread count, or a number")
    ap.add_argument("--no-gpu", action="store_true")
    ap.add_argument("--no-cpu", action="store_true", help="GPU rows only")
    ap.add_argument("--gpu-size", type=int, default=4096,
                    help="image side (px) for the GPU rows (a 1024² image is over in milliseconds there)")
    ap.add_argument("--gpu-tiles", default="512,1024", help="tile sides for the GPU rows")
    ap.add_argument("--gpu-batches", default="4,8,16", help="tiles per forward for the GPU rows")
    ap.add_argument("--colour", action="store_true",
                    help="also time a head with colour inputs (MAMLConfig.colour_features: 20 more head inputs, "
                         "the image's colour statistics) at the best tile/batch of each device")
    ap.add_argument("--name", default="throughput", help="results file stem under benchmarks/results/")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows of an earlier throughput.json for device/thread settings not rerun")
    args = ap.parse_args()

    import torch

    from napari_metahistoseg.config import TilingConfig
    from napari_metahistoseg.pipeline import AdaptedHead, initial_head, load_backbone

    bb = load_backbone(common.resolve_checkpoint(args.backbone, "backbone"))
    head = AdaptedHead(["background", "foreground"], initial_head(bb, 2), bb.sha256, _maml(), bb.mpp)
    rows: list[dict] = []
    kept = _earlier_rows(args)
    # CPU: (threads, tile threads, bf16, host blending); a tile-thread count of 1 is one tile at a time on all threads
    # variant: "host" = the path before device blending (to compare); "nhwc" = device blending with channels-last
    # on the GPU too (TilingConfig.channels_last="all"; the default, "cpu", keeps GPUs NCHW since session 13)
    targets = [] if args.no_cpu else [
        ("cpu", int(t), w, False, "") for t in args.threads.split(",")
        for w in sorted({1, int(t)} if args.workers == "both" else {int(args.workers or t)})]
    if torch.cuda.is_available() and not args.no_gpu:  # host blending: the path before device blending, to compare
        targets += [("cuda:0", 0, 1, False, ""), ("cuda:0", 0, 1, True, ""), ("cuda:0", 0, 1, True, "host"),
                    ("cuda:0", 0, 1, False, "nhwc"), ("cuda:0", 0, 1, True, "nhwc")]
    info = machine()
    cpu_threads = max((t for d, t, *_ in targets if d == "cpu"), default=0)
    if cpu_threads:
        info["sgemm_gmac_s_start"] = round(sgemm_gmac_per_s(cpu_threads), 1)
        info["sgemm_threads"] = cpu_threads
    macs = macs_per_model_px(bb, head)
    info["macs_per_model_px"] = round(macs)
    colour_head = _colour_head(bb) if args.colour else None

    def effort(row: dict, tiling_cfg, mpp: float, per_px: float = macs) -> dict:
        """The row with the network's pixels (overlaps included) and its multiply-add rate."""
        px = model_px(row["image_px"], mpp, bb.mpp, tiling_cfg)
        row["model_mpx"] = px / 1e6
        row["gmac_per_s"] = px * per_px / row["seconds"] / 1e9
        return row
    for device, threads, workers, bf16, variant in targets:
        if device == "cpu":
            torch.set_num_threads(threads)
        label = _label(device, threads, workers, bf16, variant)
        size = args.size if device == "cpu" else args.gpu_size
        img, img40, mp = image(size, bb.mpp), image(size, bb.mpp / 2), size * size / 1e6
        tiles = [int(t) for t in (args.tiles if device == "cpu" else args.gpu_tiles).split(",")]
        batches = [int(b) for b in (args.batches if device == "cpu" else args.gpu_batches).split(",")]

        def tiling(tile: int, batch: int, workers: int = workers, bf16: bool = bf16,
                   variant: str = variant) -> TilingConfig:
            # batch = tiles per forward pass (per tile thread)
            return TilingConfig(tile_px=tile, halo_px=32, batch_size=batch * workers, cpu_batch_size=batch,
                                cpu_workers=workers, autocast_bf16=bf16,
                                **({"device_blend_max_mb": 0.0} if variant == "host" else {}),
                                **({"channels_last": "all"} if variant == "nhwc" else {}))

        for tile in tiles:
            for batch in batches:
                ts, cpu = time_predict(bb, head, img, bb.mpp, tiling(tile, batch), device, args.repeats)
                rows.append(effort(_row(label, tile, batch, size, bb.mpp, ts, cpu, mp), tiling(tile, batch), bb.mpp))
                _show(rows[-1])
                _save(kept + rows, info, args, bb)  # a stopped run keeps what it measured
        best = max((r for r in rows if r["device"] == label),  # CPU: by CPU time (robust to other jobs)
                   key=lambda r: r["mp_per_cpu_s"] if device == "cpu" else r["mp_per_s"])
        ts, cpu = time_predict(bb, head, img40, bb.mpp / 2, tiling(best["tile"], best["batch"]), device,
                               args.repeats)
        rows.append(effort(_row(label, best["tile"], best["batch"], size, bb.mpp / 2, ts, cpu, mp),
                           tiling(best["tile"], best["batch"]), bb.mpp / 2))
        _show(rows[-1])
        if colour_head is not None:
            ts, cpu = time_predict(bb, colour_head, img, bb.mpp, tiling(best["tile"], best["batch"]), device,
                                   args.repeats)
            rows.append(effort(_row(f"{label}, colour head", best["tile"], best["batch"], size, bb.mpp, ts, cpu, mp),
                               tiling(best["tile"], best["batch"]), bb.mpp, macs_per_model_px(bb, colour_head)))
            _show(rows[-1])
        _save(kept + rows, info, args, bb)
    info["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    if cpu_threads:
        info["sgemm_gmac_s_end"] = round(sgemm_gmac_per_s(cpu_threads), 1)
    _report(kept + rows, info, args, bb)


def _colour_head(bb):
    """A two-class head with the default colour inputs (random colour weights, as after adaptation; their cost does
    not depend on their values)."""
    from napari_metahistoseg.pipeline import colour_head

    return colour_head(bb, ["background", "foreground"], noise=0.01, seed=SEED)



def _label(device: str, threads: int, workers: int, bf16: bool, variant: str = "") -> str:
    if device != "cpu":
        extra = {"host": ", host blending", "nhwc": ", channels-last"}.get(variant, "")
        return f"{device}{' bf16' if bf16 else ''}{extra}"
    return f"cpu x{threads}" + (f", {workers} tile threads" if workers > 1 else "")


def _row(label: str, tile: int, batch: int, size: int, mpp: float, ts: list[float], cpu: list[float],
         mp: float) -> dict:
    med, cmed = statistics.median(ts), statistics.median(cpu)
    return {"device": label, "tile": tile, "batch": batch, "image_px": size, "mpp": mpp, "seconds": med,
            "mp_per_s": mp / med, "cpu_seconds": cmed, "mp_per_cpu_s": mp / cmed, "times": ts, "cpu_times": cpu}


def _show(r: dict) -> None:
    print(f"{r['device']:14s} {r['image_px']}² at {r['mpp']} µm/px, tile {r['tile']:4d} batch {r['batch']}: "
          f"{r['seconds']:7.3f} s wall, {r['mp_per_s']:6.3f} MP/s; CPU {r['cpu_seconds']:7.3f} s, "
          f"{r['mp_per_cpu_s']:6.3f} MP per CPU-s; network {r['gmac_per_s']:5.1f} GMAC/s", flush=True)


def _maml():
    from napari_metahistoseg.config import MAMLConfig

    return MAMLConfig()


def _earlier_rows(args) -> list[dict]:
    """Rows of an earlier run for devices/thread counts this run does not measure (``--append``)."""
    path = RESULTS / f"{args.name}.json"
    if not (args.append and path.exists()):
        return []
    threads = {f"cpu x{t}" for t in args.threads.split(",")}
    return [r for r in json.loads(path.read_text())["rows"]
            if r["device"].split(",")[0] not in threads and not r["device"].startswith("cuda")]


def _save(rows: list[dict], info: dict, args, bb) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"rows": rows, "machine": info, "backbone": bb.name, "backbone_sha256": bb.sha256,
           "commit": common.git_commit(),
           "command": " ".join([".venv/bin/python", *sys.argv]), "repeats": args.repeats,
           "note": "median of repeats after one warm-up; MP/s = image pixels per wall-clock second (at 0.25 µm/px "
                   "the model processes a quarter of them); MP per CPU-s = per second of this process's CPU time, "
                   "less sensitive to other jobs sharing the cores (see load_avg); with several threads CPU time "
                   "also counts OpenMP spin-waiting; GMAC/s = the network's multiply-adds (overlapping tiles "
                   "counted each time) per wall-clock second, against this machine's fp32 matrix-product rate "
                   "(sgemm, 2048², measured at the start and end of the run)"}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=1) + "\n")


def _report(rows: list[dict], info: dict, args, bb) -> None:
    print("\n| device | tile | batch | image µm/px | wall s | MP/s | CPU s | MP per CPU-s | network GMAC/s |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['device']} | {r['tile']} | {r['batch']} | {r['mpp']} | {r['seconds']:.3f} | "
              f"{r['mp_per_s']:.3f} | {r['cpu_seconds']:.3f} | {r['mp_per_cpu_s']:.3f} | "
              f"{r.get('gmac_per_s', float('nan')):.1f} |")
    if "sgemm_gmac_s_start" in info:
        print(f"fp32 matrix product on {info['sgemm_threads']} threads: {info['sgemm_gmac_s_start']} GMAC/s at the "
              f"start, {info.get('sgemm_gmac_s_end', '?')} at the end; {info['macs_per_model_px']} MAC per model px")
    _save(rows, info, args, bb)
    _plot(rows, args.name)
    print(f"\nwrote {RESULTS / (args.name + '.json')} and {RESULTS / (args.name + '.png')}")


def _plot(rows: list[dict], name: str = "throughput") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = list(dict.fromkeys(r["device"] for r in rows))
    fig, axes = plt.subplots(1, len(devices), figsize=(4.2 * len(devices), 3.4), squeeze=False)
    for ax, dev in zip(axes[0], devices, strict=True):
        sweep = [r for r in rows if r["device"] == dev and r["mpp"] == max(x["mpp"] for x in rows)]
        for b in sorted({r["batch"] for r in sweep}):
            pts = sorted((r["tile"], r["mp_per_s"]) for r in sweep if r["batch"] == b)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"batch {b}")
        ax.set(title=dev, xlabel="tile side (model px)", ylabel="MP/s (0.5 µm/px)")
        ax.axhline(1.0, color="grey", ls=":", lw=1)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
