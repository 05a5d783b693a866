"""``metahistoseg inspect DATA_DIR``: open a data folder and summarise what it holds.

A human summary goes to stderr; the last line of stdout is one JSON object (see :func:`summarise`), so scripts
can read it with ``json.loads(out.splitlines()[-1])``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="summarise a data folder (layout, task, classes, counts)",
        description="Open DATA_DIR with its reader (auto-detected unless --layout is given), load every image and "
        "print a summary: a human one on stderr and, as the last line of stdout, one JSON object.",
    )
    p.add_argument("data_dir", metavar="DATA_DIR", type=Path, help="folder in one of the supported layouts")
    p.add_argument("--layout", metavar="NAME", default=None,
                   help="reader to use instead of auto-detection (e.g. unified, monuseg, consep_tiles, cpm15, "
                   "glas, bm_graz_cells, amibr_mitosis)")
    p.set_defaults(func=run)


def summarise(root: str | Path, layout: str | None = None) -> dict[str, Any]:
    """Load every sample of the folder and count what it holds.

    Returns a JSON-ready dict: ``layout``, ``task``, ``kind``, ``root``, ``n_images``, ``classes`` (names),
    ``mpp`` (the folder's µm/px, or the one value all images share, else ``None``), ``mpp_values`` (distinct
    per-image values), ``image_sizes`` (``min_h``, ``max_h``, ``min_w``, ``max_w`` in pixels), ``n_instances``
    (distinct non-zero instance ids summed over images; ``None`` if no image has an instance map),
    ``n_points`` (``None`` without points), ``n_patches`` and ``label_counts`` (class name → patches; ``None``
    unless images carry a patch label) and ``n_unanimous`` (patches whose annotators all agreed; ``None`` when
    the source has no per-item agreement).
    """
    import numpy as np

    from ..data import READERS, detect_layout, open_dataset

    root = Path(root)
    if layout is not None:
        # An explicit layout must still match the folder: readers assume their layout once opened.
        if not root.is_dir():
            detect_layout(root)  # raises the clear "folder not found" / "not a folder" error
        if layout in READERS and not READERS[layout].detect(root):
            raise ValueError(f"{root}: not a {layout!r} folder ({READERS[layout].description})")
    ds = open_dataset(root, layout=layout)
    heights, widths, mpps = [], [], set()
    n_instances = n_points = None
    labels: Counter[int] = Counter()
    n_patches = 0
    n_unanimous = None
    for sample in ds:
        h, w = sample.shape
        heights.append(h)
        widths.append(w)
        if sample.mpp is not None:
            mpps.add(float(sample.mpp))
        if sample.instances is not None:
            ids = np.unique(sample.instances)
            n_instances = (n_instances or 0) + int(np.count_nonzero(ids))
        if sample.points is not None:
            n_points = (n_points or 0) + len(sample.points)
        if sample.patch_label is not None:
            n_patches += 1
            labels[int(sample.patch_label)] += 1
        if "agreement" in sample.meta:
            n_unanimous = (n_unanimous or 0) + int(float(sample.meta["agreement"]) >= 1.0)
    names = list(ds.class_names)
    label_counts = None
    if n_patches:
        label_counts = {name: labels.get(i, 0) for i, name in enumerate(names)}
        label_counts.update({f"class_{i}": c for i, c in labels.items() if not 0 <= i < len(names)})
    mpp = ds.mpp if ds.mpp is not None else (next(iter(mpps)) if len(mpps) == 1 else None)
    return {
        "layout": ds.layout,
        "task": ds.task,
        "kind": ds.kind,
        "root": str(root.resolve()),
        "n_images": len(heights),
        "classes": names,
        "mpp": mpp,
        "mpp_values": sorted(mpps),
        "image_sizes": {"min_h": min(heights), "max_h": max(heights), "min_w": min(widths), "max_w": max(widths)},
        "n_instances": n_instances,
        "n_points": n_points,
        "n_patches": n_patches if n_patches else None,
        "label_counts": label_counts,
        "n_unanimous": n_unanimous,
    }


def format_summary(s: dict[str, Any]) -> str:
    """The human-readable summary of :func:`summarise`'s dict (several lines)."""
    sz = s["image_sizes"]
    mpp = s["mpp"] if s["mpp"] is not None else (", ".join(map(str, s["mpp_values"])) or "unknown")
    lines = [
        f"{s['root']}",
        f"  layout {s['layout']}, task {s['task']} ({s['kind']})",
        f"  {s['n_images']} images, H {sz['min_h']}..{sz['max_h']} px, W {sz['min_w']}..{sz['max_w']} px, "
        f"{mpp} µm/px",
        f"  classes: {', '.join(s['classes'])}",
    ]
    if s["n_instances"] is not None:
        lines.append(f"  instances: {s['n_instances']}")
    if s["n_points"] is not None:
        lines.append(f"  points: {s['n_points']}")
    if s["label_counts"] is not None:
        counts = ", ".join(f"{k} {v}" for k, v in s["label_counts"].items())
        lines.append(f"  patches: {s['n_patches']} ({counts})")
    if s["n_unanimous"] is not None:
        lines.append(f"  unanimous annotator votes: {s['n_unanimous']} of {s['n_images']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    summary = summarise(args.data_dir, layout=args.layout)
    print(format_summary(summary), file=sys.stderr)
    print(json.dumps(summary))
    return 0
