"""``metahistoseg adapt IMAGE --labels LABELS | --points POINTS.csv --out HEAD``: adapt a head on one image.

Labels: an image of class ids the size of IMAGE. With ``--unlabelled 255`` (the default, the library's
convention) 0..C-1 are the classes and 255 is unknown; with ``--unlabelled 0`` (a napari Labels layer saved as
is) 0 is unknown and label k is class k-1. Points: a CSV (``row,col[,class]``, ``y,x[,class]``, ``x,y`` or
napari's ``axis-0,axis-1``); each point becomes a filled circle of ``--radius`` (px or µm) of its class (default
1; class 0 marks background); pixels away from every circle are unknown, or background with
``--points-exhaustive`` (every object of the image was clicked), leaving a ring of
``PointsConfig.background_margin_px`` unknown around the circles. Only the points' bounding box plus the circle
radius and the context is read and used (the whole image when that covers it).

Only the labelled part of the image (plus context) is read, so IMAGE may be a whole slide; with ``--origin ROW,COL``
the labels image covers only a region of IMAGE starting at that pixel (as the GUI's support regions), so a slide's
annotations need not be a slide-sized file. The head is written as
``HEAD.mhshead.safetensors`` + ``HEAD.mhshead.json`` (with provenance); its path is the last line on stdout.
"""

from __future__ import annotations

import argparse
import math
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("adapt", help="adapt a head on one annotated image (labels or points)")
    p.add_argument("image", help="image file (TIFF/SVS/OME-TIFF/zarr/PNG/JPEG)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--labels", help="label image of class ids, same size as IMAGE (or see --origin)")
    p.add_argument("--origin", default=None, metavar="ROW,COL",
                   help="--labels covers a region of IMAGE whose top-left pixel is ROW,COL (a region of a slide, "
                        "as the GUI's support regions; default: the labels are the size of IMAGE)")
    src.add_argument("--points", help="points CSV (row,col[,class] or x,y[,class])")
    p.add_argument("--classes", help="comma-separated class names, background first "
                                     "(default: background,nucleus for points, background,class_1,... for labels)")
    p.add_argument("--unlabelled", type=int, choices=[0, 255], default=255,
                   help="label value meaning 'unknown' (255: classes are 0..C-1; 0: classes are 1..C)")
    p.add_argument("--radius", type=float, default=None, help="point circle radius (default: PointsConfig.radius)")
    p.add_argument("--radius-unit", choices=["px", "um"], default=None, help="unit of --radius (default px)")
    p.add_argument("--points-exhaustive", action="store_true",
                   help="every object is clicked: pixels away from the circles are background")
    p.add_argument("--mpp", type=float, default=None, help="µm per pixel of IMAGE (default: from its metadata)")
    p.add_argument("--backbone", default="default", help="'default', 'transfer' or a backbone checkpoint path")
    p.add_argument("--steps", type=int, default=None, help="inner-loop steps (default: MAMLConfig.steps)")
    p.add_argument("--inner-lr", type=float, default=None, help="inner-loop step size (default: MAMLConfig)")
    p.add_argument("--mode", choices=["head", "decoder"], default="head", help="what adapts")
    p.add_argument("--decoder-blocks", type=int, default=None,
                   help="--mode decoder: decoder blocks that adapt, from the full-resolution end (0 = all; "
                        "default: MAMLConfig.decoder_blocks)")
    p.add_argument("--no-calibrate", action="store_true",
                   help="keep the plain arg-max (default: a dense two-class support fits the foreground threshold "
                        "and the smoothing of the class decision, MAMLConfig.calibrate_threshold/_smoothing)")
    p.add_argument("--no-colour", action="store_true",
                   help="the head sees the backbone's features only (default: also the image's colour, "
                        "MAMLConfig.colour_features; head mode)")
    p.add_argument("--devices", default="auto",
                   help="auto (default: the first GPU if there is one, else the CPU) | cpu | cuda:0 | cuda:0,cuda:1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", required=True, help="head path (HEAD.mhshead.{safetensors,json} are written)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from ..config import MAMLConfig
    from ..devices import resolve_devices
    from ..maml import run as drive
    from ..pipeline import adapt, load_backbone
    from ..slide import open_image

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    backbone = load_backbone(args.backbone)
    with open_image(args.image, mpp=args.mpp) as img:
        mpp = img.mpp
        if mpp is None:
            print(f"{args.image}: no µm-per-pixel in the metadata; assuming the backbone's {backbone.mpp} "
                  "(give --mpp)", file=sys.stderr)
            mpp = backbone.mpp
        margin = math.ceil(_context_px() * backbone.mpp / mpp)
        if args.labels:
            crop, lab, classes, kind = _from_labels(args, img, margin)
        else:
            crop, lab, classes, kind = _from_points(args, img, mpp, margin)
    cfg = MAMLConfig(seed=args.seed, adapt=args.mode, calibrate_threshold=not args.no_calibrate,
                     calibrate_smoothing=not args.no_calibrate, colour_features=not args.no_colour)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in (("steps", args.steps), ("inner_lr", args.inner_lr),
                                                         ("decoder_blocks", args.decoder_blocks)) if v is not None})
    devices = [str(d) for d in resolve_devices(args.devices)]
    print(f"[adapt] on {', '.join(devices)}", file=sys.stderr, flush=True)
    gen = adapt(backbone, [crop], [lab], classes, mpp=mpp, cfg=cfg, devices=devices)
    head = drive(gen, lambda p: print(f"[adapt] step {p['step']}/{p['steps']} loss {p.get('loss', float('nan')):.4f}",
                                    file=sys.stderr, flush=True) if p.get("stage") == "adapt" else None)
    head.provenance.update({"support_files": {"image": str(args.image), kind: str(args.labels or args.points)},
                            "support_kind": kind, "image_mpp": mpp, **kind_extra(args, kind, mpp, backbone.mpp)})
    wpath, jpath = head.save(args.out)
    print(f"head written: {jpath}", file=sys.stderr)
    print(str(jpath))
    return 0


