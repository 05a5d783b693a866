"""Pack a training config's task folders into the unified format, small enough to carry to a remote GPU.

    .venv/bin/python scripts/pack_training_data.py --config configs/backbone.json --out .gpu/data
    .venv/bin/python scripts/pack_training_data.py --config configs/backbone.json --out .gpu/data \
        --holdout 'monuseg:TCGA-21-*' --holdout 'glas:testB_*' --holdout-out runs/holdout

Each task is read with its own reader (CoNSeP tiles grouped into the 2x2 mosaics training uses) and written with
``save_unified`` to ``OUT/<folder name>`` (the last part of the config's path: ``monuseg``, ``consep_tiles`` ...).
Images finer than the model's mpp are downsampled to it (what ``load_training_tasks`` does at the start of every
run, so training on the pack sees the same pixels); coarser ones (GlaS, 0.62 µm/px) stay at their own mpp, which
``load_training_tasks`` upsamples, because upsampling first would only make the pack bigger. Lossless: PNG images,
zlib TIFF instances. The dev data of ../shared/data pack to 48 MB; never commit a pack (licences: the
sources' SOURCE.md).

``--holdout TASK:PATTERN`` (repeatable; shell-style patterns on the source's sample ids, applied before CoNSeP's
mosaics, so ``consep:train_14_*`` holds out a whole parent image) keeps images out of the pack, for measuring
how a recipe does on unseen images of the training sources; ``--holdout-out DIR`` writes them, unchanged, as
unified folders ``DIR/<folder name>`` to evaluate on (``metahistoseg evaluate DIR/monuseg --support ...``). The
held-out ids are listed in ``OUT/holdout.json``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from napari_metahistoseg.config import TrainConfig, load_json  # noqa: E402
from napari_metahistoseg.data import open_dataset  # noqa: E402
from napari_metahistoseg.data.samplers import rescale_sample  # noqa: E402
from napari_metahistoseg.data.task import save_unified  # noqa: E402
from napari_metahistoseg.training import consep_mosaics  # noqa: E402


def parse_holdout(specs: list[str], tasks: list[str]) -> dict[str, list[str]]:
    """``["monuseg:TCGA-21-*", ...]`` -> ``{"monuseg": ["TCGA-21-*"]}``; unknown task names are an error."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        task, sep, pattern = spec.partition(":")
        if not sep or not pattern:
            raise ValueError(f"--holdout {spec!r}: expected TASK:PATTERN, e.g. monuseg:TCGA-21-*")
        if task not in tasks:
            raise ValueError(f"--holdout {spec!r}: no task {task!r} in the config (tasks: {', '.join(tasks)})")
        out.setdefault(task, []).append(pattern)
    return out


def pack(cfg: TrainConfig, config_dir: Path, out: Path, holdout: dict[str, list[str]] | None = None,
         holdout_out: Path | None = None) -> dict[str, int]:
    holdout = holdout or {}
    sizes, held = {}, {}
    for name, folder in cfg.data.items():
        src = (config_dir / folder).resolve()
        ds = open_dataset(src)
        samples = list(ds)
        patterns = holdout.get(name, [])
        taken = [any(fnmatch.fnmatchcase(s.sample_id, p) for p in patterns) for s in samples]
        held_out = [s for s, t in zip(samples, taken, strict=True) if t]
        if patterns and not held_out:
            raise ValueError(f"--holdout {name}: {patterns} match no sample id of {src}")
        if held_out:
            held[name] = [s.sample_id for s in held_out]
            samples = [s for s, t in zip(samples, taken, strict=True) if not t]
            if not samples:
                raise ValueError(f"--holdout {name}: {patterns} hold out every sample of {src}")
            if holdout_out is not None:
                save_unified(held_out, holdout_out / src.name)
        if ds.layout == "consep_tiles":
            samples = consep_mosaics(samples)
        mpp = cfg.model.mpp
        samples = [rescale_sample(s, mpp) if s.mpp is not None and s.mpp < mpp else s for s in samples]
        dest = save_unified(samples, out / src.name)
        sizes[name] = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
        print(f"{name}: {len(samples)} samples from {src} -> {dest} ({sizes[name] / 1e6:.1f} MB)"
              + (f", {len(held_out)} held out" if held_out else ""), flush=True)
    (out / "holdout.json").write_text(json.dumps(held, indent=1) + "\n")
    return sizes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="TrainConfig JSON whose 'data' folders to pack")
    ap.add_argument("--out", required=True, help="folder for the packed tasks (one unified folder per task)")
    ap.add_argument("--holdout", action="append", default=[], metavar="TASK:PATTERN",
                    help="keep matching sample ids of TASK out of the pack (repeatable)")
    ap.add_argument("--holdout-out", help="write the held-out samples here, one unified folder per task")
    args = ap.parse_args(argv)
    cfg = load_json(TrainConfig, args.config)
    try:
        holdout = parse_holdout(args.holdout, list(cfg.data))
        sizes = pack(cfg, Path(args.config).resolve().parent, Path(args.out), holdout,
                     Path(args.holdout_out) if args.holdout_out else None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"total {sum(sizes.values()) / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
