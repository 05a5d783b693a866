"""Headless demo (``make demo``): annotate → adapt → predict on offline sample data, write overlays and layers.

``python -m napari_metahistoseg.demo --out demo_output`` generates a synthetic H&E tile with exact truth
(:mod:`.data.synthetic`), paints a few support strokes as a pathologist would (:func:`.sample_data.demo_strokes`:
some nuclei and some background lines; everything else stays unknown), adapts the bundled backbone's head with
the GUI's default settings, predicts semantic classes and HoVer instances, scores them against the truth and
writes to ``--out``:

``image.png``, ``support_overlay.png``, ``semantic_overlay.png``, ``instances_overlay.png`` (pictures),
``semantic.tif`` (uint8), ``instances.tif`` (uint32), ``nuclei.csv`` (per-nucleus table), ``nuclei.geojson``
(the nuclei outlines, for QuPath), ``head.mhshead.*``
(the adapted head with provenance) and ``metrics.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

OVERLAY_ALPHA = 0.45  # opacity of class colours in the overlays
PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [67, 99, 216], [245, 130, 49]], np.uint8)


def overlay_classes(image: np.ndarray, classes: np.ndarray, *, skip: tuple[int, ...] = (0,)) -> np.ndarray:
    """Blend class colours (``PALETTE``) onto ``image`` except for ``skip`` classes and 255 (unknown)."""
    out = image.astype(np.float32)
    for c in np.unique(classes):
        if c in skip or c == 255:
            continue
        m = classes == c
        out[m] = (1 - OVERLAY_ALPHA) * out[m] + OVERLAY_ALPHA * PALETTE[int(c) % len(PALETTE)]
    return out.astype(np.uint8)


def overlay_instances(image: np.ndarray, instances: np.ndarray) -> np.ndarray:
    """Instance boundaries in yellow on ``image``."""
    from skimage.segmentation import find_boundaries

    out = image.copy()
    out[find_boundaries(instances, mode="inner")] = (255, 230, 0)
    return out


def write_table(path: Path, table: dict) -> None:
    cols = [k for k in table if k != "contour"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for i in range(len(table["id"])):
            w.writerow([_fmt(table[k][i]) for k in cols])


def _fmt(v) -> str:
    if isinstance(v, (list, tuple, np.ndarray)):
        return " ".join(_fmt(x) for x in np.ravel(v))
    return f"{v:.2f}" if isinstance(v, (float, np.floating)) else str(v)


def run_demo(out: Path, *, backbone: str = "default", seed: int = 0, size: int = 512) -> dict:
    import tifffile
    from skimage import io as skio

    from .config import MAMLConfig
    from .data.synthetic import synthetic_tile
    from .inference import NucleiGeoJSON, hover_type_names, predict
    from .maml import run
    from .metrics import ConfusionAccumulator, aji, panoptic_quality
    from .pipeline import adapt, load_backbone
    from .sample_data import demo_strokes

    out.mkdir(parents=True, exist_ok=True)
    tile = synthetic_tile((size, size), seed=seed, mpp=0.5)
    support = demo_strokes(tile.semantic, tile.instances, seed=seed)
    bb = load_backbone(backbone)
    t0 = time.time()
    head = run(adapt(bb, [tile.image], [support], ["background", "nucleus"], mpp=tile.mpp, cfg=MAMLConfig()))
    t_adapt = time.time() - t0
    t0 = time.time()
    pred = run(predict(bb, head, tile.image, mpp=tile.mpp, instances=True))
    t_pred = time.time() - t0
    acc, held = ConfusionAccumulator(2), ConfusionAccumulator(2)
    acc.update(pred.semantic, tile.semantic)
    held.update(pred.semantic, np.where(support == 255, tile.semantic, 255))  # the unpainted pixels only
    metrics = {"miou": acc.miou(), "dice": acc.dice_foreground(), "miou_held_out": held.miou(),
               "dice_held_out": held.dice_foreground(), "aji": aji(tile.instances, pred.instances),
               "pq": panoptic_quality(tile.instances, pred.instances)["pq"],
               "n_nuclei_true": int(tile.instances.max()), "n_nuclei_pred": int(len(pred.table["id"])),
               "support_labelled_px": int((support != 255).sum()), "adapt_seconds": round(t_adapt, 2),
               "predict_seconds": round(t_pred, 2), "backbone": bb.name, "seed": seed}
    skio.imsave(out / "image.png", tile.image, check_contrast=False)
    skio.imsave(out / "support_overlay.png", overlay_classes(tile.image, support, skip=()), check_contrast=False)
    skio.imsave(out / "semantic_overlay.png", overlay_classes(tile.image, pred.semantic), check_contrast=False)
    skio.imsave(out / "instances_overlay.png", overlay_instances(tile.image, pred.instances), check_contrast=False)
    tifffile.imwrite(out / "semantic.tif", pred.semantic)
    tifffile.imwrite(out / "instances.tif", pred.instances, compression="zlib")
    write_table(out / "nuclei.csv", pred.table)
    outlines = NucleiGeoJSON(out / "nuclei.geojson", mpp=tile.mpp, type_names=hover_type_names(bb))
    outlines.write(pred.table)
    outlines.close()
    head.save(out / "head")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m napari_metahistoseg.demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="demo_output")
    p.add_argument("--backbone", default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=512)
    a = p.parse_args(argv)
    try:
        m = run_demo(Path(a.out), backbone=a.backbone, seed=a.seed, size=a.size)
    except ValueError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}/: overlays (PNG), semantic.tif, instances.tif, nuclei.csv, nuclei.geojson, head, "
          "metrics.json",
          file=sys.stderr)
    print(json.dumps(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
