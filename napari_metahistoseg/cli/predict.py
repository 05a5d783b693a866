"""``metahistoseg predict INPUT... --head HEAD --out DIR``: predict images with an adapted head.

INPUT: image files, folders (their images, not recursive) or list files (``.txt``/``.lst``, one path per line,
relative to the list). Per image ``<stem>``, in ``DIR``:

* ``<stem>.semantic.tif`` — ``(H, W) uint8`` class ids (class names in the TIFF description), or for images above
  ``TilingConfig.stream_above_mp`` megapixels (or with ``--stream``) ``<stem>.zarr`` with ``semantic`` (and
  ``instances``, ``np``, ``hv``, ``nc``), predicted streamed with bounded memory;
* ``<stem>.points.csv`` — cell points: peaks of the summed foreground probability, each with its most probable
  class (:func:`~napari_metahistoseg.inference.detect_cells`, as ``evaluate`` scores them); for streamed images
  only with a head adapted on clicked centroids (window by window, :func:`~napari_metahistoseg.inference.large_cells`);
* ``<stem>.provenance.json`` — what made the outputs: package version, command, the image and where its µm/px came
  from, backbone (SHA-256) and head (with its own provenance), devices and every setting of the steps that ran;
* with ``--instances``: ``<stem>.instances.tif`` ``(H, W) uint32`` (or in the zarr), ``<stem>.nuclei.csv`` and
  ``<stem>.nuclei.geojson``, the nuclei outlines as polygons (QuPath: File → Import objects);
* with ``--objects``: ``<stem>.objects.tif`` ``(H, W) uint32`` (or ``objects`` in the zarr) and
  ``<stem>.objects.csv`` — large-object instances (glands) of the semantic foreground (``ObjectPostConfig``);
* with ``--mitosis`` (needs :mod:`napari_metahistoseg.mitosis`; implies ``--instances``): ``<stem>.mitosis.csv``,
  every nucleus centroid classified as a patch (probability and call); with ``--mitosis-truth`` the calls'
  precision, recall and F1 against the truth figures (matched one to one within ``MitosisConfig.match_radius_um``)
  in the summary's ``mitosis_scores``.

``--roi R0,C0,R1,C1`` predicts only that region of each image (streamed; the zarr keeps the image's shape, empty
outside; the nuclei table and mitosis calls cover the region; not with ``--objects``, which needs the whole map).

Several images share the device set (with several devices, one image per device at a time). Under ``torchrun``
(``WORLD_SIZE``/``RANK``) each rank predicts ``files[rank::world]``. Progress goes to stderr, a JSON summary to
the last line of stdout. A bad image is reported on one line naming it and the others are still predicted; the
exit code is then 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

IMAGE_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".png", ".jpg", ".jpeg", ".bmp", ".zarr")
LIST_SUFFIXES = (".txt", ".lst")
PROGRESS_EVERY_S = 1.0  # at most one progress line per image and second (plus the last)
MITOSIS_BLOCK_PX = 2048  # mitosis patches are cut from image blocks of this side (plus a patch of margin)
_print_lock = threading.Lock()


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help="predict images, folders or lists of images with an adapted head")
    p.add_argument("inputs", nargs="+", help="image files, folders or .txt lists of paths")
    p.add_argument("--head", help="adapted head (from `metahistoseg adapt` or the GUI's export)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--backbone", default=None,
                   help="backbone the head was adapted on (default: the one recorded in the head, else 'default')")
    p.add_argument("--instances", action="store_true", help="also nuclei instances and the per-nucleus table")
    p.add_argument("--np-source", choices=["blend", "adapted", "hover"], default="blend",
                   help="nuclear-pixel map for instances: the HoVer NP branch gated by and blended with the adapted "
                        "head's foreground (default; HoVerPostConfig.np_hover_weight, np_gate_um), the adapted "
                        "head's foreground alone, or the HoVer NP branch alone")
    p.add_argument("--objects", action="store_true",
                   help="also large-object (gland) instances of the foreground and the per-object table")
    p.add_argument("--mitosis", action="store_true", help="classify every nucleus as mitotic or not")
    p.add_argument("--mitosis-model", default=None, help="mitosis classifier (default: the bundled one)")
    p.add_argument("--mitosis-truth", default=None, metavar="CSV|DIR",
                   help="truth mitotic figures (a CSV with x,y or row,col columns; a class column keeps class 1 "
                        "rows): one CSV for a single image, or a folder of <stem>.csv; the calls are scored "
                        "(precision, recall, F1 within MitosisConfig.match_radius_um) in the summary")
    p.add_argument("--mpp", type=float, default=None, help="µm per pixel of the inputs (default: their metadata)")
    p.add_argument("--devices", default="auto",
                   help="auto (default: the first GPU if there is one, else the CPU; under torchrun each rank its "
                        "own GPU) | cpu | cuda:0 | cuda:0,cuda:1")
    p.add_argument("--tile", type=int, default=None, help="tile side in model pixels (TilingConfig.tile_px)")
    p.add_argument("--batch", type=int, default=None, help="tiles per forward and device (TilingConfig.batch_size)")
    p.add_argument("--tta", type=int, default=None, choices=[1, 2, 4, 8],
                   help="test-time augmentation: average 1 (off), 2, 4 (flips) or 8 (flips and transposes) "
                        "variants of every tile; costs as many forward passes (TilingConfig.tta_variants)")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast on CUDA devices (faster; >= 98 %% of pixels agree with fp32; "
                        "TilingConfig.autocast_bf16)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network on CUDA devices: each new tile shape compiles once (~20-30 s), "
                        "then runs faster; for slides and many images (TilingConfig.compile)")
    p.add_argument("--stream", action="store_true", help="always predict streamed into <stem>.zarr")
    p.add_argument("--roi", default=None, metavar="R0,C0,R1,C1",
                   help="predict only rows R0..R1, columns C0..C1 of each image (streamed into <stem>.zarr, the "
                        "rest left empty; the nuclei table covers the region): try a head on part of a slide")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.set_defaults(func=run)


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, folders (their images) and list files → image paths, in order, without duplicates."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise ValueError(f"{p}: not found")
        if p.is_dir() and p.suffix.lower() != ".zarr":
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and not q.name.startswith("."))
            if not found:
                raise ValueError(f"{p}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            out += found
        elif p.suffix.lower() in LIST_SUFFIXES:
            lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
            if not lines:
                raise ValueError(f"{p}: list of images is empty")
            out += [(p.parent / ln) if not Path(ln).is_absolute() else Path(ln) for ln in lines]
        else:
            out.append(p)
    seen: set[Path] = set()
    files = [f for f in out if not (f.resolve() in seen or seen.add(f.resolve()))]
    stems: dict[str, Path] = {}
    for f in files:
        if stem(f) in stems:
            raise ValueError(f"{f} and {stems[stem(f)]} would write the same outputs ({stem(f)}.*); rename one")
        stems[stem(f)] = f
    return files


def stem(path: Path) -> str:
    name = path.name
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def shard(files: list[Path]) -> tuple[list[Path], int, int]:
    """``files[rank::world]`` under torchrun (``WORLD_SIZE``/``RANK``), else all files."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return files[rank::world], rank, world


