"""``metahistoseg evaluate`` end to end on a small folder in the unified format, with the bundled backbone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_metahistoseg.cli import main
from napari_metahistoseg.config import ObjectPostConfig
from napari_metahistoseg.data import Sample, save_unified
from napari_metahistoseg.postprocess import object_instances


def _glands(seed: int, size: int = 192) -> Sample:
    """Pink stroma with a few dark-purple round 'glands' (radius 28-36 px = 14-18 µm at 0.5 µm/px)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    inst = np.zeros((size, size), np.uint32)
    for k, (r, c) in enumerate(rng.integers(40, size - 40, size=(3, 2)), start=1):
        inst[((yy - r) ** 2 + (xx - c) ** 2 <= rng.integers(28, 37) ** 2) & (inst == 0)] = k
    img = np.empty((size, size, 3), np.uint8)
    img[:] = (236, 180, 210)
    img[inst > 0] = (110, 60, 150)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    return Sample(img, "glands", f"g{seed}", class_names=("background", "gland"), semantic=(inst > 0).astype(np.uint8),
                  instances=inst, mpp=0.5)


def test_evaluate_glands_json_line_and_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = save_unified([_glands(s) for s in range(3)], tmp_path / "glands")
    out = tmp_path / "out"
    assert main(["evaluate", str(folder), "--support", "g0", "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["task"] == "glands" and res["method"] == "maml" and (res["n_support"], res["n_query"]) == (1, 2)
    for key in ("miou", "dice", "aji", "pq", "adapt_seconds", "predict_seconds"):
        assert isinstance(res[key], float) and res[key] >= 0
    assert res["miou"] > 0.7  # dark round objects on pink: an easy task for the bundled backbone
    import tifffile
    from skimage import io as skio

    for qid in ("g1", "g2"):
        sem = skio.imread(out / f"{qid}.semantic.png")
        inst = tifffile.imread(out / f"{qid}.instances.tif")
        assert sem.dtype == np.uint8 and inst.dtype == np.uint32 and sem.shape == inst.shape == (192, 192)
        # non-nuclear instance truth is scored against the large-object instances of the semantic foreground
        assert np.array_equal(inst, object_instances(sem > 0, ObjectPostConfig(), 0.5))


def test_evaluate_adapt_overrides_reach_the_adaptation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from napari_metahistoseg import evaluation
    from napari_metahistoseg.maml import run

    seen = []
    real = evaluation.adapt

    def spy(*args, **kwargs):
        seen.append(kwargs["cfg"])
        return (yield from real(*args, **kwargs))

    monkeypatch.setattr(evaluation, "adapt", spy)
    folder = save_unified([_glands(s, size=96) for s in range(2)], tmp_path / "glands")
    run(evaluation.evaluate(folder, ["g0"], adapt_overrides={"colour_features": False, "steps": 3}))
    run(evaluation.evaluate(folder, ["g0"]))
    assert (seen[0].colour_features, seen[0].steps) == (False, 3)
    assert (seen[1].colour_features, seen[1].steps) != (False, 3)  # the defaults otherwise
    with pytest.raises(ValueError, match="unknown MAMLConfig field.*'colour'"):
        run(evaluation.evaluate(folder, ["g0"], adapt_overrides={"colour": False}))


def test_evaluate_patches_one_class_support_names_ids_and_classes(tmp_path: Path, capsys) -> None:
    """An AMi-Br-layout folder whose chosen support patches are all of one class: one clear line, exit 2."""
    from skimage import io as skio

    rng = np.random.default_rng(0)
    rows = ["patch,slide,dataset,uid,x,y,expert1_atypical,expert2_atypical,expert3_atypical"]
    for i, atyp in enumerate([False, False, True, False]):
        sub = "atypical" if atyp else "normal"
        (tmp_path / "patches" / sub).mkdir(parents=True, exist_ok=True)
        skio.imsave(tmp_path / "patches" / sub / f"p{i}.png", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8),
                    check_contrast=False)
        rows.append(f"patches/{sub}/p{i}.png,s.tiff,D,{i},0,0,{atyp},{atyp},{atyp}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    assert main(["evaluate", str(tmp_path), "--support", "p0,p1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "p0, p1" in err and "'normal'" in err and "normal and atypical" in err and str(tmp_path) in err
