"""Benchmark: adaptation latency of the Adapt button vs support size, inner steps and what is adapted.

Support: ``n`` crops of 256×256 px (model resolution, so nothing is rescaled) cut from MoNuSeg images and their
nucleus masks (every pixel labelled). Rows:

* ``head, loop only`` — the head-only inner loop on cached features (``maml.adapt_head_on_pixels`` with the
  pixel sampling of ``pipeline.adapt``): what a second Adapt click on the same support costs;
* ``head, fit on cached features`` — ``pipeline.support_part`` + ``pipeline.fit_head`` on features computed once:
  everything the Adapt button does after the features (colour inputs and their cross-check, the 20-step loop,
  threshold and smoothing calibration), with the default ``MAMLConfig``;
* ``head, total``     — ``pipeline.adapt`` from images (features + sampling + loop), the first click;
* ``decoder``         — ``pipeline.adapt`` with ``MAMLConfig(adapt="decoder")`` (first-order, decoder + head) on
  8 crops, once per ``--decoder-blocks`` value (0 = every decoder block adapts; N = the last N blocks, the deeper
  ones decoded once).

Each number is the median of ``--repeats`` runs; one untimed warm-up run precedes the first measurement of
each mode (none before the decoder rows: one decoder run costs minutes on a loaded 2-core CPU). CUDA rows are
added when a GPU is present.
Targets from the issue: head-only on 8×256² ≤ 1 s once features are cached; 10 full first-order steps ≤ 15 s.

    .venv/bin/python benchmarks/bench_adapt_speed.py [--backbone default|PATH] [--repeats 3] [--quick]

Writes ``benchmarks/results/adapt_speed.{json,md,png}`` (``--out NAME``: ``NAME.*``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from napari_metahistoseg.config import MAMLConfig, TilingConfig  # noqa: E402
from napari_metahistoseg.data import open_dataset  # noqa: E402
from napari_metahistoseg.maml import adapt_head_on_pixels, pixel_support, run  # noqa: E402
from napari_metahistoseg.models import PixelHead  # noqa: E402
from napari_metahistoseg.pipeline import (  # noqa: E402
    TASK,
    _features,
    adapt,
    calibrates,
    fit_head,
    image_colour_stats,
    initial_head,
    load_backbone,
    rescale,
    support_balance,
    support_part,
)

log = logging.getLogger("bench_adapt_speed")
CROP_PX = 256
SUPPORT_SIZES = (1, 2, 4, 8)
STEPS = (5, 10, 20, 50)
DECODER_STEPS = 10
TARGET_HEAD_S, TARGET_DECODER_S = 1.0, 15.0
CLASSES = ["background", "nucleus"]


def support_crops(bb, n: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``n`` random 256² crops (images ``(256,256,3) uint8``, labels ``(256,256) uint8``) at the model mpp."""
    ds = open_dataset(common.DATA / "monuseg")
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for k in range(n):
        s = ds.load(ds.ids[k % len(ds.ids)])
        f = (s.mpp or bb.mpp) / bb.mpp
        im, lab = rescale(s.image, f, order=1), rescale(s.semantic, f, order=0)
        r = int(rng.integers(0, im.shape[0] - CROP_PX + 1))
        c = int(rng.integers(0, im.shape[1] - CROP_PX + 1))
        images.append(np.ascontiguousarray(im[r:r + CROP_PX, c:c + CROP_PX]))
        labels.append(np.ascontiguousarray(lab[r:r + CROP_PX, c:c + CROP_PX]))
    return images, labels