def say(msg: str) -> None:
    with _print_lock:
        print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    if not args.head:
        raise ValueError("no --head given: adapt a head first (metahistoseg adapt IMAGE --labels LABELS.tif "
                         "--out HEAD, or export one from the GUI), then pass --head HEAD")
    mitosis = _load_mitosis(args) if args.mitosis else None
    import torch

    from ..devices import resolve_devices
    from ..pipeline import AdaptedHead, load_backbone

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    files, rank, world = shard(expand_inputs(args.inputs))
    recorded = _recorded_backbone(args.head)
    backbone = load_backbone(args.backbone or recorded)
    head = AdaptedHead.load(args.head, backbone)
    devices = args.devices
    if world > 1 and devices == "auto" and torch.cuda.is_available():
        devices = f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    devs = [str(d) for d in resolve_devices(devices)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    say(f"[predict] rank {rank}/{world}: {len(files)} image(s) on {', '.join(devs)}")
    pred = Predictor(args, backbone, head, out, mitosis)
    results: dict[str, dict] = {}
    if len(devs) > 1 and len(files) > 1:  # one image per device at a time
        threads = [threading.Thread(target=_work, args=(pred, files[i::len(devs)], [d], results, len(files)))
                   for i, d in enumerate(devs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        _work(pred, files, devs, results, len(files))
    failed = [k for k, v in results.items() if "error" in v]
    print(json.dumps({"rank": rank, "world": world, "images": results}))
    return 2 if failed else 0


def _work(pred, files: list[Path], devices: list[str], results: dict, total: int) -> None:
    from . import error

    for f in files:
        t0 = time.time()
        try:
            results[str(f)] = pred(f, devices)
            say(f"[predict] {f.name}: done in {time.time() - t0:.1f} s")
        except (ValueError, OSError) as e:
            results[str(f)] = {"error": str(e)}
            with _print_lock:
                error(str(e) if str(f) in str(e) else f"{f}: {e}")
        except Exception as e:  # noqa: BLE001 - a bug or no memory: one line for this image, go on with the rest
            results[str(f)] = {"error": f"unexpected {type(e).__name__}: {e}"}
            with _print_lock:
                error(f"{f}: unexpected {type(e).__name__}: {e} (rerun it alone with --debug for the traceback)")


def _recorded_backbone(head_path: str) -> str:
    """The backbone name/path recorded in a head's provenance, if it can be loaded from here; else 'default'.
    A missing head file is reported here, before any backbone is loaded."""
    from ..checkpoints import stem_paths

    _, jpath = stem_paths(head_path, ".mhshead")
    if not jpath.exists():
        raise ValueError(f"{jpath}: head not found (adapt one with `metahistoseg adapt` or export it from the GUI)")
    try:
        rec = (json.loads(jpath.read_text()).get("provenance") or {}).get("backbone")
    except (OSError, ValueError):
        return "default"  # AdaptedHead.load reports the problem with the head file itself
    if isinstance(rec, str) and (rec in ("default", "transfer", "scratch") or Path(rec + ".json").exists()
                                 or Path(rec).exists()):
        return rec
    return "default"


def _load_mitosis(args: argparse.Namespace):
    import importlib
    import importlib.util

    if importlib.util.find_spec(f"{__package__.rsplit('.', 1)[0]}.mitosis") is None:
        raise ValueError("--mitosis needs the mitosis module (napari_metahistoseg.mitosis), which this "
                         "installation does not have; predict without --mitosis")
    mod = importlib.import_module(f"{__package__.rsplit('.', 1)[0]}.mitosis")
    try:
        model, _ = mod.load_mitosis_model(args.mitosis_model)
    except ValueError as e:
        which = args.mitosis_model or "the bundled mitosis classifier"
        raise ValueError(f"--mitosis: cannot load {which} ({e}); give --mitosis-model PATH") from None
    args.instances = True  # candidates are nucleus centroids
    return mod, model


def parse_roi(spec: str | None) -> tuple[int, int, int, int] | None:
    """``"R0,C0,R1,C1"`` → a region (clipped to each image by ``predict_large``); ValueError if malformed."""
    from . import int_list

    if spec is None:
        return None
    r0, c0, r1, c1 = int_list(spec, "--roi", "R0,C0,R1,C1")
    if r1 <= r0 or c1 <= c0:
        raise ValueError(f"--roi needs 0 <= R0 < R1 and 0 <= C0 < C1, got {spec!r}")
    return r0, c0, r1, c1


class Predictor:
    """Predict one image into the output folder (in memory or streamed) and return what was written."""

    def __init__(self, args: argparse.Namespace, backbone, head, out: Path, mitosis) -> None:
        import dataclasses

        from ..config import TilingConfig

        self.args, self.backbone, self.head, self.out, self.mitosis = args, backbone, head, out, mitosis
        self.tiling = dataclasses.replace(TilingConfig(), **{k: v for k, v in (("tile_px", args.tile),
                                                                                ("batch_size", args.batch),
                                                                                ("tta_variants", args.tta),
                                                                                ("autocast_bf16", args.bf16 or None),
                                                                                ("compile", args.compile or None))
                                                               if v is not None})
        self.roi = parse_roi(args.roi)
        if self.roi is not None and args.objects:
            raise ValueError("--objects needs the whole semantic map: predict without --roi for gland instances")

    def __call__(self, path: Path, devices: list[str]) -> dict:
        from ..slide import open_image

        with open_image(path, mpp=self.args.mpp) as img:
            mpp = img.mpp
            if mpp is None:
                say(f"[predict] {path.name}: no µm-per-pixel in the metadata; assuming the backbone's "
                    f"{self.backbone.mpp} (give --mpp)")
                mpp = self.backbone.mpp
            big = (self.args.stream or self.roi is not None
                   or img.height * img.width > self.tiling.stream_above_mp * 1e6)
            res = (self._large if big else self._small)(path, img, mpp, devices)
        mpp_from = "--mpp" if self.args.mpp else "metadata" if img.mpp is not None else "assumed (the backbone's)"
        res["provenance"] = str(self._provenance(path, mpp, mpp_from, devices, res))
        return res

    def _provenance(self, path: Path, mpp: float, mpp_from: str, devices: list[str], res: dict) -> Path:
        """``<stem>.provenance.json``: what made these outputs — versions, command, image and its µm/px, backbone
        and head (with the head's own provenance), devices and every setting of the steps that ran."""
        import datetime

        from .. import __version__
        from ..config import HoVerPostConfig, ObjectPostConfig, to_dict

        a = self.args
        doc = {
            "format": "metahistoseg-prediction", "package_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "image": str(path), "mpp": mpp, "mpp_from": mpp_from,
            "devices": list(devices), "backbone": {"name": self.backbone.name, "sha256": self.backbone.sha256},
            "head": {"file": str(a.head), "classes": list(self.head.classes), "provenance": self.head.provenance},
            "tiling": to_dict(self.tiling), "np_source": a.np_source, "roi": list(self.roi) if self.roi else None,
            **({"hover": to_dict(HoVerPostConfig())} if a.instances or a.mitosis else {}),
            **({"objects": to_dict(ObjectPostConfig())} if a.objects else {}),
            **({"mitosis": {"model": a.mitosis_model or "bundled", "config": to_dict(self.mitosis[1].cfg)}}
               if self.mitosis is not None else {}),
            "outputs": {k: v for k, v in res.items() if isinstance(v, str) and k != "mode"},
        }
        out = self.out / f"{stem(path)}.provenance.json"
        out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        return out

    def _progress(self, path: Path, gen):
        from ..maml import run as drive

        last = [0.0]

        def show(p: dict) -> None:
            now = time.time()
            if now - last[0] >= PROGRESS_EVERY_S or p.get("done") == p.get("total"):
                last[0] = now
                say(f"[{p['stage']}] {path.name}: {p.get('done', 0)}/{p.get('total', '?')}")

        return drive(gen, show)

    def _small(self, path: Path, img, mpp: float, devices: list[str]) -> dict:
        import numpy as np
        import tifffile

        from ..inference import NucleiOutputs, ObjectsCSV, hover_type_names, predict

        image = img[:, :]
        pred = self._progress(path, predict(self.backbone, self.head, image, mpp=mpp, devices=devices,
                                            tiling=self.tiling, instances=self.args.instances,
                                            np_source=self.args.np_source, objects=self.args.objects))
        s = stem(path)
        res = {"mode": "in-memory", "shape": list(image.shape[:2]), "mpp": mpp, "classes": self.head.classes}
        tags = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER", "compression": "zlib"}
        res["semantic"] = str(self.out / f"{s}.semantic.tif")
        tifffile.imwrite(res["semantic"], pred.semantic, description=json.dumps({"classes": self.head.classes}),
                         **tags)
        res["points"] = str(self._points(s, pred.probs, mpp))
        if pred.objects is not None:
            res["objects"] = str(self.out / f"{s}.objects.tif")
            tifffile.imwrite(res["objects"], pred.objects, **tags)
            res["objects_csv"] = str(ObjectsCSV.write(self.out / f"{s}.objects.csv", pred.object_table, mpp=mpp,
                                                      classes=self.head.classes))
            res["n_objects"] = len(pred.object_table["id"])
        if pred.instances is not None:
            res["instances"] = str(self.out / f"{s}.instances.tif")
            tifffile.imwrite(res["instances"], pred.instances.astype(np.uint32), **tags)
            table = NucleiOutputs(self.out / f"{s}.nuclei.csv", mpp=mpp, type_names=hover_type_names(self.backbone))
            try:
                table.write(pred.table)
            finally:
                table.close()
            res.update(nuclei=str(table.path), nuclei_geojson=str(table.geojson), n_nuclei=table.rows)
            if self.mitosis is not None:
                pts = np.stack([pred.table["centroid_row"], pred.table["centroid_col"]], 1).reshape(-1, 2)
                path, scores = self._mitosis(s, lambda box: image[box[0]:box[2], box[1]:box[3]], image.shape,
                                             pred.table["id"], pts, mpp, devices[0])
                res.update(mitosis=str(path), **({"mitosis_scores": scores} if scores is not None else {}))
        return res

    def _points(self, s: str, probs, mpp: float) -> Path:
        import csv

        from ..inference import click_radius_px, detect_cells

        pts, classes, prob = detect_cells(probs, radius_px=click_radius_px(self.head, mpp))
        path = self.out / f"{s}.points.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["row", "col", "class", "class_name", "prob"])
            for (r, cc), c, pr in zip(pts, classes, prob, strict=True):
                w.writerow([f"{r:.1f}", f"{cc:.1f}", int(c), self.head.classes[c], f"{float(pr):.4f}"])
        return path

    def _large(self, path: Path, img, mpp: float, devices: list[str]) -> dict:
        from ..inference import click_radius_px, nuclei_centroids, predict_large

        s = stem(path)
        res = self._progress(path, predict_large(self.backbone, self.head, img, out_dir=self.out / f"{s}.zarr",
                                                 mpp=mpp, devices=devices, tiling=self.tiling,
                                                 instances=self.args.instances, np_source=self.args.np_source,
                                                 nuclei_csv=self.out / f"{s}.nuclei.csv",
                                                 objects=self.args.objects,
                                                 objects_csv=self.out / f"{s}.objects.csv",
                                                 cells_radius_px=click_radius_px(self.head, mpp),
                                                 points_csv=self.out / f"{s}.points.csv",
                                                 roi=self.roi, roi_only=self.roi is not None))
        out = {"mode": "streamed" if self.roi is None else "streamed, region only", "shape": list(res.shape),
               "mpp": mpp, "classes": res.classes, "zarr": str(res.store), "tiles": res.tiles,
               **({"roi": list(res.roi)} if self.roi is not None else {})}
        if res.objects_csv is not None:
            out.update(objects_csv=str(res.objects_csv), n_objects=res.n_objects)
        if res.points_csv is not None:
            out.update(points=str(res.points_csv), n_cells=res.n_cells)
        if res.nuclei_csv is not None:
            out.update(nuclei=str(res.nuclei_csv), nuclei_geojson=str(res.nuclei_geojson), n_nuclei=res.n_instances)
            if self.mitosis is not None:
                ids, pts = nuclei_centroids(res.nuclei_csv)
                path, scores = self._mitosis(s, lambda box: img.read(*box), img.shape, ids, pts, mpp, devices[0])
                out.update(mitosis=str(path), **({"mitosis_scores": scores} if scores is not None else {}))
        return out

    def _mitosis(self, s: str, read, shape, ids, pts, mpp: float, device: str) -> tuple[Path, dict | None]:
        """Classify a patch around every centroid, reading the image block by block (never all of it); with
        ``--mitosis-truth``, also the scores of the calls against the truth figures of this image (else None)."""
        import csv

        import numpy as np

        mod, model = self.mitosis
        probs = mod.classify_points_blockwise(model, read, shape, pts, mpp, block_px=MITOSIS_BLOCK_PX, device=device)
        calls = mod.decide(probs, model.cfg)
        path = self.out / f"{s}.mitosis.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "row", "col", "prob", "mitotic"])
            for i, (r, c), p, k in zip(ids, pts, probs, calls, strict=True):
                w.writerow([int(i), f"{r:.2f}", f"{c:.2f}", f"{float(p):.4f}", int(k)])
        return path, self._mitosis_scores(s, np.asarray(pts).reshape(-1, 2)[np.asarray(calls, bool)], shape, mpp,
                                          model.cfg)

    def _mitosis_scores(self, s: str, called, shape, mpp: float, cfg) -> dict | None:
        from ..metrics import detection_scores
        from .adapt_mitosis import read_truth

        spec = self.args.mitosis_truth
        if spec is None:
            return None
        truth_file = Path(spec) / f"{s}.csv" if Path(spec).is_dir() else Path(spec)
        if Path(spec).is_dir() and not truth_file.exists():
            return None  # no truth for this image
        truth = read_truth(truth_file, tuple(shape[:2]))
        det = detection_scores(called, truth, cfg.match_radius_um / mpp)
        return {"truth": str(truth_file), "n_truth": len(truth), "n_called": len(called),
                "match_radius_um": cfg.match_radius_um, **det}
