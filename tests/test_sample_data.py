"""Sample-data contributions: LayerDataTuples, seeds in metadata, demo strokes agree with the truth."""

from __future__ import annotations

import numpy as np

from napari_metahistoseg import sample_data as sd
from napari_metahistoseg.data.task import IGNORE


def test_synthetic_he_layers_and_seed():
    layers = sd.synthetic_he()
    assert [t for *_, t in layers] == ["image", "labels", "labels"]
    (img, ikw, _), (sem, skw, _), (inst, nkw, _) = layers
    assert img.shape == (256, 256, 3) and img.dtype == np.uint8
    assert ikw["metadata"]["seed"] == 0 and ikw["metadata"]["mpp"] == sd.SYNTHETIC_MPP
    assert skw["metadata"][sd.META]["kind"] == "truth"
    assert skw["metadata"][sd.META]["classes"] == ["background", "nucleus"]
    assert set(np.unique(sem)) <= {0, 1} and inst.max() > 0
    np.testing.assert_array_equal(sem > 0, inst > 0)
    again = sd.synthetic_he()
    np.testing.assert_array_equal(again[0][0], img)
    assert not np.array_equal(sd.synthetic_he(seed=1)[0][0], img)


def test_ihc_image():
    [(img, kw, kind)] = sd.ihc_image()
    assert kind == "image" and img.shape == (512, 512, 3) and kw["metadata"]["mpp"] is None


def test_demo_session_strokes_agree_with_truth():
    from napari_metahistoseg.data.synthetic import synthetic_tile

    (img, _, _), (sup, kw, kind) = sd.demo_session()
    assert kind == "labels" and sup.dtype == np.uint8
    meta = kw["metadata"][sd.META]
    assert meta["kind"] == "support" and meta["classes"] == ["background", "nucleus"]
    truth = synthetic_tile(sd.SYNTHETIC_SHAPE, seed=0, mpp=sd.SYNTHETIC_MPP).semantic
    assert set(np.unique(sup)) == {0, 1, 2}  # unknown, background, nucleus
    assert (sup == 0).mean() > 0.8  # mostly unknown: strokes, not a full mask
    np.testing.assert_array_equal(truth[sup == 1], 0)
    np.testing.assert_array_equal(truth[sup == 2], 1)


def test_support_to_layer_and_colormap():
    sup = np.array([[IGNORE, 0], [1, 2]], np.uint8)
    np.testing.assert_array_equal(sd.support_to_layer(sup), [[0, 1], [2, 3]])
    cm = sd.labels_colormap(["#000000", "#ffffff"], offset=1)
    assert cm[0] == "transparent" and cm[1] == "#000000" and cm[2] == "#ffffff"
    assert sd.class_colours(14)[12] == sd.PALETTE[0]


def test_sample_data_folder_is_regenerated_exactly(tmp_path):
    """The committed files in sample_data/ are what scripts/make_sample_data.py writes."""
    import runpy
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = runpy.run_path(str(root / "scripts" / "make_sample_data.py"))
    script["main"](["--out", str(tmp_path)])
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["tile.png", "tile_nuclei.tif", "tile_points.csv", "tile_support.png", "tile_truth.png"]
    for name in written:
        assert (root / "sample_data" / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_sample_files_read_with_the_core_readers():
    from pathlib import Path

    from napari_metahistoseg.data.io import read_mask, read_points_csv, read_rgb

    folder = Path(__file__).resolve().parents[1] / "sample_data"
    img = read_rgb(folder / "tile.png")
    sup = read_mask(folder / "tile_support.png", dtype=np.uint8, shape=img.shape[:2])
    truth = read_mask(folder / "tile_truth.png", dtype=np.uint8, shape=img.shape[:2])
    pts, cls = read_points_csv(folder / "tile_points.csv", shape=img.shape[:2])
    assert set(np.unique(sup)) == {0, 1, IGNORE}
    np.testing.assert_array_equal(truth[sup == 1], 1)
    assert len(pts) == 20 and set(cls) == {0, 1}
    assert np.all(truth[pts[cls == 0, 0].astype(int), pts[cls == 0, 1].astype(int)] == 0)
