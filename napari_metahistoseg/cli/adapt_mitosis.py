"""``metahistoseg adapt-mitosis IMAGE --points POINTS.csv --out MODEL``: adapt the mitosis classifier to clicked
examples of one image.

POINTS.csv has a header naming the coordinates — ``x,y`` (x = column), ``row,col``, ``y,x`` or napari's
``axis-0,axis-1`` — and a ``class`` (or ``label``) column: ``1``/``positive``/``mitotic`` or
``0``/``negative``/``non-mitotic``/``not-mitotic`` (case-insensitive). At least one example of each is needed. Only a
patch around each point is read, so IMAGE may be a whole slide. The classifier's head is fine-tuned
(:func:`napari_metahistoseg.mitosis.adapt_from_points`) and written as ``MODEL.safetensors`` + ``MODEL.json`` with
the provenance (image, counts, steps, base model) under ``adapted_from``; ``metahistoseg predict --mitosis
--mitosis-model MODEL`` uses it. Its path is the last line on stdout.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

POSITIVE = ("1", "positive", "mitotic", "mitosis")
NEGATIVE = ("0", "negative", "non-mitotic", "not-mitotic", "not mitotic", "not")
_SHOWN = 5  # outside points listed in the error message

EPILOG = """POINTS.csv: a header row, then one example per row, e.g.

  x,y,class
  812,430,mitotic
  640,512,0

coordinates: x,y (x = column) or row,col, y,x, axis-0,axis-1 (napari) in IMAGE pixels; class (or label):
1 / positive / mitotic, or 0 / negative / non-mitotic / not-mitotic. At least one of each is needed."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("adapt-mitosis", help="adapt the mitosis classifier to clicked examples of an image",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", help="image file (TIFF/SVS/OME-TIFF/zarr/PNG/JPEG)")
    p.add_argument("--points", required=True, metavar="POINTS.csv",
                   help="examples: x,y,class with class 1/positive/mitotic or 0/negative/non-mitotic (see below)")
    p.add_argument("--mpp", type=float, default=None,
                   help="µm per pixel of IMAGE (default: from its metadata, else 0.25 with a warning)")
    p.add_argument("--model", default=None, metavar="BASE",
                   help="mitosis classifier to start from (default: the bundled one)")
    p.add_argument("--steps", type=int, default=None,
                   help="adaptation steps (default: the base model's MitosisConfig.adapt_steps)")
    p.add_argument("--devices", default="auto", help="auto (the first GPU, else the CPU) | cpu | cuda:0")
    p.add_argument("--out", required=True, metavar="MODEL", help="model path (MODEL.{safetensors,json} are written)")
    p.set_defaults(func=run)


