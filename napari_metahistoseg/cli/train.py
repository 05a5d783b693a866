"""``metahistoseg meta-train --config CONFIG.json`` (alias ``train``): train the backbone (resumable)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("meta-train", aliases=["train"],
                              help="meta-train a backbone from a JSON TrainConfig (resumes automatically)")
    p.add_argument("--config", required=True, help="TrainConfig JSON (see configs/backbone.json)")
    p.add_argument("--out", help="output folder (overrides the config's out_dir)")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if a checkpoint exists")
    p.add_argument("--data-root", help="prefix for relative data folders in the config")
    p.add_argument("--loader-workers", type=int, help="processes preparing batches ahead of the steps (overrides "
                                                       "the config's loader_workers; for GPUs)")
    p.add_argument("--device", help="training device: auto (a GPU when there is one; under torchrun the rank's "
                                    "own), cpu, cuda, cuda:1 ... (overrides the config's device)")
    p.add_argument("--init-from", help="start from trained weights (fine-tuning): default (the bundled backbone), "
                                       "transfer, or a checkpoint of the same architecture (overrides the config)")
    p.add_argument("--val-fraction", type=float, help="share of each task's images held apart from training and "
                                                      "validated on every val_every steps (overrides the config)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..maml import run as drive
    from ..training import load_train_config, train, validation_summary

    cfg = load_train_config(args.config, data_root=args.data_root, out_dir=args.out, device=args.device,
                            loader_workers=args.loader_workers, init_from=args.init_from,
                            val_fraction=args.val_fraction)
    _maybe_init_distributed()
    gen = train(cfg, resume=not args.no_resume)

    def show(p: dict) -> None:
        if p["phase"] == "validation":
            if "val" in p:
                print(f"[validation] step {p['step']}: {validation_summary(p['val'])}", file=sys.stderr, flush=True)
        elif p["step"] % 10 == 0 or p["step"] == p["steps"]:
            print(f"[{p['phase']}] step {p['step']}/{p['steps']} loss {p['loss']:.4f} ({p['s_per_step']:.2f} s/step)",
                  file=sys.stderr, flush=True)

    path = drive(gen, show)
    print(f"checkpoint: {path}", file=sys.stderr)
    print(str(path))
    return 0


def _maybe_init_distributed() -> None:
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
