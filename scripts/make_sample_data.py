"""Regenerate the files in ``sample_data/`` (deterministic: same seed, same bytes).

    .venv/bin/python scripts/make_sample_data.py [--out sample_data] [--seed 0]

Writes a synthetic H&E tile, its truth masks, a support mask with a few strokes (255 = unknown) and a CSV of
centroid clicks, all from :func:`napari_metahistoseg.data.synthetic.synthetic_tile`.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from napari_metahistoseg.data.synthetic import instance_centroids, synthetic_tile
from napari_metahistoseg.data.task import IGNORE
from napari_metahistoseg.sample_data import SYNTHETIC_MPP, SYNTHETIC_SHAPE, demo_strokes

N_NUCLEUS_CLICKS = 15
N_BACKGROUND_CLICKS = 5


def clicks(semantic: np.ndarray, instances: np.ndarray, seed: int) -> list[tuple[float, float, int]]:
    """Centroids of some nuclei (class 1) and some background pixels far from nuclei (class 0)."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed + 1)
    n = int(instances.max())
    cents = instance_centroids(instances, n)
    pick = rng.choice(n, size=min(N_NUCLEUS_CLICKS, n), replace=False)
    rows = [(float(cents[i, 0]), float(cents[i, 1]), 1) for i in sorted(pick)]
    far = ~ndi.binary_dilation(semantic > 0, iterations=14)
    rr, cc = np.nonzero(far)
    for k in rng.choice(rr.size, size=min(N_BACKGROUND_CLICKS, rr.size), replace=False):
        rows.append((float(rr[k]), float(cc[k]), 0))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "sample_data")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    tile = synthetic_tile(SYNTHETIC_SHAPE, seed=args.seed, mpp=SYNTHETIC_MPP)
    support = demo_strokes(tile.semantic, tile.instances, seed=args.seed)
    Image.fromarray(tile.image).save(out / "tile.png")
    Image.fromarray(tile.semantic).save(out / "tile_truth.png")
    tifffile.imwrite(out / "tile_nuclei.tif", tile.instances, compression="zlib")
    Image.fromarray(support).save(out / "tile_support.png")
    with open(out / "tile_points.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["row", "col", "class"])
        w.writerows([f"{r:.2f}", f"{c:.2f}", k] for r, c, k in clicks(tile.semantic, tile.instances, args.seed))
    labelled = int((support != IGNORE).sum())
    print(f"wrote {out}: tile {tile.image.shape}, {tile.meta['n_nuclei']} nuclei, {labelled} labelled support px")


if __name__ == "__main__":
    main()
