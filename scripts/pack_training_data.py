"""Pack a training config's task folders into the unified format, small enough to carry to a remote GPU.

    .venv/bin/python scripts/pack_training_data.py --config configs/backbone.json --out .gpu/data

Each task is read with its own reader (CoNSeP tiles grouped into the 2x2 mosaics training uses) and written with
``save_unified`` to ``OUT/<folder name>`` (the last part of the config's path: ``monuseg``, ``consep_tiles`` ...).
Images finer than the model's mpp are downsampled to it (what ``load_training_tasks`` does at the start of every
run, so training on the pack sees the same pixels); coarser ones (GlaS, 0.62 µm/px) stay at their own mpp, which
``load_training_tasks`` upsamples, because upsampling first would only make the pack bigger. Lossless: PNG images,
zlib TIFF instances. The dev data of ../shared/data pack to 48 MB; never commit a pack (licences: the
sources' SOURCE.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from napari_metahistoseg.config import TrainConfig, load_json  # noqa: E402
from napari_metahistoseg.data import open_dataset  # noqa: E402
from napari_metahistoseg.data.samplers import rescale_sample  # noqa: E402
from napari_metahistoseg.data.task import save_unified  # noqa: E402
from napari_metahistoseg.training import consep_mosaics  # noqa: E402


def pack(cfg: TrainConfig, config_dir: Path, out: Path) -> dict[str, int]:
    sizes = {}
    for name, folder in cfg.data.items():
        src = (config_dir / folder).resolve()
        ds = open_dataset(src)
        samples = list(ds)
        if ds.layout == "consep_tiles":
            samples = consep_mosaics(samples)
        mpp = cfg.model.mpp
        samples = [rescale_sample(s, mpp) if s.mpp is not None and s.mpp < mpp else s for s in samples]
        dest = save_unified(samples, out / src.name)
        sizes[name] = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
        print(f"{name}: {len(samples)} samples from {src} -> {dest} ({sizes[name] / 1e6:.1f} MB)", flush=True)
    return sizes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="TrainConfig JSON whose 'data' folders to pack")
    ap.add_argument("--out", required=True, help="folder for the packed tasks (one unified folder per task)")
    args = ap.parse_args(argv)
    cfg = load_json(TrainConfig, args.config)
    sizes = pack(cfg, Path(args.config).resolve().parent, Path(args.out))
    print(f"total {sum(sizes.values()) / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
