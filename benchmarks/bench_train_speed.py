"""Benchmark: backbone training speed (seconds per step) of the bundled recipe, on one device.

Runs :func:`napari_metahistoseg.training.train` with the model, augmentation, episode and batch settings of
``configs/backbone.json`` (or ``--config``) for ``--supervised`` supervised steps and ``--meta`` first-order MAML
steps on synthetic nuclei and gland tasks (512² tiles at the model's resolution: the timing does not depend on
the labels' source), on ``--device``. Reports the mean seconds per step of each phase (the first step of each
phase, with its allocations and kernel choices, is left out) and, apart, the seconds the samplers take to produce
one batch / one episode batch on the host (the part a GPU cannot speed up). Answers: how long would the bundled
recipe take on this device.

    .venv/bin/python benchmarks/bench_train_speed.py [--device auto|cpu|cuda:0] [--supervised 20] [--meta 10]
        [--workers 0,8] [--layouts cpu]

``--workers``: ``TrainConfig.loader_workers`` settings, one run each (0 = batches made in the training process).
``--layouts``: ``TrainConfig.channels_last`` settings (``cpu``/``all``/``none``), one run each per worker setting, in
the order given (repeat them, e.g. ``none,cpu,none,cpu``, to interleave an A/B on a noisy machine).

Writes ``benchmarks/results/<--out>.{json,md}`` (default ``train_speed``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def synthetic_tasks(root: Path, mpp: float) -> dict[str, str]:
    from napari_metahistoseg.data.synthetic import synthetic_tile
    from napari_metahistoseg.data.task import save_unified

    dirs = {}
    for k, (name, glands) in enumerate((("monuseg", False), ("glas", True))):
        samples = [synthetic_tile((512, 512), seed=10 * k + i, mpp=mpp, glands=glands).with_(
            task=name, sample_id=f"s{i}") for i in range(4)]
        dirs[name] = str(save_unified(samples, root / name))
    return dirs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(common.REPO / "configs" / "backbone.json"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--supervised", type=int, default=20, help="supervised steps timed (plus one warm-up)")
    ap.add_argument("--meta", type=int, default=10, help="meta steps timed (plus one warm-up)")
    ap.add_argument("--workers", default="0", help="TrainConfig.loader_workers values to time, comma-separated")
    ap.add_argument("--layouts", default="cpu", help="TrainConfig.channels_last values to time, comma-separated")
    ap.add_argument("--out", default="train_speed")
    args = ap.parse_args(argv)

    import torch

    from napari_metahistoseg.config import TrainConfig, channels_last_on, load_json
    from napari_metahistoseg.data.samplers import batch_loader, episode_loader
    from napari_metahistoseg.training import load_training_tasks, train, training_device

    base = load_json(TrainConfig, args.config)
    device = training_device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_tasks(Path(tmp) / "data", base.model.mpp)
        tasks = load_training_tasks(data, base.model.mpp)
        sup, eps = batch_loader(tasks, base.batch_size, base.augment, seed=1), \
            episode_loader(tasks, base.episodes, base.augment, seed=1)
        next(sup), next(eps)
        host_sup = statistics.median(_timed(lambda: next(sup)) for _ in range(5))
        host_meta = statistics.median(_timed(lambda: next(eps)) for _ in range(5))
        runs = [(int(w), lay) for w in args.workers.split(",") for lay in args.layouts.split(",")]
        for k, (workers, layout) in enumerate(runs):
            out = Path(tmp) / f"run{k}"
            cfg = dataclasses.replace(base, data=data, supervised_steps=args.supervised + 1,
                                      meta_steps=args.meta + 1, checkpoint_every=10**9, out_dir=str(out),
                                      device=str(device), loader_workers=workers, channels_last=layout)
            t0 = time.perf_counter()
            for _ in train(cfg, resume=False):
                pass
            wall = time.perf_counter() - t0
            log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
            per = {}
            for phase in ("supervised", "meta"):  # mean over the phase's steps after its first (the warm-up);
                secs = [r["seconds"] for r in log if r["phase"] == phase]  # log.jsonl's seconds are rounded
                per[phase] = (secs[-1] - secs[0]) / (len(secs) - 1) if len(secs) > 1 else None
            row = {"device": str(device), "device_name": torch.cuda.get_device_name(device)
                   if device.type == "cuda" else common.machine_info().get("cpu"),
                   "threads": torch.get_num_threads(), "loader_workers": workers,
                   "layout": "channels-last" if channels_last_on(layout, device) else "NCHW",  # supervised phase
                   "supervised_s_per_step": per["supervised"], "meta_s_per_step": per["meta"],
                   "host_batch_s": host_sup, "host_episode_batch_s": host_meta, "wall_s": wall,
                   "crop_px": cfg.augment.crop_px, "batch_size": cfg.batch_size,
                   "episodes": dataclasses.asdict(cfg.episodes), "model": dataclasses.asdict(cfg.model)}
            # the bundled recipe's length at these rates
            row["recipe_minutes"] = round((base.supervised_steps * (row["supervised_s_per_step"] or 0)
                                           + base.meta_steps * (row["meta_s_per_step"] or 0)) / 60, 1)
            rows.append(row)
            print(row, flush=True)
    md = common.md_table(["device", "supervised layout", "loader workers", "supervised s/step", "meta s/step",
                          "sampler s/batch (host, 1 process)", "sampler s/episode batch (host, 1 process)",
                          f"recipe ({base.supervised_steps}+{base.meta_steps} steps), min"],
                         [[f"{r['device']} ({r['device_name']})", r["layout"], r["loader_workers"],
                           common.fmt(r["supervised_s_per_step"]), common.fmt(r["meta_s_per_step"]),
                           common.fmt(r["host_batch_s"]), common.fmt(r["host_episode_batch_s"]),
                           r["recipe_minutes"]] for r in rows])
    common.write_sweep(args.out, {"rows": rows}, "Synthetic tasks; mean s/step after each phase's first step.", md)
    print(md)
    return 0


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    sys.exit(main())