def _read_points(path, shape: tuple[int, int], *, need_class: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """``(N, 2) float64`` (row, col) points of a CSV whose header names the coordinates (``x,y``, ``row,col``,
    ``y,x`` or ``axis-0,axis-1``) and, with ``need_class`` or where present, ``(N,) int64`` classes (``class`` or
    ``label``: 1 mitotic, 0 not); a ValueError naming the file for a bad header, an unparsable row or class, or
    points outside ``shape``."""
    import csv
    from pathlib import Path

    from ..mitosis import points_outside

    f = Path(path)
    if not f.is_file():
        raise ValueError(f"{f}: {'is a folder, not a CSV file' if f.is_dir() else 'file not found'}")
    try:
        rows = [r for r in csv.reader(f.read_text().splitlines()) if any(v.strip() for v in r)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{f}: not a text CSV file ({e})") from None
    header = [h.strip().lower() for h in rows[0]] if rows else []
    axes = next(((header.index(a), header.index(b)) for a, b in (("row", "col"), ("axis-0", "axis-1"), ("y", "x"))
                 if {a, b} <= set(header)), None)
    ik = next((header.index(k) for k in ("class", "label") if k in header), None)
    if axes is None or (ik is None and need_class):
        raise ValueError(f"{f}: header must name the coordinates (x,y or row,col)"
                         f"{' and a class column' if need_class else ''}, got {rows[0] if rows else 'an empty file'}")
    pts, labels, lines = [], [], []
    for i, r in enumerate(rows[1:], start=2):
        try:
            point = (float(r[axes[0]]), float(r[axes[1]]))
            name = r[ik].strip().lower() if ik is not None else "1"
        except (ValueError, IndexError):
            raise ValueError(f"{f}: line {i}: cannot parse {r}") from None
        if not np.isfinite(point).all():
            raise ValueError(f"{f}: line {i}: point has NaN/inf coordinates")
        numeric = name.replace(".", "", 1).isdigit() and float(name) in (0.0, 1.0)
        if name not in POSITIVE + NEGATIVE and not numeric:
            raise ValueError(f"{f}: line {i}: class {r[ik]!r} is neither 1/positive/mitotic nor 0/negative/"
                             "non-mitotic")
        pts.append(point)
        labels.append(int(float(name)) if numeric else int(name in POSITIVE))
        lines.append(i)
    pts_a = np.asarray(pts, np.float64).reshape(-1, 2)
    outside = points_outside(pts_a, shape)
    if outside.size:
        listed = ", ".join(f"line {lines[j]} (row {pts_a[j, 0]:g}, col {pts_a[j, 1]:g})" for j in outside[:_SHOWN])
        more = f" and {outside.size - _SHOWN} more" if outside.size > _SHOWN else ""
        raise ValueError(f"{f}: {outside.size} point(s) lie outside the image of {shape[0]}x{shape[1]} pixels: "
                         f"{listed}{more}")
    return pts_a, (np.asarray(labels, np.int64) if ik is not None else None)


def read_truth(path, shape: tuple[int, int]) -> np.ndarray:
    """``(N, 2)`` (row, col) of the mitotic figures in a truth CSV (coordinates as for the examples; a class
    column, if any, keeps the rows of class 1/positive/mitotic)."""
    pts, labels = _read_points(path, shape, need_class=False)
    return pts if labels is None else pts[labels == 1]


def read_examples(path: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(N, 2) float64`` (row, col) points and ``(N,) int64`` labels (1 mitotic, 0 not) of an examples CSV; a
    ValueError naming the file for a bad header, an unparsable row or class, or points outside ``shape``."""
    pts_a, y = _read_points(path, shape, need_class=True)
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if not n_pos or not n_neg:
        missing = "mitotic (1/positive) example" if not n_pos else "non-mitotic (0/negative) example"
        raise ValueError(f"{path}: no {missing}; {n_pos} mitotic and {n_neg} non-mitotic given, at least one of each "
                         "is needed")
    return pts_a, y


def run(args: argparse.Namespace) -> int:
    from ..maml import run as drive
    from ..mitosis import adapt_from_points, save_mitosis_model
    from ..mitosis_eval import DEFAULT_PATCH_MPP
    from ..slide import open_image

    if args.steps is not None and args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps}")
    with open_image(args.image, mpp=args.mpp) as img:
        pts, labels = read_examples(args.points, img.shape[:2])
        mpp = img.mpp
        if mpp is None:
            print(f"{args.image}: no µm-per-pixel in the metadata; assuming {DEFAULT_PATCH_MPP} (give --mpp)",
                  file=sys.stderr)
            mpp = DEFAULT_PATCH_MPP
        gen = adapt_from_points(img, pts, labels, mpp, model=args.model, steps=args.steps, devices=args.devices,
                                source=str(args.image))
        model, extra = drive(gen, lambda p: print(f"[adapt-mitosis] step {p['step']}/{p['steps']} loss "
                                                  f"{p['loss']:.4f}", file=sys.stderr, flush=True)
                             if p.get("stage") == "adapt" else None)
    extra["adapted_from"]["points"] = str(args.points)
    path = save_mitosis_model(model, args.out, extra=extra)
    print(f"mitosis model written: {path} (+ .json); use it with predict --mitosis --mitosis-model {path}",
          file=sys.stderr)
    print(str(path))
    return 0
