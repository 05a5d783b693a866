"""Can ``torch.compile`` lift the network's forward on a GPU? The forward alone (backbone features + the adapted
head, as ``inference.predict`` runs it) on a batch of tiles already on the device: eager against compiled, fp32 and
bf16, channels-last and NCHW. A probe for the 150 MP/s goal at the model's resolution (BENCHMARKS.md, "GPU"):
MP/s counts the tiles' cores (tile minus the halo on each side), i.e. image pixels at 0.5 µm/px.

    python benchmarks/probe_compile.py [--tile 1024] [--batch 16] [--halo 32] [--modes eager,default]

Prints a table and writes ``benchmarks/results/<--out>.{json,md}``. Needs CUDA; compile time is reported apart.
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--halo", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--modes", default="eager,default", help="eager and/or torch.compile modes")
    ap.add_argument("--out", default="compile_probe_gpu")
    ap.add_argument("--device", default="cuda:0", help="cpu for a smoke test")
    args = ap.parse_args(argv)

    import torch

    from napari_metahistoseg.config import MAMLConfig
    from napari_metahistoseg.inference import _forward_for
    from napari_metahistoseg.pipeline import AdaptedHead, initial_head, load_backbone

    dev = torch.device(args.device)
    bb = load_backbone(common.resolve_checkpoint("auto", "backbone"))
    head = AdaptedHead(["background", "foreground"], initial_head(bb, 2), bb.sha256, MAMLConfig(), bb.mpp)
    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    core_mp = args.batch * (args.tile - 2 * args.halo) ** 2 / 1e6
    rows = []
    for channels_last in (True, False):
        for bf16 in (False, True):
            for mode in args.modes.split(","):
                torch._dynamo.reset()
                model = head.module_for(bb).to(dev).eval()
                if channels_last:
                    model = model.to(memory_format=torch.channels_last)

                fwd = _forward_for(model, False, "adapted", False)  # what predict runs on each batch of tiles
                run = fwd if mode == "eager" else torch.compile(fwd, mode=mode, dynamic=False)
                x = torch.rand(args.batch, 3, args.tile, args.tile, device=dev)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)

                def once(run=run, x=x, bf16=bf16):
                    amp = torch.autocast(dev.type, torch.bfloat16, enabled=bf16 and dev.type == "cuda")
                    with torch.inference_mode(), amp:
                        run(x)

                t = time.perf_counter()
                once()
                sync()
                first = time.perf_counter() - t
                ts = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    once()
                    sync()
                    ts.append(time.perf_counter() - t)
                med = statistics.median(ts)
                rows.append({"layout": "channels_last" if channels_last else "NCHW", "bf16": bf16, "mode": mode,
                             "first_call_s": round(first, 2), "seconds": med, "core_mp_per_s": core_mp / med})
                r = rows[-1]
                print(f"{r['layout']:13s} bf16={bf16!s:5s} {mode:16s} first {first:6.1f} s, "
                      f"{med * 1e3:7.1f} ms/batch, {r['core_mp_per_s']:6.1f} MP/s", flush=True)
                del model, x
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    info = common.machine_info()
    gpu = torch.cuda.get_device_name(0) if dev.type == "cuda" else "none (cpu)"
    out = {"rows": rows, "machine": info, "gpu": gpu, "torch": torch.__version__,
           "commit": common.git_commit(), "command": " ".join(["python", *sys.argv]), "backbone": bb.name,
           "tile": args.tile, "batch": args.batch, "halo": args.halo}
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    (common.RESULTS / f"{args.out}.json").write_text(json.dumps(out, indent=1))
    lines = [f"GPU: {out['gpu']}; torch {out['torch']}; commit `{out['commit']}`; backbone {bb.name}",
             f"Command: `{out['command']}`", "",
             "| layout | bf16 | mode | first call (s) | ms per batch | MP/s (tile cores) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['layout']} | {r['bf16']} | {r['mode']} | {r['first_call_s']} | {r['seconds'] * 1e3:.1f} | "
              f"{r['core_mp_per_s']:.1f} |" for r in rows]
    (common.RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
