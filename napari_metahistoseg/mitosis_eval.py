"""Few-shot evaluation on patch-classification data (e.g. AMi-Br atypical vs normal mitotic figures).

The bundled mitosis classifier gets a new 2-class head (initialised at the support's class means) adapted on
the support patches with the mitosis study's rotations; every other patch is classified. Used by
:func:`napari_metahistoseg.evaluation.evaluate` for folders whose reader yields patches.
"""

from __future__ import annotations

import csv
import dataclasses
import time
from collections.abc import Generator, Sequence
from pathlib import Path

import numpy as np

from .config import MitosisConfig
from .data.readers import TaskDataset
from .metrics import classification_scores
from .mitosis import adapt_classifier, adapted_model, classify, extract_patches, load_mitosis_model

DEFAULT_PATCH_MPP = 0.25  # µm/px assumed for patches whose reader gives no mpp


def _centre_patches(ds: TaskDataset, ids: Sequence[str], cfg: MitosisConfig) -> tuple[np.ndarray, np.ndarray]:
    patches, labels = [], []
    for i in ids:
        s = ds.load(i)
        if s.patch_label is None:
            raise ValueError(f"{ds.root}: sample {i!r} has no patch label")
        centre = np.array([[(s.shape[0] - 1) / 2, (s.shape[1] - 1) / 2]])
        patches.append(extract_patches(s.image, centre, s.mpp or DEFAULT_PATCH_MPP, cfg)[0][0])
        labels.append(int(s.patch_label))
    return np.stack(patches), np.asarray(labels)


def evaluate_patches(
    ds: TaskDataset, sup_ids: Sequence[str], qry_ids: Sequence[str], *, method: str = "maml",
    steps: int | None = None, seed: int = 0, devices: str | Sequence[str] = "cpu", out: str | Path | None = None,
    cfg: MitosisConfig | None = None,
) -> Generator[dict, None, dict]:
    """Adapt on ``sup_ids`` and score ``qry_ids``; returns the CLI's metrics dict."""
    if method not in ("maml", "transfer", "scratch"):
        raise ValueError(f"unknown method {method!r}")
    cfg = cfg or MitosisConfig()
    if steps is not None:
        cfg = dataclasses.replace(cfg, adapt_steps=steps)
    model, _ = load_mitosis_model()
    if method == "scratch":
        import torch

        torch.manual_seed(seed)
        model = type(model)(model.cfg).eval()
        cfg = dataclasses.replace(cfg, adapt_stages=len(model.cfg.channels))
    xs, ys = _centre_patches(ds, sup_ids, cfg)
    if len(np.unique(ys)) < 2:
        raise ValueError(f"{ds.root}: every support patch ({', '.join(sup_ids)}) is {ds.class_names[ys[0]]!r}; the "
                         f"support needs at least one patch of each class ({' and '.join(ds.class_names)})")
    t0 = time.time()
    state = yield from adapt_classifier(model, xs, ys, cfg, devices=devices, new_head=True)
    adapt_s = time.time() - t0
    net = adapted_model(model, state)
    t1 = time.time()
    xq, yq = _centre_patches(ds, qry_ids, cfg)
    prob = classify(net, xq, device=(devices if isinstance(devices, str) else devices[0]).split(",")[0])
    pred = (prob >= cfg.threshold).astype(int)
    sc = classification_scores(yq, pred, n_classes=2, positive=1)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(Path(out) / "predictions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "label", "prob"])
            for i, p, q in zip(qry_ids, pred, prob, strict=True):
                w.writerow([i, ds.class_names[p], f"{q:.4f}"])
    return {"task": ds.task, "method": method, "n_support": len(sup_ids), "n_query": len(qry_ids),
            "miou": None, "dice": None, "accuracy": sc["accuracy"], "balanced_accuracy": sc["balanced_accuracy"],
            "f1": sc["f1"],
            "precision": sc["precision"], "recall": sc["recall"], "adapt_seconds": round(adapt_s, 3),
            "predict_seconds": round(time.time() - t1, 3)}
