"""Benchmark: few-shot atypical-vs-normal mitosis classification on the AMi-Br development set.

For every draw the AMi-Br slides are split at random into support slides and query slides (case-disjoint; a
split is redrawn until the support slides hold at least max(K) figures of each class). K support figures per
class are drawn from the support slides (nested: the K-shot support is part of the 2K-shot one) and the model is
adapted with :func:`adapt_classifier` (rotations 0/45/90° for atypical = positive, 0/45° for normal, flips), then
scored on **all** query-slide figures: balanced accuracy and F1 with atypical as the positive class
(majority vote of the three experts), mean ± std over draws. Methods:

* ``pretrained head``      bundled mitosis CNN, new 2-class head (class-mean init + Adam), features frozen
* ``pretrained head, 0 steps``  the class-mean (nearest prototype) head alone, no gradient steps
* ``pretrained last stage``     the same, also adapting the last conv stage (``adapt_stages=1``)
* ``random-init head``     an untrained CNN of the same architecture, new head (are the features worth anything?)
* ``backbone probe``       with ``--backbone CKPT``: a logistic regression on the frozen MetaHistoSeg U-Net features
  of the support patches (no augmentation: the U-Net is too slow on CPU for 10 copies per patch) — the "reuse the
  backbone's features" alternative to the small CNN

Also reported: how the three experts agree with each other and with the majority (the label noise ceiling).
Writes ``benchmarks/results/mitosis_fewshot.{json,png}``.

    .venv/bin/python benchmarks/bench_mitosis.py [--draws 5] [--shots 1 2 4 8 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_metahistoseg.config import MitosisConfig
from napari_metahistoseg.data import open_dataset
from napari_metahistoseg.metrics import classification_scores
from napari_metahistoseg.mitosis import (
    MitosisNet,
    adapt_classifier,
    adapted_model,
    classify,
    extract_patches,
    load_mitosis_model,
)
from napari_metahistoseg.mitosis_train import backbone_features, fit_logistic

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data" / "amibr_mitosis"
RESULTS = REPO / "benchmarks" / "results"
SUPPORT_SLIDE_FRACTION = 0.5  # share of slides whose figures may be drawn as support


def load_amibr(cfg: MitosisConfig) -> dict:
    """Patches ``(N, P, P, 3)``, majority labels, expert votes ``(N, 3)``, slides and sub-source per figure."""
    ds = open_dataset(DATA)
    xs, y, votes, slides, source = [], [], [], [], []
    for s in ds:
        h, w = s.shape
        xs.append(extract_patches(s.image, np.array([[h / 2, w / 2]]), s.mpp, cfg)[0][0])
        y.append(s.patch_label)
        votes.append(s.meta["votes"])
        slides.append(f"{s.meta['dataset']}:{s.meta['slide']}")
        source.append(s.meta["dataset"])
    return {"x": np.stack(xs), "y": np.array(y), "votes": np.array(votes), "slide": np.array(slides),
            "source": np.array(source), "experts": ds.meta["experts"]}


def split_slides(data: dict, need: int, rng: np.random.Generator) -> np.ndarray:
    """``(N,) bool`` support mask: a random half of the slides holding >= ``need`` figures of each class."""
    slides = np.unique(data["slide"])
    for _ in range(1000):
        chosen = rng.permutation(slides)[: round(SUPPORT_SLIDE_FRACTION * len(slides))]
        sup = np.isin(data["slide"], chosen)
        if min((data["y"][sup] == k).sum() for k in (0, 1)) >= need:
            return sup
    raise ValueError(f"no slide split gives {need} support figures per class")


def run_adaptation(model: MitosisNet, x: np.ndarray, y: np.ndarray, cfg: MitosisConfig) -> MitosisNet:
    gen = adapt_classifier(model, x, y, cfg, devices="cpu", new_head=True)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return adapted_model(model, stop.value)


def scores(y: np.ndarray, pred: np.ndarray) -> dict:
    s = classification_scores(y, pred.astype(np.int64))
    return {"balanced_accuracy": s["balanced_accuracy"], "f1": s["f1"]}


def agreement(data: dict) -> dict:
    """Expert-vs-expert and expert-vs-majority agreement (accuracy, Cohen's kappa, F1 of atypical)."""
    v, maj = data["votes"], data["y"]

    def kappa(a, b):
        po = (a == b).mean()
        pe = sum((a == k).mean() * (b == k).mean() for k in (0, 1))
        return float((po - pe) / (1 - pe))

    out = {"unanimous": float((v.min(1) == v.max(1)).mean()), "atypical_share": float(maj.mean()), "pairs": {},
           "vs_majority": {}}
    names = data["experts"]
    for i in range(v.shape[1]):
        for j in range(i + 1, v.shape[1]):
            out["pairs"][f"{names[i]}~{names[j]}"] = {"accuracy": float((v[:, i] == v[:, j]).mean()),
                                                       "kappa": kappa(v[:, i], v[:, j])}
        out["vs_majority"][names[i]] = {"kappa": kappa(v[:, i], maj), **scores(maj, v[:, i])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backbone", type=Path, help="MetaHistoSeg checkpoint for the backbone-probe baseline")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pretrained, desc = load_mitosis_model()
    cfg = pretrained.cfg
    torch.manual_seed(args.seed)
    methods = {"pretrained head": (pretrained, cfg),
               "pretrained head, 0 steps": (pretrained, dataclasses.replace(cfg, adapt_steps=0)),
               "pretrained last stage": (pretrained, dataclasses.replace(cfg, adapt_stages=1)),
               "random-init head": (MitosisNet(cfg), cfg)}
    data = load_amibr(cfg)
    rows = {m: {k: [] for k in args.shots} for m in [*methods, *(["backbone probe"] if args.backbone else [])]}
    feats = backbone_features(args.backbone, data["x"]) if args.backbone else None
    for d in range(args.draws):
        rng = np.random.default_rng(args.seed + d)
        sup = split_slides(data, max(args.shots), rng)
        q = ~sup
        order = {k: rng.permutation(np.flatnonzero(sup & (data["y"] == k))) for k in (0, 1)}
        for k in args.shots:
            idx = np.concatenate([order[0][:k], order[1][:k]])
            for m in rows:
                if m == "backbone probe":
                    pred = fit_logistic(feats[idx], data["y"][idx], args.seed)(feats[q])
                else:
                    model, mcfg = methods[m]
                    net = run_adaptation(model, data["x"][idx], data["y"][idx], mcfg)
                    pred = (classify(net, data["x"][q]) >= mcfg.threshold).astype(int)
                r = scores(data["y"][q], pred)
                r["per_expert_f1"] = [scores(data["votes"][q, e], pred)["f1"] for e in range(data["votes"].shape[1])]
                r["n_query"], r["n_query_atypical"] = int(q.sum()), int(data["y"][q].sum())
                rows[m][k].append(r)
    summary = {m: {k: {key: [float(np.mean([r[key] for r in rs])), float(np.std([r[key] for r in rs]))]
                       for key in ("balanced_accuracy", "f1")} for k, rs in per_k.items()} for m, per_k in rows.items()}
    agree = agreement(data)
    prevalence = float(data["y"].mean())
    out = {"draws": args.draws, "shots": args.shots, "seed": args.seed, "weights": desc.get("weights_sha256"),
           "backbone": str(args.backbone) if args.backbone else None,
           "config": dataclasses.asdict(cfg), "n_figures": len(data["y"]), "n_slides": len(np.unique(data["slide"])),
           "summary": summary, "runs": rows, "agreement": agree,
           "reference": {"chance_balanced_accuracy": 0.5, "all_atypical_f1": 2 * prevalence / (1 + prevalence)},
           "machine": platform.platform(), "threads": args.threads, "seconds": round(time.perf_counter() - t0, 1),
           "command": " ".join([".venv/bin/python", *sys.argv]), "commit": _commit()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mitosis_fewshot.json").write_text(json.dumps(out, indent=2))
    print_table(summary, args.shots, agree, out["reference"])
    plot(summary, args.shots, out["reference"], RESULTS / "mitosis_fewshot.png")


def _commit() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common  # benchmarks/common.py

    return common.git_commit()


def print_table(summary: dict, shots: list[int], agree: dict, ref: dict) -> None:
    print("AMi-Br atypical vs normal, case-disjoint support/query slides; mean ± std over draws")
    print(f"{'method':28s} {'K':>3s} {'balanced acc':>16s} {'F1 (atypical)':>16s}")
    for m, per_k in summary.items():
        for k in shots:
            ba, f1 = per_k[k]["balanced_accuracy"], per_k[k]["f1"]
            print(f"{m:28s} {k:3d} {ba[0]:8.3f} ± {ba[1]:5.3f} {f1[0]:8.3f} ± {f1[1]:5.3f}")
    print(f"reference: chance balanced acc 0.5; F1 of calling everything atypical {ref['all_atypical_f1']:.3f}")
    print(f"experts: {agree['unanimous']:.1%} unanimous; vs majority (inflated: each expert is part of it):")
    for e, s in agree["vs_majority"].items():
        print(f"  {e}: kappa {s['kappa']:.3f} balanced acc {s['balanced_accuracy']:.3f} F1 {s['f1']:.3f}")
    for p, s in agree["pairs"].items():
        print(f"  {p}: agreement {s['accuracy']:.3f} kappa {s['kappa']:.3f}")


def plot(summary: dict, shots: list[int], ref: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "balanced_accuracy", "balanced accuracy"), (axes[1], "f1", "F1 (atypical)")):
        for m, per_k in summary.items():
            mean = [per_k[k][key][0] for k in shots]
            std = [per_k[k][key][1] for k in shots]
            ax.errorbar(shots, mean, yerr=std, marker="o", capsize=3, label=m)
        ax.axhline(0.5 if key == "balanced_accuracy" else ref["all_atypical_f1"], color="grey", ls=":",
                   label="chance" if key == "balanced_accuracy" else "all atypical")
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.set_xlabel("shots per class (K)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("AMi-Br atypical vs normal mitoses: few-shot adaptation (case-disjoint)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
