"""The unified Sample: validation, and the on-disk folder format round trip."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from napari_metahistoseg.data import IGNORE, Sample, open_dataset, save_unified
from napari_metahistoseg.data.task import read_unified_description

H, W = 12, 16


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)


def _sample(**kw) -> Sample:
    base = {"image": _image(), "task": "t", "sample_id": "s0", "class_names": ("background", "cell", "other")}
    return Sample(**{**base, **kw})


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"image": np.zeros((H, W), np.uint8)}, r"image must be \(H, W, 3\) uint8"),
        ({"image": np.zeros((H, W, 3), np.float32)}, r"image must be \(H, W, 3\) uint8, got \(12, 16, 3\) float32"),
        ({"image": np.zeros((H, W, 4), np.uint8)}, r"image must be"),
        ({"image": [[0]]}, r"image must be"),
        ({"image": np.zeros((0, W, 3), np.uint8)}, r"image is empty"),
        ({"semantic": np.zeros((H, W + 1), np.uint8)}, r"semantic mask shape \(12, 17\) != image shape"),
        ({"semantic": np.zeros((H, W), np.int64)}, r"semantic mask must be uint8"),
        ({"semantic": np.full((H, W), 3, np.uint8)}, r"class ids \[3\] outside 0..2"),
        ({"instances": np.zeros((H - 1, W), np.uint32)}, r"instance map shape"),
        ({"instances": np.zeros((H, W), np.int32)}, r"instance map must be uint32"),
        ({"points": np.zeros((3,))}, r"points must be \(N, 2\)"),
        ({"points": np.array([[1.0, np.nan]])}, r"NaN or inf"),
        ({"points": np.zeros((2, 2)), "point_classes": np.ones(3, np.int64)}, r"3 point classes for 2 points"),
    ],
)
def test_validation_errors_name_the_sample(changes, match):
    with pytest.raises(ValueError, match=r"sample t/s0: .*" + match):
        _sample(**changes)


def test_valid_sample_and_with_():
    s = _sample(semantic=np.full((H, W), IGNORE, np.uint8), mpp=0.5)
    assert s.shape == (H, W) and s.n_classes == 3
    t = s.with_(sample_id="s1")
    assert t.sample_id == "s1" and s.sample_id == "s0"
    with pytest.raises(ValueError, match="semantic mask shape"):
        s.with_(semantic=np.zeros((2, 2), np.uint8))


# ------------------------------------------------------------------------------------------ round trip


def _samples() -> list[Sample]:
    sem = np.zeros((H, W), np.uint8)
    sem[2:5, 3:7], sem[8:, :] = 1, IGNORE
    inst = np.zeros((H, W), np.uint32)
    inst[2:5, 3:7], inst[0, 0] = 70000, 3  # an id above 65535 survives (uint32 TIFF)
    a = _sample(semantic=sem, instances=inst, mpp=0.25)
    b = _sample(image=_image(1), sample_id="s1", points=np.array([[1.25, 2.5], [11.0, 15.0]]),
                point_classes=np.array([2, 1]), mpp=0.5)
    c = _sample(image=_image(2), sample_id="s2", patch_label=1, mpp=0.25)
    d = _sample(image=_image(3), sample_id="s3", points=np.zeros((0, 2)), mpp=0.25)
    return [a, b, c, d]


def test_round_trip_through_open_dataset(tmp_path):
    samples = _samples()
    assert save_unified(samples, tmp_path / "u") == tmp_path / "u"
    ds = open_dataset(tmp_path / "u")
    assert ds.layout == "unified" and ds.task == "t" and ds.ids == ["s0", "s1", "s2", "s3"]
    assert ds.class_names == ("background", "cell", "other") and ds.kind == "patches"
    for orig in samples:
        got = ds.load(orig.sample_id)
        assert np.array_equal(got.image, orig.image) and got.mpp == orig.mpp  # mpp kept per sample
        for field in ("semantic", "instances"):
            o, g = getattr(orig, field), getattr(got, field)
            assert (g is None) if o is None else (np.array_equal(o, g) and g.dtype == o.dtype)
        if orig.points is None:
            assert got.points is None
        else:
            np.testing.assert_allclose(got.points, orig.points, atol=1e-3)
            expected = orig.point_classes if orig.point_classes is not None else np.ones(len(orig.points))
            assert got.point_classes.tolist() == expected.tolist()
        assert got.patch_label == orig.patch_label


def test_points_without_classes_saved_as_class_1(tmp_path):
    s = _sample(points=np.array([[3.0, 4.0]]))
    ds = open_dataset(save_unified([s], tmp_path))
    got = ds.load("s0")
    assert got.point_classes.tolist() == [1] and ds.kind == "points"


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="nothing to save"):
        save_unified([], tmp_path)
    with pytest.raises(ValueError, match="several tasks"):
        save_unified([_sample(), _sample(task="u", sample_id="x")], tmp_path)
    with pytest.raises(ValueError, match="different class_names"):
        save_unified([_sample(), _sample(sample_id="x", class_names=("a", "b", "c"))], tmp_path)
    with pytest.raises(ValueError, match=r"duplicate sample ids \['s0'\]"):
        save_unified([_sample(), _sample()], tmp_path)


def test_description_errors(tmp_path):
    with pytest.raises(ValueError, match=r"task\.json: missing"):
        read_unified_description(tmp_path)
    (tmp_path / "task.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"task\.json: not valid JSON"):
        read_unified_description(tmp_path)
    (tmp_path / "task.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="'format' must be"):
        read_unified_description(tmp_path)
    (tmp_path / "task.json").write_text(json.dumps({"format": "metahistoseg-task", "task": "t", "class_names": []}))
    with pytest.raises(ValueError, match="field 'samples' missing"):
        read_unified_description(tmp_path)
    (tmp_path / "task.json").write_text(
        json.dumps({"format": "metahistoseg-task", "task": "t", "class_names": [], "samples": [{"id": 3}]})
    )
    with pytest.raises(ValueError, match="string 'id'"):
        read_unified_description(tmp_path)


def test_missing_file_in_unified_folder_names_it(tmp_path):
    save_unified(_samples()[:1], tmp_path)
    (tmp_path / "semantic" / "s0.png").unlink()
    with pytest.raises(ValueError, match=r"semantic/s0\.png: file not found"):
        open_dataset(tmp_path).load("s0")
    with pytest.raises(ValueError, match="no image with id 'nope'"):
        open_dataset(tmp_path).load("nope")


def test_task_json_written_atomically(tmp_path, monkeypatch):
    save_unified(_samples()[:1], tmp_path)
    before = (tmp_path / "task.json").read_text()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_unified(_samples(), tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "task.json").read_text() == before  # the old description is intact ...
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["task.json"]  # ... and no temp file is left
    assert open_dataset(tmp_path).ids == ["s0"]
