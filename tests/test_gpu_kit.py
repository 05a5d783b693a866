"""The GPU training kit, on the CPU: the training configs load, the GPU recipe differs from the bundled one only
where documented, and ``scripts/pack_training_data.py`` packs tasks that train on exactly the same pixels."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from napari_metahistoseg.config import TrainConfig, load_json
from napari_metahistoseg.data.synthetic import synthetic_tile
from napari_metahistoseg.data.task import save_unified
from napari_metahistoseg.training import load_training_tasks

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_training_configs_load(path):
    cfg = load_json(TrainConfig, path)
    assert cfg.data and cfg.supervised_steps > 0


def _differences(a: Path, b: Path) -> set[str]:
    x, y = json.loads(a.read_text()), json.loads(b.read_text())
    return {k for k in x.keys() | y.keys() if x.get(k) != y.get(k)}


def test_gpu_recipe_differs_from_the_bundled_one_only_in_length_and_devices():
    c = ROOT / "configs"
    assert _differences(c / "backbone.json", c / "backbone_gpu.json") <= {
        "supervised_steps", "meta_steps", "checkpoint_every", "loader_workers", "device", "out_dir"}
    assert _differences(c / "backbone_gpu.json", c / "loto_monuseg_gpu.json") == {"holdout_tasks", "out_dir"}
    assert load_json(TrainConfig, c / "loto_monuseg_gpu.json").holdout_tasks == ("monuseg",)


def _pack_module():
    spec = importlib.util.spec_from_file_location("pack_training_data", ROOT / "scripts" / "pack_training_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pack_training_data_trains_on_the_same_pixels(tmp_path):
    src = tmp_path / "src"
    fine = [synthetic_tile((120, 100), seed=i).with_(task="fine", sample_id=f"f{i}", mpp=0.25) for i in range(2)]
    coarse = [synthetic_tile((60, 50), seed=5 + i).with_(task="coarse", sample_id=f"c{i}", mpp=0.62)
              for i in range(2)]
    save_unified(fine, src / "fine")
    save_unified(coarse, src / "coarse")
    cfg = dataclasses.replace(TrainConfig(), data={"fine": "src/fine", "coarse": "src/coarse"})
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"data": cfg.data}))
    out = tmp_path / "pack"
    assert _pack_module().main(["--config", str(config), "--out", str(out)]) == 0

    packed = json.loads((out / "fine" / "task.json").read_text())
    assert {e["mpp"] for e in packed["samples"]} == {0.5}  # finer than the model: downsampled once, here
    assert {e["mpp"] for e in json.loads((out / "coarse" / "task.json").read_text())["samples"]} == {0.62}
    direct = load_training_tasks({k: str(tmp_path / v) for k, v in cfg.data.items()}, cfg.model.mpp)
    via_pack = load_training_tasks({"fine": str(out / "fine"), "coarse": str(out / "coarse")}, cfg.model.mpp)
    for name in direct:
        assert len(direct[name]) == len(via_pack[name])
        for a, b in zip(direct[name], via_pack[name], strict=True):
            assert a.sample_id == b.sample_id and a.mpp == b.mpp
            np.testing.assert_array_equal(a.image, b.image)
            np.testing.assert_array_equal(a.semantic, b.semantic)
            np.testing.assert_array_equal(a.instances, b.instances)


def test_pack_holdout_keeps_images_out_and_writes_them_apart(tmp_path, capsys):
    src = tmp_path / "src"
    save_unified([synthetic_tile((64, 64), seed=i).with_(task="nuc", sample_id=f"slide{i // 2}_{i}", mpp=0.5)
                  for i in range(4)], src / "nuc")
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"data": {"nuc": "src/nuc"}}))
    mod = _pack_module()
    out, held = tmp_path / "pack", tmp_path / "held"
    assert mod.main(["--config", str(config), "--out", str(out), "--holdout", "nuc:slide1_*",
                     "--holdout-out", str(held)]) == 0
    ids = lambda d: sorted(e["id"] for e in json.loads((d / "task.json").read_text())["samples"])  # noqa: E731
    assert ids(out / "nuc") == ["slide0_0", "slide0_1"]
    assert ids(held / "nuc") == ["slide1_2", "slide1_3"]
    assert json.loads((out / "holdout.json").read_text()) == {"nuc": ["slide1_2", "slide1_3"]}
    for bad, msg in ((["nuc:nothing*"], "match no sample"), (["nuc:*"], "every sample"), (["other:x"], "no task"),
                     (["nuc"], "TASK:PATTERN")):
        assert mod.main(["--config", str(config), "--out", str(tmp_path / "p2")]
                        + [a for b in bad for a in ("--holdout", b)]) == 2
        assert msg in capsys.readouterr().err