def _context_px() -> int:
    from ..pipeline import CONTEXT_PX

    return CONTEXT_PX


def kind_extra(args: argparse.Namespace, kind: str, mpp: float, model_mpp: float) -> dict:
    """Provenance of a point support: the circle radius in model pixels (predict detects points with it)."""
    if kind != "points":
        return {}
    return {"points_radius_model_px": _radius_px(args, mpp) * mpp / model_mpp,
            "points_exhaustive": bool(args.points_exhaustive)}


def _radius_px(args: argparse.Namespace, mpp: float) -> float:
    from ..config import PointsConfig
    from ..data.points import radius_in_pixels

    cfg = PointsConfig()
    return radius_in_pixels(args.radius if args.radius is not None else cfg.radius,
                            args.radius_unit or cfg.radius_unit, mpp)


def _class_names(spec: str | None, n_needed: int, default: list[str]) -> list[str]:
    if spec is None:
        names = default
    else:
        names = [c.strip() for c in spec.split(",") if c.strip()]
        if len(set(names)) != len(names):
            raise ValueError(f"--classes names must be distinct, got {spec!r}")
    if len(names) < 2:
        raise ValueError(f"--classes needs at least two class names (background first), got {spec!r}")
    if n_needed > len(names):
        raise ValueError(f"the annotations use class ids up to {n_needed - 1} but --classes names only "
                         f"{len(names)} classes ({', '.join(names)})")
    return names


def _from_labels(args, img, margin: int):
    import numpy as np

    from ..data.io import read_mask
    from ..data.task import IGNORE
    from ..slide import label_window

    origin = _origin(args.origin)
    lab = read_mask(args.labels, dtype=np.uint16, shape=None if args.origin else img.shape[:2])
    if args.unlabelled == 0:
        lab = np.where(lab == 0, IGNORE, lab.astype(np.int64) - 1)
    known = lab != IGNORE
    if not known.any():
        raise ValueError(f"{args.labels}: no labelled pixels (everything is 'unknown' = {args.unlabelled})")
    top = int(lab[known].max())
    if top >= IGNORE:
        raise ValueError(f"{args.labels}: label value {top + (args.unlabelled == 0)} is not a class id "
                         f"(classes are {'1..' if args.unlabelled == 0 else '0..'}{IGNORE - 1}, "
                         f"unknown is {args.unlabelled})")
    default = ["background", "foreground"] if top <= 1 else ["background"] + [f"class_{i}" for i in range(1, top + 1)]
    classes = _class_names(args.classes, top + 1, default)
    try:
        crop, window = label_window(img, lab.astype(np.uint8), margin, origin, unknown=IGNORE)
    except ValueError as e:
        raise ValueError(f"{args.labels}: {e} (--origin {args.origin or '0,0'})") from None
    return crop, window, classes, "labels"


def _origin(spec: str | None) -> tuple[int, int]:
    from . import int_list

    return (0, 0) if spec is None else int_list(spec, "--origin", "ROW,COL")


def _from_points(args, img, mpp: float, margin: int):
    import numpy as np

    from ..config import PointsConfig
    from ..data.io import read_points_csv
    from ..data.points import points_to_masks

    h, w = img.shape[:2]
    pts, cls = read_points_csv(args.points, shape=(h, w))
    if len(pts) == 0:
        raise ValueError(f"{args.points}: no points")
    if not args.points_exhaustive and len(np.unique(cls)) < 2:
        raise ValueError(f"{args.points}: every point is class {int(cls[0])} and pixels away from the points are "
                         "unknown, so there is nothing to contrast them with: add background points (class 0) "
                         "or, if every object of the image is clicked, use --points-exhaustive")
    top = int(cls.max())
    default = ["background", "nucleus"] if top <= 1 else ["background"] + [f"class_{i}" for i in range(1, top + 1)]
    classes = _class_names(args.classes, top + 1, default)
    radius = _radius_px(args, mpp)
    ring = PointsConfig().background_margin_px if args.points_exhaustive else 0.0
    # only the points' bounding box, their circles and the context is read (a slide is never read whole); with
    # --points-exhaustive the pixels of that window away from the circles are background
    reach = int(math.ceil(radius + margin))
    r0, c0 = max(0, int(pts[:, 0].min()) - reach), max(0, int(pts[:, 1].min()) - reach)
    r1, c1 = min(h, int(pts[:, 0].max()) + reach + 1), min(w, int(pts[:, 1].max()) + reach + 1)
    sem, _ = points_to_masks(pts - [r0, c0], cls, (r1 - r0, c1 - c0), radius,
                             background="background" if args.points_exhaustive else "unknown",
                             background_margin_px=ring)
    if args.points_exhaustive and not (sem == 0).any():
        raise ValueError(f"{args.points}: with --points-exhaustive the circles cover the whole image around the "
                         "points; no background is left to learn from")
    return img.read(r0, c0, r1, c1), np.asarray(sem), classes, "points"
