"""Which levers lift GPU prediction at the model's resolution towards 150 MP/s? ``inference.predict`` end to end
(the GUI's and the CLI's in-memory path) on a ``--size``² synthetic H&E image at 0.5 µm/px with the bundled
backbone and a two-class head, under each variant of:

* layout: channels-last or NCHW (``TilingConfig.channels_last``);
* precision: fp32 or bf16 autocast (``TilingConfig.autocast_bf16``);
* GroupNorm: torch's kernel (``native``) or the package's CUDA inference path (``reduce``: statistics from
  fp32-accumulating reductions and one fused multiply-add; ``models.GroupNorm.reduce_on_cuda``);
* ``cudnn.benchmark`` off or on;
* tiles and batch (``TilingConfig.tile_px`` / ``batch_size``);
* ``torch.compile`` of the forward (``TilingConfig.compile``; the first call's compilation is reported apart).

Each row also times the network's forward alone on the same tiles (already on the GPU), so the rest of the call
(tiling, blending, decisions, the model copy, the fetch) shows as the difference. The best eager rows get a
``torch.profiler`` table. Rows are printed and written to ``<out>/probe_gpu_levers.{json,md}`` as they come, so a
time box still leaves what ran. Needs CUDA.

    python benchmarks/probe_gpu_levers.py [--size 4096] [--repeats 5] [--out benchmarks/results] [--no-compile]
        [--quick]

(``--quick``: cudnn.benchmark off only, and compiled rows for bf16 in both layouts.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_throughput import image  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(common.RESULTS))
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--quick", action="store_true", help="fewer rows (see above)")
    ap.add_argument("--budget-s", type=float, default=420, help="skip the remaining rows after this many seconds")
    ap.add_argument("--device", default="cuda:0", help="cpu: a smoke test of this script (small --size)")
    args = ap.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from napari_metahistoseg.config import MAMLConfig, TilingConfig
    from napari_metahistoseg.inference import _forward_for, _inference_model, _replicas, predict
    from napari_metahistoseg.models import GroupNorm
    from napari_metahistoseg.pipeline import AdaptedHead, initial_head, load_backbone
    from napari_metahistoseg.tiling import compiled, tile_grid

    t_start = time.time()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    gpu_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "none (cpu)"
    bb = load_backbone(common.resolve_checkpoint("auto", "backbone"))
    head = AdaptedHead(["background", "foreground"], initial_head(bb, 2), bb.sha256, MAMLConfig(), bb.mpp)
    img = image(args.size, bb.mpp)
    mp = args.size ** 2 / 1e6

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def timed(fn, repeats=args.repeats):
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    rows: list[dict] = []

    def save():
        info = {"machine": common.machine_info(), "gpu": gpu_name, "torch": torch.__version__,
                "commit": common.git_commit(), "command": common.command_line(), "image_mp": mp, "rows": rows}
        (out_dir / "probe_gpu_levers.json").write_text(json.dumps(info, indent=1))
        lines = [f"{info['gpu']}, torch {info['torch']}, commit `{info['commit']}`; {args.size}² image ({mp:.1f} MP) "
                 f"at 0.5 µm/px, bundled backbone, 2-class head", f"Command: `{info['command']}`", "",
                 "| layout | bf16 | GroupNorm | cudnn.benchmark | tile / batch | compile | first call s | "
                 "predict s | MP/s | forward alone s | rest s | model copy s |", "|" + "---|" * 12]
        lines += [f"| {r['layout']} | {r['bf16']} | {r['gn']} | {r['cudnn_benchmark']} | {r['tile']} / {r['batch']} | "
                  f"{r['compile']} | {r['first_s']:.2f} | {r['predict_s']:.4f} | {r['mp_per_s']:.1f} | "
                  f"{r['forward_s']:.4f} | {r['predict_s'] - r['forward_s']:.4f} | {r['model_s']:.4f} |" for r in rows]
        (out_dir / "probe_gpu_levers.md").write_text("\n".join(lines) + "\n")

    def variant(cl: bool, bf16: bool, gn: str, bench: bool, tile: int, batch: int, comp: str = "off",
                prof: bool = False) -> dict | None:
        if time.time() - t_start > args.budget_s:
            print(f"skipped (budget): cl={cl} bf16={bf16} gn={gn} bench={bench} {tile}/{batch} {comp}", flush=True)
            return None
        GroupNorm.reduce_on_cuda = gn == "reduce"
        torch.backends.cudnn.benchmark = bench
        tiling = TilingConfig(tile_px=tile, halo_px=32, batch_size=batch, channels_last="all" if cl else "none",
                              autocast_bf16=bf16,
                              compile=comp != "off")

        def run():
            gen = predict(bb, head, img, devices=str(dev), tiling=tiling)
            try:
                while True:
                    next(gen)
            except StopIteration as stop:
                return stop.value

        if comp != "off":
            torch._dynamo.reset()
        t = time.perf_counter()
        run()
        sync()
        first = time.perf_counter() - t
        pred_s = timed(run)
        # the network alone on the same tiles, already on the GPU
        tiles = tile_grid((args.size, args.size), tile, 32, tiling.tile_multiple_px)
        th, tw = tiles[0][2] - tiles[0][0], tiles[0][3] - tiles[0][1]
        model = _replicas(_inference_model(bb, head), [dev], tiling)[0]
        fwd = _forward_for(model, False, "adapted", False)
        if comp != "off":
            fwd = compiled(fwd)
        sizes = [min(batch, len(tiles) - i) for i in range(0, len(tiles), batch)]
        xs = [torch.rand(b, 3, th, tw, device=dev) for b in sorted(set(sizes))]
        xs = {x.shape[0]: x.contiguous(memory_format=torch.channels_last) if cl else x for x in xs}

        def forward_only():
            with torch.inference_mode(), torch.autocast(dev.type, torch.bfloat16, enabled=bf16 and dev.type == "cuda"):
                for b in sizes:
                    fwd(xs[b])["seg"].float()

        forward_only()
        sync()
        fwd_s = timed(forward_only)
        model_s = timed(lambda: _replicas(_inference_model(bb, head), [dev], tiling))
        row = {"layout": "channels_last" if cl else "NCHW", "bf16": bf16, "gn": gn, "cudnn_benchmark": bench,
               "tile": tile, "batch": batch, "compile": comp, "tiles": f"{len(tiles)} of {th}x{tw}",
               "first_s": first, "predict_s": pred_s, "mp_per_s": mp / pred_s, "forward_s": fwd_s, "model_s": model_s}
        rows.append(row)
        print(f"{row['layout']:13s} bf16={bf16!s:5s} gn={gn:6s} bench={bench!s:5s} {tile:5d}/{batch:2d} "
              f"compile={comp:7s} first {first:6.2f} s | predict {pred_s * 1e3:7.1f} ms = {mp / pred_s:6.1f} MP/s | "
              f"forward {fwd_s * 1e3:7.1f} ms | rest {(pred_s - fwd_s) * 1e3:6.1f} ms | model copy "
              f"{model_s * 1e3:5.1f} ms | {row['tiles']}", flush=True)
        save()
        if prof:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                run()
                sync()
            name = f"probe_gpu_levers_profile_{row['layout']}_{'bf16' if bf16 else 'fp32'}_{gn}.txt"
            (out_dir / name).write_text(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=30) + "\n\n"
                                        + p.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
            ev = p.key_averages()
            gpu_ms = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in ev) / 1e3
            print(f"    profile: {gpu_ms:.1f} ms of GPU kernel time in one call -> {name}", flush=True)
        return row

    print(f"{gpu_name}; torch {torch.__version__}; {args.size}² image", flush=True)
    # 1. eager, the session-9 best tiling: every layout x precision x GroupNorm, cudnn.benchmark off then on
    for bench in (False,) if args.quick else (False, True):
        for cl in (True, False):
            for bf16 in (False, True):
                for gn in ("native", "reduce"):
                    variant(cl, bf16, gn, bench, 1024, 16)
    best = sorted(rows, key=lambda r: r["predict_s"])[:1]
    for r in best:  # where the best eager variant's time goes
        variant(r["layout"] == "channels_last", r["bf16"], r["gn"], r["cudnn_benchmark"], 1024, 16, prof=True)
    # 2. fewer, larger tiles (less halo overlap; the whole image in one tile)
    for r in best:
        for tile, batch in ((2048, 4), (args.size, 1)):
            variant(r["layout"] == "channels_last", r["bf16"], r["gn"], r["cudnn_benchmark"], tile, batch)
    # 3. torch.compile (of the package's GroupNorm path, as TilingConfig.compile runs it; torch's for comparison)
    if not args.no_compile:
        rows_c = [(False, True, "reduce"), (True, True, "reduce")]
        if not args.quick:
            rows_c += [(False, True, "native"), (False, False, "reduce"), (True, False, "reduce")]
        for cl, bf16, gn in rows_c:  # static shapes (dynamic ones made the forward slower than eager, session 13)
            variant(cl, bf16, gn, False, 1024, 16, "static")
    GroupNorm.reduce_on_cuda = True
    save()
    print(f"done in {time.time() - t_start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
