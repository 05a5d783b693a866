"""Pure helpers of the Qt package: layer conversion, progress text, error text, annotation reading."""

from __future__ import annotations

import numpy as np
import pytest

from napari_metahistoseg._qt.importing import merge_support, read_annotations
from napari_metahistoseg._qt.layers import layer_to_support, table_features
from napari_metahistoseg._qt.workers import describe, error_text
from napari_metahistoseg.data.task import IGNORE
from napari_metahistoseg.sample_data import support_to_layer


def test_support_round_trip():
    values = np.array([[0, 1], [2, 3]], np.uint8)
    sup = layer_to_support(values)
    np.testing.assert_array_equal(sup, [[IGNORE, 0], [1, 2]])
    np.testing.assert_array_equal(support_to_layer(sup), values)
    with pytest.raises(ValueError, match="too large"):
        layer_to_support(np.array([[300]]))


def test_table_features():
    table = {"id": np.array([3, 5], np.uint32), "centroid_row": np.array([1.0, 2.0]),
             "centroid_col": np.array([3.0, 4.0]), "area_px": np.array([10, 20]),
             "bbox": np.array([[0, 1, 2, 3], [4, 5, 6, 7]]), "contour": [np.zeros((3, 2))] * 2}
    f = table_features(table)
    assert list(f["index"]) == [3, 5] and list(f["bbox_max_col"]) == [3, 7] and "contour" not in f
    assert table_features({"id": np.zeros(0)}) == {}
    f = table_features({**table, "type": np.array([0, 2]), "type_prob": np.array([0.5, 0.9])}, ["bg", "a", "b"])
    assert list(f["type_name"]) == ["bg", "b"] and list(f["type_prob"]) == [0.5, 0.9]


def test_describe_progress():
    assert describe({"stage": "adapt", "step": 3, "steps": 10, "loss": 0.5, "eta_s": 7}) == (
        3, 10, "adapting 3/10 · loss 0.5000 · ETA 7 s")
    assert describe({"stage": "predict", "done": 2, "total": 4})[:2] == (2, 4)
    assert describe({"stage": "backbone"}) == (0, 0, "loading backbone")


def test_error_text():
    assert error_text("Adapt", ValueError("x.png: corrupt")) == "Adapt failed: x.png: corrupt"
    assert error_text("Adapt", RuntimeError("boom")) == "Adapt failed: RuntimeError: boom"


def test_read_annotations_and_merge(tmp_path):
    (tmp_path / "p.csv").write_text("x,y\n3,4\n")
    got = read_annotations(tmp_path / "p.csv", (10, 10), 2)
    np.testing.assert_array_equal(got.points, [[4, 3]])
    assert got.summary() == "1 points"
    sup = np.full((2, 2), IGNORE, np.uint8)
    sup[0, 0] = 1
    np.testing.assert_array_equal(merge_support(np.array([[0, 1], [1, 0]], np.uint8), sup), [[2, 1], [1, 0]])
    with pytest.raises(ValueError, match="do not match"):
        merge_support(np.zeros((3, 3), np.uint8), sup)


