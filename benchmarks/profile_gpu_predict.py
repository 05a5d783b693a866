"""Where the time of a GPU prediction goes: the whole ``inference.predict`` call against its parts.

On a ``--size``² synthetic H&E image at the model's resolution with the bundled backbone and a two-class head:

* ``predict``            — the whole call (the GUI's and the CLI's in-memory path), tile ``--tile``, batch ``--batch``;
* ``forward only``       — the network alone on the same number of tiles already on the GPU (fp32 / bf16): the
  ceiling the rest of the call cannot beat;
* ``upload`` / ``fetch`` — the image to the GPU, the class probabilities back (pageable and pinned host memory);
* a ``torch.profiler`` table of one ``predict`` call (the operators with the most host time and GPU time).

Prints the tables and writes ``benchmarks/results/<--out>.txt``. Needs CUDA.

    python benchmarks/profile_gpu_predict.py [--size 4096] [--tile 1024] [--batch 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_throughput import image  # noqa: E402


def timed(fn, repeats: int = 5) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default="gpu_profile")
    args = ap.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from napari_metahistoseg.config import MAMLConfig, TilingConfig
    from napari_metahistoseg.inference import _inference_model, _replicas, predict
    from napari_metahistoseg.pipeline import AdaptedHead, initial_head, load_backbone
    from napari_metahistoseg.tiling import tile_grid

    dev = torch.device("cuda", 0)
    bb = load_backbone(common.resolve_checkpoint("auto", "backbone"))
    head = AdaptedHead(["background", "foreground"], initial_head(bb, 2), bb.sha256, MAMLConfig(), bb.mpp)
    img = image(args.size, bb.mpp)
    mp = args.size ** 2 / 1e6
    tiling = TilingConfig(tile_px=args.tile, halo_px=32, batch_size=args.batch)

    def run_predict():
        for _ in predict(bb, head, img, devices="cuda:0", tiling=tiling):
            pass

    lines = [f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}; {args.size}² image ({mp:.1f} MP), "
             f"tile {args.tile}, batch {args.batch}", "", "| part | seconds | MP/s |", "|---|---|---|"]
    rows = [("predict (whole call)", timed(run_predict))]
    tiles = tile_grid((args.size, args.size), args.tile, 32, tiling.tile_multiple_px)
    th, tw = tiles[0][2] - tiles[0][0], tiles[0][3] - tiles[0][1]
    model = _replicas(_inference_model(bb, head), [dev], tiling)[0]  # as predict builds it (layout per device)
    x = torch.rand(args.batch, 3, th, tw, device=dev)
    if tiling.channels_last_on(dev):
        x = x.contiguous(memory_format=torch.channels_last)
    n_batches = -(-len(tiles) // args.batch)
    for bf16 in (False, True):
        def fwd(bf16=bf16):
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                for _ in range(n_batches):
                    model(x, "user")["seg"].float().softmax(1)
        rows.append((f"forward only ({len(tiles)} tiles of {th}x{tw}{', bf16' if bf16 else ''})", timed(fwd)))
    rows.append(("upload (uint8 image)", timed(lambda: torch.from_numpy(img).to(dev))))
    probs = torch.rand(2, args.size, args.size, device=dev)
    rows.append(("fetch (2 float32 maps, pageable)", timed(lambda: probs.cpu())))
    pinned = torch.empty(probs.shape, pin_memory=True)
    rows.append(("fetch (2 float32 maps, pinned)", timed(lambda: pinned.copy_(probs))))
    lines += [f"| {name} | {s:.4f} | {mp / s:.1f} |" for name, s in rows]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_predict()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    lines += ["", "Host time (top 20):",
              ka.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60),
              "GPU time (top 12):", ka.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60)]
    text = "\n".join(lines)
    print(text)
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    (common.RESULTS / f"{args.out}.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