def head_loop_fn(bb, images, labels, steps: int, device: torch.device):
    """A closure running only the head-only inner loop of ``pipeline.adapt`` on features computed once."""
    cfg = MAMLConfig(steps=steps)
    xs, ys = [], []
    for i, (im, lab) in enumerate(zip(images, labels, strict=True)):
        f = run(_features(bb.model, im, device, TilingConfig()))
        x, y = pixel_support(f[None], torch.from_numpy(lab)[None], 2,
                             max_pixels=max(1, cfg.max_support_pixels // len(images)), seed=i)
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs).to(device), torch.cat(ys).to(device)
    prefix = f"heads.{TASK}."
    init = {k[len(prefix):]: v.to(device) for k, v in initial_head(bb, 2).items()}
    template = PixelHead(bb.model.backbone.out_channels, 2, bb.model.cfg.head_hidden).to(device)

    def fn():
        out = run(adapt_head_on_pixels(template, init, x, y, n_classes=2, steps=steps, lr=cfg.inner_lr,
                                       devices=[device]))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return fn, int(len(y))


def fit_fn(bb, images, labels, device: torch.device):
    """A closure running what ``pipeline.adapt`` does after the features (default ``MAMLConfig``)."""
    cfg = MAMLConfig()
    feats = [run(_features(bb.model, im, device, TilingConfig())) for im in images]
    balance, calibrating = support_balance(cfg, labels, 2), calibrates(cfg, labels, 2)
    sig = tuple(cfg.colour_sigmas_um)  # nuclei: cell-sized objects, colour inputs on

    def fn():
        parts = [support_part(bb, f, im, lab, i, len(images), 2, cfg, balance, calibrating, image_colour_stats(im),
                              sig) for i, (f, im, lab) in enumerate(zip(feats, images, labels, strict=True))]
        out = run(fit_head(bb, parts, 2, initial_head(bb, 2), cfg, [device], balance, calibrating, sig, 0.0))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return fn


def total_fn(bb, images, labels, cfg: MAMLConfig, device: str):
    def fn():
        head = run(adapt(bb, images, labels, CLASSES, mpp=bb.mpp, cfg=cfg, devices=device))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return head

    return fn


def measure(bb, device: str, repeats: int, sizes, steps_list, decoder_repeats: int,
            decoder_blocks: tuple[int, ...] = (0,)) -> list[dict]:
    rows = []
    dev = torch.device(device)
    images, labels = support_crops(bb, max(sizes))
    warm = 1  # one untimed run before the first measurement of each mode (imports, allocator, torch.func)
    for n in sizes:
        for steps in steps_list:
            fn, px = head_loop_fn(bb, images[:n], labels[:n], steps, dev)
            med, times, cmed, ctimes = common.median_wall_cpu(fn, repeats, warmup=warm)
            warm = 0
            rows.append({"device": device, "mode": "head, loop only", "support": n, "steps": steps,
                         "pixels": px, "median_s": med, "times_s": times,
                         "median_cpu_s": cmed, "cpu_s": ctimes})
            log.info("%s", rows[-1])
        med, times, cmed, ctimes = common.median_wall_cpu(fit_fn(bb, images[:n], labels[:n], dev), repeats, warmup=1)
        rows.append({"device": device, "mode": "head, fit on cached features", "support": n, "steps": 20,
                     "median_s": med, "times_s": times, "median_cpu_s": cmed, "cpu_s": ctimes})
        log.info("%s", rows[-1])
        cfg = MAMLConfig(steps=20)
        med, times, cmed, ctimes = common.median_wall_cpu(total_fn(bb, images[:n], labels[:n], cfg, device), repeats,
                                          warmup=1 if n == sizes[0] else 0)
        rows.append({"device": device, "mode": "head, total", "support": n, "steps": 20, "median_s": med,
                     "times_s": times, "median_cpu_s": cmed, "cpu_s": ctimes})
        log.info("%s", rows[-1])
    for blocks in decoder_blocks if decoder_repeats else ():
        cfg = MAMLConfig(steps=DECODER_STEPS, adapt="decoder", decoder_blocks=blocks)
        n = max(sizes)
        med, times, cmed, ctimes = common.median_wall_cpu(total_fn(bb, images[:n], labels[:n], cfg, device),
                                                          decoder_repeats, warmup=0)
        which = "all decoder blocks" if blocks == 0 else f"last {blocks} decoder block{'s' if blocks > 1 else ''}"
        rows.append({"device": device, "mode": f"decoder (first-order, {which}), total", "support": n,
                     "steps": DECODER_STEPS, "decoder_blocks": blocks, "median_s": med, "times_s": times,
                     "median_cpu_s": cmed, "cpu_s": ctimes})
        log.info("%s", rows[-1])
    return rows


def plot(rows: list[dict], name: str = "adapt_speed") -> Path:
    fig, axes = common.new_figure(2)
    for dev in dict.fromkeys(r["device"] for r in rows):
        for n in dict.fromkeys(r["support"] for r in rows if r["mode"] == "head, loop only"):
            pts = sorted((r["steps"], r["median_s"]) for r in rows
                         if r["device"] == dev and r["mode"] == "head, loop only" and r["support"] == n)
            axes[0].plot(*zip(*pts, strict=True), marker="o", label=f"{dev}, {n}×256²")
        tot = sorted((r["support"], r["median_s"]) for r in rows if r["device"] == dev and r["mode"] == "head, total")
        if tot:
            axes[1].plot(*zip(*tot, strict=True), marker="o", label=f"{dev}: head, total (20 steps)")
        dec = [(r["support"], r["median_s"]) for r in rows if r["device"] == dev and r["mode"].startswith("decoder")]
        if dec:
            axes[1].scatter(*zip(*dec, strict=True), marker="s", label=f"{dev}: decoder, {DECODER_STEPS} steps")
    axes[0].axhline(TARGET_HEAD_S, color="grey", ls="--", lw=0.8)
    axes[0].set(xlabel="inner steps", ylabel="median s", title="head-only inner loop (features cached)")
    axes[1].axhline(TARGET_DECODER_S, color="grey", ls="--", lw=0.8)
    axes[1].set(xlabel="support crops (256²)", ylabel="median s", title="Adapt from images")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return common.save_plot(fig, name)


def table(rows: list[dict]) -> str:
    return common.md_table(["device", "mode", "support crops", "steps", "median wall s", "median CPU s",
                            "wall runs (s)"],
                           [[r["device"], r["mode"], r["support"], r["steps"], r["median_s"], r.get("median_cpu_s"),
                             ", ".join(f"{t:.2f}" for t in r["times_s"])] for r in rows])


def targets(rows: list[dict]) -> str:
    out = []
    for dev in dict.fromkeys(r["device"] for r in rows):
        head = [r for r in rows if r["device"] == dev and r["mode"] == "head, loop only" and r["support"] == 8]
        for r in head:
            out.append([dev, f"head-only, 8×256², {r['steps']} steps, features cached ≤ {TARGET_HEAD_S} s",
                        r["median_s"], r.get("median_cpu_s"), _met(r, TARGET_HEAD_S)])
        for r in rows:
            if r["device"] == dev and r["mode"] == "head, fit on cached features" and r["support"] == 8:
                out.append([dev, "head-only, 8×256², the whole fit after the features (colour check, 20 steps, "
                            f"calibrations) ≤ {TARGET_HEAD_S} s", r["median_s"], r.get("median_cpu_s"),
                            _met(r, TARGET_HEAD_S)])
        for r in rows:
            if r["device"] == dev and r["mode"].startswith("decoder"):
                which = r["mode"].split("(first-order")[1].split(")")[0].lstrip(", ") or "all decoder blocks"
                out.append([dev, f"{r['steps']} first-order decoder steps ({which}), 8×256² ≤ {TARGET_DECODER_S} s "
                            "(total)",
                            r["median_s"], r.get("median_cpu_s"), _met(r, TARGET_DECODER_S)])
    return common.md_table(["device", "target", "median wall s", "median CPU s", "met (wall / CPU)"], out)


def _met(r: dict, target: float) -> str:
    cpu = r.get("median_cpu_s")
    return ("yes" if r["median_s"] <= target else "no") + " / " + (
        "–" if cpu is None else "yes" if cpu <= target else "no")


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="default", help="'default' (bundled) or a checkpoint path")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="1 and 8 crops, 5 and 20 steps, 1 repeat")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--decoder-repeats", type=int, default=3, help="runs of the decoder row (0 = skip it)")
    p.add_argument("--out", default="adapt_speed", help="results name under benchmarks/results/")
    p.add_argument("--devices", default="auto",
                   help="comma-separated devices to time, one after the other (auto: cpu, and cuda:0 if present)")
    p.add_argument("--decoder-blocks", default="0,2,1",
                   help="MAMLConfig.decoder_blocks of the decoder rows (0 = all blocks)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes, steps = (SUPPORT_SIZES, STEPS) if not args.quick else ((1, 8), (5, 20))
    repeats = 1 if args.quick else args.repeats
    torch.manual_seed(0)
    bb = load_backbone(common.resolve_checkpoint(args.backbone, "backbone"))
    result = {**common.provenance(), "backbone": {"name": bb.name, "sha256": bb.sha256}, "repeats": repeats}
    devices = (["cpu"] + (["cuda:0"] if torch.cuda.is_available() else [])) if args.devices == "auto" \
        else args.devices.split(",")
    rows = []
    for dev in devices:
        rows += measure(bb, dev, repeats, sizes, steps, args.decoder_repeats if not args.quick else 1,
                        tuple(int(b) for b in args.decoder_blocks.split(",")))
    result["rows"] = rows
    common.write_json(args.out, result)
    plot(rows, args.out)
    md = (f"Machine: {common.machine_line(result['machine'])}  \nCommit: `{result['commit']}`  \n"
          f"Command: `{result['command']}`  \nBackbone: `{bb.name}` ({bb.sha256[:12]}); medians of {repeats} runs "
          f"(one warm-up run before the first head-loop and the first total measurement; none for the decoder). "
          f"CPU s = process CPU time (with 1 thread ≈ the wall time on an idle core)."
          f"\n\n" + table(rows) + "\n\n#### Targets\n\n" + targets(rows))
    common.write_md(args.out, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