def test_jobs_stream_a_lazy_dask_image(backbone_path, tmp_path):
    """A dask image (what a slide reader gives napari) above the threshold: adapt reads the painted window, predict
    streams into a zarr store named after the image; nothing converts the whole array."""
    import dask.array as da

    from napari_metahistoseg._qt import jobs
    from napari_metahistoseg.config import MAMLConfig, TilingConfig
    from napari_metahistoseg.data.synthetic import synthetic_tile
    from napari_metahistoseg.maml import run
    from napari_metahistoseg.pipeline import load_backbone
    from napari_metahistoseg.slide import label_window

    bb = load_backbone(backbone_path)
    t = synthetic_tile((300, 260), seed=1, mpp=0.5)

    class NoWholeReads:  # a lazy array that fails if anything converts all of it
        def __init__(self, a):
            self.a, self.shape, self.dtype, self.ndim = a, a.shape, a.dtype, a.ndim

        def __getitem__(self, key):
            return self.a[key]

        def __array__(self, *args, **kwargs):
            raise AssertionError("the whole image was read")

    img = NoWholeReads(da.from_array(t.image, chunks=(64, 64, 3)))
    sup = np.full(t.semantic.shape, 255, np.uint8)
    sup[10:60, 10:80] = t.semantic[10:60, 10:80]
    win_img, win_sup = label_window(img, sup, 8, unknown=255)
    assert win_img.shape[:2] == win_sup.shape == (66, 86)  # rows 2..67, cols 2..87
    s = jobs.PredictSettings(mpp=0.5, tiling=TilingConfig(tile_px=128, halo_px=16, stream_above_mp=0.01),
                             stream_dir=str(tmp_path), name="slide 1/A", objects=True, mitosis_model="")
    res = run(jobs.adapt_job(lambda: bb, img, sup, ["background", "nucleus"], ["#000000", "#ff0000"],
                             MAMLConfig(steps=2), ["cpu"], None, 0.5, s))
    assert res.prediction is None and res.large.shape == (300, 260) and res.large.complete
    assert res.large.store.parent == tmp_path and res.large.store.name.startswith("slide_1_A-")
    assert res.large.objects_csv.exists() and (res.large.store / "objects").exists()
    # mitosis candidates (bundled classifier): the streamed nuclei's centroids, patches read block by block
    with open(res.large.nuclei_csv) as f:
        n_nuclei = sum(1 for _ in f) - 1
    assert n_nuclei > 0
    assert res.mitosis_points.shape == (n_nuclei, 2) and res.mitosis_probs.shape == (n_nuclei,)
    assert ((res.mitosis_probs >= 0) & (res.mitosis_probs <= 1)).all()


def test_prune_stores_keeps_the_newest_of_this_image_only(tmp_path):
    from napari_metahistoseg._qt.jobs import prune_stores

    def store(name, ours=True):
        p = tmp_path / name
        p.mkdir()
        if ours:
            (p / "zarr.json").write_text("{}")
        return p

    old = [store(f"img-20261126-0600{i:02d}-000.zarr") for i in range(3)]
    cur = store("img-20261126-070000-000.zarr")
    other = store("img2-20261126-050000-000.zarr")  # another image
    foreign = store("img-20261126-040000-000.zarr", ours=False)  # not a zarr store of ours
    notes = tmp_path / "img-notes"
    notes.mkdir()
    deleted = prune_stores(cur, keep=2)
    assert sorted(deleted) == old[:2]
    assert all(p.exists() for p in (old[2], cur, other, foreign, notes))
    assert prune_stores(tmp_path / "not-a-store.zarr") == []


def test_cancelling_a_streamed_job_stops_the_prediction(backbone_path, tmp_path):
    """Closing the job (the GUI's Cancel) closes the streamed prediction between tiles: the store stays incomplete."""
    import zarr

    from napari_metahistoseg._qt import jobs
    from napari_metahistoseg.config import MAMLConfig, TilingConfig
    from napari_metahistoseg.data.synthetic import synthetic_tile
    from napari_metahistoseg.pipeline import AdaptedHead, initial_head, load_backbone

    bb = load_backbone(backbone_path)
    head = AdaptedHead(["background", "nucleus"], initial_head(bb, 2), bb.sha256, MAMLConfig(), bb.mpp)
    img = synthetic_tile((400, 300), seed=2, mpp=0.5).image
    s = jobs.PredictSettings(mpp=0.5, tiling=TilingConfig(tile_px=128, halo_px=16, stream_above_mp=0.01),
                             stream_dir=str(tmp_path), name="c")
    gen = jobs.predict_job(bb, head, img, s)
    first = [next(gen) for _ in range(2)]
    gen.close()
    assert all(p["stage"] == "predict" for p in first)
    [store] = list(tmp_path.glob("c-*.zarr"))
    assert zarr.open_group(str(store), mode="r").attrs["complete"] is False
