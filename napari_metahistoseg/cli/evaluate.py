"""``metahistoseg evaluate DATA_DIR --support ID[,ID...]``: few-shot evaluation; last stdout line is JSON."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="adapt on support images of a data folder, score the others")
    p.add_argument("data_dir", help="data folder in any supported layout (auto-detected)")
    p.add_argument("--support", required=True, help="comma-separated image ids (file stems) used as support")
    p.add_argument("--method", default="maml", choices=["maml", "transfer", "scratch"])
    p.add_argument("--backbone", default="default", help="'default' (the method's bundled backbone) or a path")
    p.add_argument("--steps", type=int, default=None, help="inner-loop steps (default: the GUI's setting)")
    p.add_argument("--devices", default="cpu", help="cpu | cuda:0 | cuda:0,cuda:1 ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write per-image predictions here")
    p.add_argument("--tta", type=int, default=1, choices=[1, 2, 4, 8],
                   help="test-time augmentation of the predictions (TilingConfig.tta_variants; default 1 = off, "
                        "as the GUI)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import TilingConfig
    from ..evaluation import evaluate
    from ..maml import run as drive

    gen = evaluate(args.data_dir, args.support.split(","), method=args.method, backbone=args.backbone,
                   steps=args.steps, devices=args.devices, seed=args.seed, out=args.out,
                   tiling=TilingConfig(tta_variants=args.tta))

    def show(p: dict) -> None:
        if p.get("stage") in ("adapt", "evaluate") and (p.get("step") or p.get("done")):
            k, n = (p["step"], p["steps"]) if "step" in p else (p["done"], p["total"])
            extra = f" loss {p['loss']:.4f}" if "loss" in p else ""
            print(f"[{p['stage']}] {k}/{n}{extra}", file=sys.stderr, flush=True)

    print(json.dumps(drive(gen, show)))
    return 0
