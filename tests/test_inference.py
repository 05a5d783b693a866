"""Prediction in memory and streamed: streamed equals in-memory, resampling, instances + CSV, ROI first,
cancellation, bounded buffers, device sets."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest
import tifffile
import torch
import zarr

from napari_metahistoseg import inference
from napari_metahistoseg.checkpoints import save_model
from napari_metahistoseg.config import (
    HoVerPostConfig,
    MAMLConfig,
    ModelConfig,
    ObjectPostConfig,
    PointsConfig,
    TilingConfig,
)
from napari_metahistoseg.data.synthetic import synthetic_tile
from napari_metahistoseg.inference import NUCLEI_COLUMNS, detect_points, predict, predict_large
from napari_metahistoseg.models import MetaHistoSegNet
from napari_metahistoseg.pipeline import AdaptedHead, initial_head, load_backbone
from napari_metahistoseg.postprocess import OBJECT_COLUMNS, HoVerPostProcessor, object_instances

HOVER_TYPES = ["background", "other", "inflammatory", "epithelial", "spindle"]
TILING = TilingConfig(tile_px=128, halo_px=32, batch_size=2, cpu_batch_size=2, instance_window_px=96,
                      instance_margin_um=12.0)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a small shared machine two OpenMP threads spin against other processes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bb") / "bb"
    save_model(MetaHistoSegNet(ModelConfig(base_channels=8, depth=3), {"generic": 2}, hover_types=5), path,
               head_classes={"generic": ["background", "foreground"], "hover": HOVER_TYPES})
    return load_backbone(str(path))


@pytest.fixture(scope="module")
def head(backbone):
    return AdaptedHead(["background", "nucleus"], initial_head(backbone, 2), backbone.sha256, MAMLConfig(),
                       backbone.mpp)


@pytest.fixture(scope="module")
def image():
    return synthetic_tile((200, 264), seed=2, mpp=0.5).image


def run(gen):
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            return stop.value, events


def test_predict_in_memory(backbone, head, image):
    pred, events = run(predict(backbone, head, image, mpp=0.5, tiling=TILING, instances=True))
    assert pred.semantic.shape == image.shape[:2] and pred.semantic.dtype == np.uint8
    assert pred.probs.shape == (2, *image.shape[:2])
    np.testing.assert_allclose(pred.probs.sum(0), 1, atol=1e-4)
    assert pred.instances.shape == image.shape[:2] and pred.instances.dtype == np.uint32
    assert len(pred.table["id"]) == len(np.unique(pred.instances)) - 1
    assert events[-1]["stage"] == "instances"
    # the stored maps can be post-processed again: a probability map within [0, 1], the same instances
    assert pred.np_prob.dtype == np.float32 and 0 <= pred.np_prob.min() and pred.np_prob.max() <= 1
    again, _ = HoVerPostProcessor(HoVerPostConfig())(pred.np_prob, pred.hv, 0.5)
    np.testing.assert_array_equal(again, pred.instances)


def test_streamed_semantic_equals_in_memory(backbone, head, image, tmp_path):
    mem, _ = run(predict(backbone, head, image, mpp=0.5, tiling=TILING))
    res, events = run(predict_large(backbone, head, image, out_dir=tmp_path / "s.zarr", mpp=0.5, tiling=TILING))
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert root.attrs["complete"] is True and res.complete and res.nuclei_csv is None
    assert "instances" not in root
    # same tiles, same blending: identical up to float rounding at exact ties
    assert (root["semantic"][:] == mem.semantic).mean() > 0.999
    predict_events = [e for e in events if e["stage"] == "predict"]
    assert [e["done"] for e in predict_events] == list(range(1, res.tiles + 1))  # progress per tile
    assert "levels" not in root  # 264 px is below TilingConfig.pyramid_min_px


def test_streamed_labels_get_multiscale_levels(backbone, head, image, tmp_path):
    from napari_metahistoseg.slide import pyramid

    tiling = dataclasses.replace(TILING, pyramid_min_px=64)
    res, events = run(predict_large(backbone, head, image, out_dir=tmp_path / "s.zarr", mpp=0.5, tiling=tiling,
                                    instances=True, objects=True))
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    for name in ("semantic", "instances", "objects"):
        levels = pyramid(root, name)
        assert [lv.shape for lv in levels] == [(200, 264), (100, 132), (50, 66), (25, 33)]
        full = root[name][:]
        assert all(np.array_equal(lv[:], full[:: 2**k, :: 2**k]) for k, lv in enumerate(levels))
    assert [e["done"] for e in events if e["stage"] == "pyramid"] == [0, 1, 2, 3]


@pytest.mark.parametrize("mpp", [0.5, 0.25])
def test_gpu_style_prediction_equals_host_path(backbone, head, image, monkeypatch, mpp):
    """predict's GPU path (image up once, resampled, tiled, blended and decided as device tensors) run on the CPU
    gives the host path's result: the same at the model's resolution; at 40x (0.25 µm/px) the image is resampled
    with torch's antialiased bilinear filter, as the streamed path's tiles are, instead of skimage's Gaussian."""
    from napari_metahistoseg import tiling as tiling_mod

    host = run(predict(backbone, head, image, mpp=mpp, tiling=TILING, instances=True))[0]
    cpu = torch.device("cpu")
    monkeypatch.setattr(inference, "blend_device", lambda *a, **k: cpu)
    monkeypatch.setattr(tiling_mod, "blend_device", lambda *a, **k: cpu)
    dev = run(predict(backbone, head, image, mpp=mpp, tiling=TILING, instances=True))[0]
    assert dev.semantic.dtype == np.uint8 and dev.probs.dtype == np.float32 and dev.hv.shape == host.hv.shape
    if mpp == 0.5:
        np.testing.assert_allclose(dev.probs, host.probs, atol=1e-5)
        np.testing.assert_array_equal(dev.semantic, host.semantic)
    else:
        assert np.abs(dev.probs - host.probs).mean() < 0.01 and (dev.semantic == host.semantic).mean() > 0.98


def test_decide_is_the_first_arg_max():
    rng = np.random.default_rng(0)
    p = rng.random((4, 50, 60)).astype(np.float32)
    p[2, :5] = p[1, :5] = p.max(0)[:5] + 1  # ties: the first class wins, as with argmax
    np.testing.assert_array_equal(inference.decide(p), p.argmax(0))
    np.testing.assert_array_equal(inference.decide(torch.from_numpy(p)).numpy(), p.argmax(0))
    assert inference.decide(torch.from_numpy(p[:2]), 0.5).dtype == torch.uint8


def test_streamed_resamples_to_model_mpp(backbone, head, tmp_path, monkeypatch):
    img = synthetic_tile((300, 260), seed=5, mpp=0.25).image  # 0.25 µm/px: the model sees it at half size
    sizes = []
    orig = inference.TileRunner.__call__

    def spy(self, crops, model_hw=None, **kw):
        sizes.append((crops.shape[1:3], model_hw))
        return orig(self, crops, model_hw, **kw)

    monkeypatch.setattr(inference.TileRunner, "__call__", spy)
    res, _ = run(predict_large(backbone, head, img, out_dir=tmp_path / "r.zarr", mpp=0.25, tiling=TILING))
    assert sizes and all(hw == (round(h / 2), round(w / 2)) for (h, w), hw in sizes)
    assert max(h for (h, _), _ in sizes) <= 256  # tiles of at most 128 model px are at most 256 image px
    mem, _ = run(predict(backbone, head, img, mpp=0.25, tiling=TILING))
    sem = zarr.open_group(str(tmp_path / "r.zarr"), mode="r")["semantic"][:]
    assert sem.shape == img.shape[:2] and res.mpp == 0.25
    assert (sem == mem.semantic).mean() > 0.9  # resampled per tile vs whole image: close, not identical


def test_streamed_instances_and_nuclei_csv(backbone, head, image, tmp_path):
    out = tmp_path / "i.zarr"
    res, events = run(predict_large(backbone, head, image, out_dir=out, mpp=0.5, tiling=TILING, instances=True,
                                    np_source="hover"))
    root = zarr.open_group(str(out), mode="r")
    inst = root["instances"][:]
    assert inst.dtype == np.uint32 and root["np"].dtype == np.uint8 and root["hv"].shape == (2, *image.shape[:2])
    assert root["nc"].shape == (5, *image.shape[:2])
    assert res.nuclei_csv == tmp_path / "i.nuclei.csv" and res.type_names == HOVER_TYPES
    with open(res.nuclei_csv, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == NUCLEI_COLUMNS
    ids = sorted(int(r["id"]) for r in rows)
    assert ids == list(range(1, res.n_instances + 1)) and res.n_instances > 0
    assert set(np.unique(inst).tolist()) - {0} <= set(ids)
    for r in rows:
        assert r["type_name"] == HOVER_TYPES[int(r["type"])]
        assert 0 <= float(r["centroid_row"]) < image.shape[0] and 0 <= float(r["centroid_col"]) < image.shape[1]
    assert any(e["stage"] == "instances" for e in events)
    nid, pts = inference.nuclei_centroids(res.nuclei_csv)  # the table's ids and centroids, as numbers
    assert nid.tolist() == [int(r["id"]) for r in rows] and pts.shape == (len(rows), 2)
    np.testing.assert_allclose(pts, [[float(r["centroid_row"]), float(r["centroid_col"])] for r in rows])
    (tmp_path / "other.csv").write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match="other.csv: not a nuclei table"):
        inference.nuclei_centroids(tmp_path / "other.csv")


OBJECTS = ObjectPostConfig(min_object_area_um2=5.0, split_depth_um=2.0, smooth_um=1.0, work_mpp_um=2.0,
                           large_work_mpp_um=2.0)


def test_objects_in_memory_and_streamed(backbone, head, image, tmp_path):
    """Large-object instances of the foreground: in memory (``Prediction.objects`` + table) and streamed into the
    zarr in strips (+ CSV); the same objects when both use the same grid."""
    mem, events = run(predict(backbone, head, image, mpp=0.5, tiling=TILING, objects=True, object_cfg=OBJECTS))
    assert events[-1]["stage"] == "objects"
    obj = mem.objects
    assert obj.dtype == np.uint32 and obj.shape == image.shape[:2] and obj.max() > 0
    assert np.array_equal(obj, object_instances(mem.semantic > 0, OBJECTS, 0.5))
    assert mem.object_table["id"].tolist() == sorted(set(np.unique(obj).tolist()) - {0})
    assert set(mem.object_table["class"].tolist()) <= {1}
    res, events = run(predict_large(backbone, head, image, out_dir=tmp_path / "o.zarr", mpp=0.5, tiling=TILING,
                                    objects=True, object_cfg=OBJECTS))
    root = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")
    streamed = root["objects"][:]
    assert root.attrs["complete"] is True and root.attrs["n_objects"] == res.n_objects > 0
    assert root.attrs["objects_work_factor"] == 4
    assert [e["done"] for e in events if e["stage"] == "objects"][-1] == 2 * 1  # two passes over one strip
    from napari_metahistoseg.metrics import aji
    assert aji(obj, streamed) > 0.95  # same grid; only the few pixels where the two semantic maps differ
    with open(res.objects_csv, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert res.objects_csv == tmp_path / "o.objects.csv" and tuple(reader.fieldnames) == OBJECT_COLUMNS
    assert sorted(int(r["id"]) for r in rows) == sorted(set(np.unique(streamed).tolist()) - {0})
    for r in rows:
        assert r["class_name"] == "nucleus" and float(r["area_um2"]) == pytest.approx(int(r["area_px"]) * 0.25, 0.01)
        r0, c0, r1, c1 = (int(r[k]) for k in ("bbox_min_row", "bbox_min_col", "bbox_max_row", "bbox_max_col"))
        assert (streamed[r0:r1, c0:c1] == int(r["id"])).sum() == int(r["area_px"])


def test_streamed_objects_in_several_strips(backbone, head, tmp_path):
    img = synthetic_tile((530, 140), seed=4, mpp=0.5).image
    res, _ = run(predict_large(backbone, head, img, out_dir=tmp_path / "s.zarr", mpp=0.5, tiling=TILING))
    whole = inference.large_objects(res, OBJECTS, tmp_path / "a.csv", strip_px=4096)
    gen = inference.large_objects(res, OBJECTS, tmp_path / "b.csv", strip_px=100)
    n, events = run(gen)
    assert n == run(whole)[0] and events[-1]["total"] == 2 * 6  # 96-row strips (a multiple of the factor 4)
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()


def test_roi_is_predicted_first(backbone, head, image, tmp_path):
    roi = (40, 50, 120, 170)
    res, events = run(predict_large(backbone, head, image, out_dir=tmp_path / "a.zarr", mpp=0.5, tiling=TILING,
                                    instances=True, roi=roi))
    stages = [e["stage"] for e in events]
    k = stages.index("roi")
    assert set(stages[:k]) <= {"roi-predict", "roi-instances"} and "predict" in stages[k:]
    assert events[k]["region"] == roi and res.roi == roi
    only, _ = run(predict_large(backbone, head, image, out_dir=tmp_path / "b.zarr", mpp=0.5, tiling=TILING, roi=roi,
                                roi_only=True))
    root = zarr.open_group(str(tmp_path / "b.zarr"), mode="r")
    sem = root["semantic"][:]
    full = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")["semantic"][:]
    outside = np.ones(sem.shape, bool)
    outside[40:120, 50:170] = False
    assert not sem[outside].any()
    assert (sem[40:120, 50:170] == full[40:120, 50:170]).mean() > 0.95  # a halo of context: close to the full pass
    assert root.attrs["complete"] is False


def test_closing_the_generator_cancels(backbone, head, image, tmp_path):
    gen = predict_large(backbone, head, image, out_dir=tmp_path / "c.zarr", mpp=0.5, tiling=TILING, instances=True)
    first = [next(gen) for _ in range(2)]
    gen.close()
    assert all(e["stage"] == "predict" for e in first)
    assert zarr.open_group(str(tmp_path / "c.zarr"), mode="r").attrs["complete"] is False
    with open(tmp_path / "c.nuclei.csv") as f:  # the CSV was closed with its header
        assert f.readline().startswith("id,")


def test_outputs_reach_the_disk_row_band_by_row_band(backbone, head, image, tmp_path):
    """The maps are written as the tile rows finish (not at the end), and a generator closed mid-way leaves the
    rows it finished on disk and the rest empty."""
    gen = predict_large(backbone, head, image, out_dir=tmp_path / "b.zarr", mpp=0.5, tiling=TILING, instances=True)
    seen = []
    for event in gen:
        seen.append(event)
        np_map = zarr.open_group(str(tmp_path / "b.zarr"), mode="r")["np"]
        if np_map[:32].any():  # the first band is on disk
            break
    gen.close()
    last = seen[-1]
    assert last["stage"] == "predict" and last["done"] < last["total"]  # before the last tile
    root = zarr.open_group(str(tmp_path / "b.zarr"), mode="r")
    assert root.attrs["complete"] is False
    assert not root["np"][-32:].any() and not root["semantic"][-32:].any()  # the bottom rows were never reached


def test_band_buffers_are_one_tile_row_high(backbone, head, tmp_path, monkeypatch):
    shapes = []
    orig = inference.BandBlender.__init__

    def spy(self, width, rows, channels, dtype):
        shapes.append((width, rows, dtype))
        orig(self, width, rows, channels, dtype)

    monkeypatch.setattr(inference.BandBlender, "__init__", spy)
    img = synthetic_tile((700, 150), seed=3, mpp=0.5).image
    run(predict_large(backbone, head, img, out_dir=tmp_path / "m.zarr", mpp=0.5, tiling=TILING))
    assert shapes == [(150, 128, np.float32)]  # not the 700 image rows
    small = dataclasses.replace(TILING, band_float32_max_mb=0.01)  # wide bands: float16 accumulators
    run(predict_large(backbone, head, img, out_dir=tmp_path / "h.zarr", mpp=0.5, tiling=small))
    assert shapes[-1] == (150, 128, np.float16)
    a = zarr.open_group(str(tmp_path / "m.zarr"), mode="r")["semantic"][:]
    b = zarr.open_group(str(tmp_path / "h.zarr"), mode="r")["semantic"][:]
    assert (a == b).mean() > 0.999


def test_lazy_tiff_source_and_device_set(backbone, head, image, tmp_path):
    tifffile.imwrite(tmp_path / "img.tif", image, tile=(64, 64), photometric="rgb",
                     resolution=(1 / 0.5e-4, 1 / 0.5e-4), resolutionunit="CENTIMETER")
    one, _ = run(predict_large(backbone, head, tmp_path / "img.tif", out_dir=tmp_path / "1.zarr", tiling=TILING))
    two, _ = run(predict_large(backbone, head, tmp_path / "img.tif", out_dir=tmp_path / "2.zarr", tiling=TILING,
                               devices=["cpu", "cpu"]))
    assert one.mpp == 0.5  # from the TIFF tags
    a = zarr.open_group(str(tmp_path / "1.zarr"), mode="r")["semantic"][:]
    b = zarr.open_group(str(tmp_path / "2.zarr"), mode="r")["semantic"][:]
    np.testing.assert_array_equal(a, b)


def test_bad_arguments(backbone, head, image, tmp_path):
    with pytest.raises(ValueError, match="np_source"):
        run(predict_large(backbone, head, image, out_dir=tmp_path / "x.zarr", np_source="nope"))
    with pytest.raises(ValueError, match="does not overlap"):
        run(predict_large(backbone, head, image, out_dir=tmp_path / "x.zarr", mpp=0.5, tiling=TILING,
                          roi=(500, 500, 600, 600)))


def test_detect_points_finds_blobs():
    prob = np.zeros((80, 80), np.float32)
    for r, c in ((20, 20), (20, 60), (60, 40)):
        prob[r - 4:r + 5, c - 4:c + 5] = 1.0
    pts, p = detect_points(prob, PointsConfig(peak_sigma_px=2.0, peak_min_distance_px=3, peak_threshold=0.5))
    assert sorted(map(tuple, pts.astype(int).tolist())) == [(20, 20), (20, 60), (60, 40)]
    assert (p > 0.5).all()


def _oom_above(model, limit_px: int, monkeypatch) -> list[tuple[int, ...]]:
    """Make ``model.features`` raise a CUDA-style out-of-memory error for batches above ``limit_px`` pixels."""
    seen, orig = [], model.features

    def features(x):
        seen.append(tuple(x.shape))
        if x.shape[0] * x.shape[-2] * x.shape[-1] > limit_px:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return orig(x)

    monkeypatch.setattr(model, "features", features)
    return seen


def test_predict_recovers_from_out_of_memory(backbone, head, image, tmp_path, monkeypatch):
    """Out of memory at batch 2: prediction restarts at batch 1 and gives the batch-1 result, in memory and
    streamed (the streamed outputs are rewritten from scratch)."""
    one = dataclasses.replace(TILING, batch_size=1, cpu_batch_size=1)
    ref, _ = run(predict(backbone, head, image, mpp=0.5, tiling=one))
    ref_large, _ = run(predict_large(backbone, head, image, out_dir=tmp_path / "ref.zarr", mpp=0.5, tiling=one))
    seen = _oom_above(backbone.model, 128 * 128, monkeypatch)
    got, _ = run(predict(backbone, head, image, mpp=0.5, tiling=TILING))
    assert seen[0][0] == 2 and all(s[0] == 1 for s in seen[1:])  # failed once at batch 2, then batch 1 throughout
    np.testing.assert_array_equal(got.semantic, ref.semantic)
    np.testing.assert_allclose(got.probs, ref.probs, atol=1e-6)
    res, _ = run(predict_large(backbone, head, image, out_dir=tmp_path / "s.zarr", mpp=0.5, tiling=TILING))
    assert res.complete and res.tiles == ref_large.tiles
    a = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["semantic"][:]
    b = zarr.open_group(str(tmp_path / "ref.zarr"), mode="r")["semantic"][:]
    np.testing.assert_array_equal(a, b)


def test_out_of_memory_at_the_floor_is_one_clear_error(backbone, head, image, monkeypatch):
    _oom_above(backbone.model, 0, monkeypatch)  # every forward fails
    with pytest.raises(ValueError, match="out of memory even at the smallest tiling"):
        run(predict(backbone, head, image, mpp=0.5, tiling=TILING))


def test_adapt_features_recover_from_out_of_memory(backbone, image, monkeypatch):
    from napari_metahistoseg.pipeline import adapt

    labels = np.full(image.shape[:2], 255, np.uint8)
    labels[:60, :60], labels[100:160, 100:160] = 0, 1
    cfg = MAMLConfig(steps=2)
    ref, _ = run(adapt(backbone, [image], [labels], ["background", "nucleus"], mpp=0.5, cfg=cfg, tiling=TILING))
    seen = _oom_above(backbone.model, 128 * 128, monkeypatch)
    got, _ = run(adapt(backbone, [image], [labels], ["background", "nucleus"], mpp=0.5, cfg=cfg, tiling=TILING))
    assert seen[0][0] == 2 and all(s[0] == 1 for s in seen[1:])  # out of memory at batch 2, then batch 1
    for k, v in ref.state.items():
        np.testing.assert_allclose(got.state[k].numpy(), v.numpy(), atol=1e-5, err_msg=k)


def test_adapt_reports_feature_tiles_and_cancels_between_them(backbone, image, monkeypatch):
    """Support features are computed tile by tile with progress; closing the generator stops the work there."""
    from napari_metahistoseg.pipeline import adapt

    labels = np.full(image.shape[:2], 255, np.uint8)
    labels[:60, :60], labels[100:160, 100:160] = 0, 1
    seen = _oom_above(backbone.model, 1 << 30, monkeypatch)  # never fails; counts the forward passes
    gen = adapt(backbone, [image], [labels], ["background", "nucleus"], mpp=0.5, cfg=MAMLConfig(steps=2),
                tiling=dataclasses.replace(TILING, batch_size=1, cpu_batch_size=1))
    events = []
    for p in gen:
        events.append(p)
        if p.get("tile") == 1:
            break
    gen.close()
    assert events[-1]["stage"] == "features" and events[-1]["tiles"] > 1
    assert len(seen) == 1  # one tile computed, the rest never started


def test_decoder_adaptation_shards_side_by_side_equal_one_shard(backbone, image, caplog):
    """On the CPU the decoder inner loop runs support shards in parallel threads (one core each); the summed
    gradient, hence the adapted decoder, equals the single-shard run up to float rounding."""
    import logging

    from napari_metahistoseg.pipeline import adapt

    labels = np.full(image.shape[:2], 255, np.uint8)
    labels[:80, :90], labels[100:180, 120:220] = 0, 1
    cls = ["background", "nucleus"]
    one, _ = run(adapt(backbone, [image], [labels], cls, mpp=0.5, tiling=TILING,
                       cfg=MAMLConfig(steps=3, adapt="decoder", cpu_shards=1)))
    with caplog.at_level(logging.INFO, logger="napari_metahistoseg.pipeline"):
        two, _ = run(adapt(backbone, [image], [labels], cls, mpp=0.5, tiling=TILING,
                           cfg=MAMLConfig(steps=3, adapt="decoder", cpu_shards=2)))
    assert "2 shards, side by side" in caplog.text
    assert torch.get_num_threads() == 1  # the fixture's setting is restored after the loop
    orig = dict(backbone.model.named_parameters())
    moved = [k for k in two.state if k.startswith("backbone.decoders")
             and not torch.equal(two.state[k].float(), orig[k].detach().float())]
    assert moved  # the decoder itself was adapted
    for k, v in one.state.items():
        np.testing.assert_allclose(two.state[k].numpy(), v.numpy(), atol=1e-5, rtol=1e-4, err_msg=k)
    with pytest.raises(ValueError, match="cpu_shards"):
        MAMLConfig(cpu_shards=-1)


def test_decoder_adaptation_of_the_last_blocks_only(backbone, image):
    """``MAMLConfig.decoder_blocks = 1``: only the full-resolution decoder block (and the head) adapt; the adapted
    state carries just those tensors, and the head still predicts."""
    from napari_metahistoseg.pipeline import adapt

    labels = np.full(image.shape[:2], 255, np.uint8)
    labels[:80, :90], labels[100:180, 120:220] = 0, 1
    head, _ = run(adapt(backbone, [image], [labels], ["background", "nucleus"], mpp=0.5, tiling=TILING,
                        cfg=MAMLConfig(steps=3, adapt="decoder", decoder_blocks=1)))
    last = len(backbone.model.backbone.decoders) - 1
    blocks = {k.split(".")[2] for k in head.state if k.startswith("backbone.")}
    assert blocks == {str(last)}
    orig = dict(backbone.model.named_parameters())
    assert any(not torch.equal(v.float(), orig[k].detach().float()) for k, v in head.state.items()
               if k.startswith("backbone."))
    pred, _ = run(predict(backbone, head, image, mpp=0.5, tiling=TILING))
    assert pred.semantic.shape == image.shape[:2]
    with pytest.raises(ValueError, match="decoder_blocks"):
        MAMLConfig(decoder_blocks=-1)


def test_cpu_tiles_side_by_side_equal_one_at_a_time(backbone, head, image, monkeypatch):
    """cpu_workers=2 runs the tiles of a batch in two threads (one intra-op thread each): same maps, tiles really
    spread over both threads, and the caller's thread count untouched."""
    import threading

    from napari_metahistoseg import tiling

    seen = []
    inner = tiling.with_intra_op_threads

    def spy(n, fn, *args):
        out = inner(n, fn, *args)
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return out

    one = run(predict(backbone, head, image, mpp=0.5, tiling=dataclasses.replace(TILING, cpu_workers=1)))[0]
    assert not seen
    monkeypatch.setattr(tiling, "with_intra_op_threads", spy)
    two = run(predict(backbone, head, image, mpp=0.5, tiling=dataclasses.replace(TILING, cpu_workers=2)))[0]
    assert len({name for name, _ in seen}) == 2 and all(n.startswith("tile-cpu") and t == 1 for n, t in seen)
    assert torch.get_num_threads() == 1  # the fixture's setting, in this thread
    np.testing.assert_allclose(two.probs, one.probs, atol=1e-5)
    three = TilingConfig(cpu_workers=3)
    assert three.batch_for(["cpu"]) == 3 and three.batch_for(["cuda:0"]) == three.batch_size == 16
    assert TilingConfig(cpu_workers=0).workers_for(["cpu"]) == torch.get_num_threads()
    with pytest.raises(ValueError, match="cpu_workers"):
        TilingConfig(cpu_workers=-1)


def _equivariant_forward(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """A forward pass that commutes with flips and transposes: the class logits are a point-wise function of the
    input and the HV field is the image gradient (central differences of the channel mean)."""
    g = x.mean(1, keepdim=True)
    p = torch.nn.functional.pad(g, (1, 1, 1, 1), mode="replicate")
    hv = torch.cat([(p[..., 1:-1, 2:] - p[..., 1:-1, :-2]) / 2, (p[..., 2:, 1:-1] - p[..., :-2, 1:-1]) / 2], 1)
    return {"seg": torch.cat([x[:, :1] * 3, -x[:, 1:2]], 1), "hv": hv}


@pytest.mark.parametrize("variants", [2, 4, 8])
def test_tta_maps_every_variant_back(variants):
    x = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(0))
    plain = _equivariant_forward(x)
    acts = {"seg": lambda t: t.softmax(1)}
    tta = inference.tta_forward(_equivariant_forward, variants, acts)(x)
    torch.testing.assert_close(tta["seg"], plain["seg"].softmax(1))  # averaged as probabilities
    torch.testing.assert_close(tta["hv"], plain["hv"])  # signs and axes of the vector field restored


def test_tta_averages_a_forward_that_is_not_equivariant():
    def left_edge(x):  # marks the left column of its input: a flip-sensitive output
        out = torch.zeros_like(x[:, :1])
        out[..., 0] = 1
        return {"seg": out}

    x = torch.zeros(1, 3, 8, 8)
    out = inference.tta_forward(left_edge, 2)(x)["seg"][0, 0]
    assert torch.all(out[:, 0] == 0.5) and torch.all(out[:, -1] == 0.5) and torch.all(out[:, 1:-1] == 0)
    with pytest.raises(ValueError, match="1, 2, 4 or 8"):
        inference.tta_forward(left_edge, 3)
    with pytest.raises(ValueError, match="tta_variants"):
        TilingConfig(tta_variants=3)


def test_tta_prediction_in_memory_and_streamed(backbone, head, image, tmp_path):
    tiling = dataclasses.replace(TILING, tta_variants=4)
    mem, _ = run(predict(backbone, head, image, mpp=0.5, tiling=tiling, instances=True))
    plain, _ = run(predict(backbone, head, image, mpp=0.5, tiling=TILING))
    np.testing.assert_allclose(mem.probs.sum(0), 1, atol=1e-4)
    assert not np.allclose(mem.probs, plain.probs)  # the variants were really run
    # on one unpadded tile, the flipped image's TTA prediction is the flip of the image's (the set of variants is
    # closed under flips; a larger image's tile grid and padding are not symmetric)
    one = image[:96, :96].copy()
    a, _ = run(predict(backbone, head, one, mpp=0.5, tiling=tiling, instances=True))
    b, _ = run(predict(backbone, head, one[:, ::-1].copy(), mpp=0.5, tiling=tiling, instances=True))
    np.testing.assert_allclose(b.probs[:, :, ::-1], a.probs, atol=1e-5)
    np.testing.assert_allclose(-b.hv[0, :, ::-1], a.hv[0], atol=1e-5)
    np.testing.assert_allclose(b.hv[1, :, ::-1], a.hv[1], atol=1e-5)
    run(predict_large(backbone, head, image, out_dir=tmp_path / "t.zarr", mpp=0.5, tiling=tiling))
    root = zarr.open_group(str(tmp_path / "t.zarr"), mode="r")
    assert (root["semantic"][:] == mem.semantic).mean() > 0.999
    # with a calibrated smoothing of the class decision, the variants of its smoothed map are averaged alike
    smooth = dataclasses.replace(head, provenance={"calibrated_smoothing_um": 2.0, "calibrated_threshold": 0.5})
    sm, _ = run(predict(backbone, smooth, image, mpp=0.5, tiling=tiling))
    run(predict_large(backbone, smooth, image, out_dir=tmp_path / "ts.zarr", mpp=0.5, tiling=tiling))
    assert (zarr.open_group(str(tmp_path / "ts.zarr"), mode="r")["semantic"][:] == sm.semantic).mean() > 0.999
    np.testing.assert_allclose(sm.probs, mem.probs, atol=1e-6)  # the probabilities are not smoothed


def test_blend_np_gates_the_hover_branch_by_the_adapted_foreground():
    fg = torch.zeros(1, 1, 20, 20)
    fg[..., 2:8, 2:8] = 0.8  # the adapted head's nucleus
    hover = torch.zeros(1, 1, 20, 20)
    hover[..., 3:9, 3:9] = 1.0  # the branch sees it, sharper and shifted by a pixel...
    hover[..., 14:18, 14:18] = 1.0  # ...and a nucleus the adapted head rejects (another class, say)
    out = inference.blend_np(fg, hover, 0.75, gate_px=1)
    assert float(out[..., 14:18, 14:18].max()) == 0.0  # gated out: far from any adapted foreground
    # inside, the branch is capped by the adapted foreground's local maximum (0.8): it cannot outvote the head
    assert torch.allclose(out[..., 4:7, 4:7], torch.tensor(0.75 * 0.8 + 0.25 * 0.8))
    # a pixel the branch sees and the head misses, within the gate of the head's nucleus: the branch counts
    assert float(out[..., 8, 8]) == pytest.approx(0.75 * 0.8)
    ungated = inference.blend_np(fg, hover, 0.75, gate_px=0)
    assert float(ungated[..., 15, 15]) == pytest.approx(0.75)
    assert torch.equal(inference.blend_np(fg, hover, 0.0, gate_px=1), fg)


def test_np_sources_blend_between_adapted_and_hover(backbone, head, image):
    def np_map(source, weight=0.75, gate=2.0):
        cfg = dataclasses.replace(HoVerPostConfig(), np_hover_weight=weight, np_gate_um=gate)
        return run(predict(backbone, head, image, mpp=0.5, tiling=TILING, instances=True, hover=cfg,
                           np_source=source))[0].np_prob

    adapted, hover, blend = np_map("adapted"), np_map("hover"), np_map("blend")
    np.testing.assert_allclose(np_map("blend", weight=0.0), adapted, atol=1e-5)
    np.testing.assert_allclose(np_map("blend", weight=1.0, gate=0.0), hover, atol=1e-5)
    assert not np.allclose(blend, adapted, atol=1e-3) and not np.allclose(blend, hover, atol=1e-3)
    with pytest.raises(ValueError, match="np_source"):
        run(predict(backbone, head, image, instances=True, np_source="nope"))
    with pytest.raises(ValueError, match="np_hover_weight"):
        HoVerPostConfig(np_hover_weight=1.5)
    with pytest.raises(ValueError, match="np_gate_um"):
        HoVerPostConfig(np_gate_um=-1.0)


def test_replicas_copy_the_model_for_all_but_the_last_device():
    """A single device takes the freshly built model itself (no deep copy: 20-50 ms of host time per prediction);
    with several, the others get independent copies with the same weights."""
    net = MetaHistoSegNet(ModelConfig(base_channels=4, depth=2, head_hidden=0))
    cpu = torch.device("cpu")
    assert inference._replicas(net, [cpu])[0] is net
    a, b = inference._replicas(net, [cpu, cpu])
    assert b is net and a is not net
    for (k, v), w in zip(a.state_dict().items(), net.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    next(a.parameters()).data.add_(1)
    assert not torch.equal(next(a.parameters()), next(net.parameters()))
    conv = net.backbone.encoders[0][0].weight
    (m,) = inference._replicas(net, [cpu], TilingConfig())  # the default: channels-last on a CPU
    assert m is net and conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    fresh = MetaHistoSegNet(ModelConfig(base_channels=4, depth=2, head_hidden=0))  # as module_for builds it
    (m,) = inference._replicas(fresh, [cpu], TilingConfig(channels_last="none"))
    assert m.backbone.encoders[0][0].weight.is_contiguous()


def test_to_device_moves_a_model_in_one_copy_keeping_values_and_layouts():
    """One flat host-to-device copy instead of one per tensor (on the CPU the same code runs with a no-op move):
    every weight and buffer keeps its values and memory format, and they then share one storage."""
    net = MetaHistoSegNet(ModelConfig(base_channels=4, depth=2, head_hidden=0), {"t": 2})
    net = net.to(memory_format=torch.channels_last)
    ref = {k: v.clone() for k, v in net.state_dict().items()}
    formats = {n: p.is_contiguous(memory_format=torch.channels_last) for n, p in net.named_parameters()}
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        before = net(x, "t")["seg"]
        out = inference.to_device(net, torch.device("cpu"))
        after = out(x, "t")["seg"]
    assert out is net
    assert all(torch.equal(ref[k], v) for k, v in net.state_dict().items())
    assert formats == {n: p.is_contiguous(memory_format=torch.channels_last) for n, p in net.named_parameters()}
    # the tensors that need no re-layout on the device are views of the one copied buffer
    assert len({p.untyped_storage().data_ptr() for p in net.parameters() if p.is_contiguous()}) == 1
    torch.testing.assert_close(after, before)


def test_prediction_shares_the_backbone_weights_and_never_changes_them():
    """The inference model shares the backbone's tensors (no deep copy per prediction) and keeps only the heads a
    prediction uses; a prediction in channels-last (the CPU default), with instances, and with a head that carries
    adapted decoder tensors, leaves the backbone's weights and layout exactly as they were."""
    bb = load_backbone("default")
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    nchw = {k: v.is_contiguous() for k, v in bb.model.state_dict().items()}
    head = AdaptedHead(["background", "nucleus"], initial_head(bb, 2), bb.sha256, MAMLConfig(), bb.mpp)
    m = inference._inference_model(bb, head)
    assert set(m.heads) == {"user", "hover"}
    gn = "backbone.encoders.0.1.weight"
    assert m.state_dict()[gn].data_ptr() == bb.model.state_dict()[gn].data_ptr()
    assert not any(p.requires_grad for p in m.parameters())
    dec = "backbone.decoders.3.0.weight"
    adapted = dict(head.state, **{dec: bb.model.state_dict()[dec] + 0.01})
    tile = synthetic_tile((200, 180), seed=3, mpp=0.5).image
    for h in (head, dataclasses.replace(head, state=adapted)):
        run(predict(bb, h, tile, tiling=TilingConfig(tile_px=128, halo_px=16), instances=True))
    after = bb.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert nchw == {k: v.is_contiguous() for k, v in after.items()}


def test_detect_cells_takes_the_most_probable_class_and_scales_with_the_click_radius():
    from napari_metahistoseg.inference import detect_cells

    yy, xx = np.mgrid[:80, :120]
    probs = np.zeros((3, 80, 120), np.float32)
    for (r, c), k in (((20, 20), 1), ((60, 90), 2), ((20, 80), 2)):
        probs[k] += np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * 6.0**2))
    probs[0] = np.clip(1 - probs[1:].sum(0), 0, 1)
    pts, classes, prob = detect_cells(probs)
    order = np.lexsort((pts[:, 1], pts[:, 0]))
    np.testing.assert_allclose(pts[order], [[20, 20], [20, 80], [60, 90]], atol=1)
    assert classes[order].tolist() == [1, 2, 2] and (prob > 0.4).all()
    # two larger cells 30 px apart: two at the default circle radius (12 px), one when the clicks were circles of
    # 24 px (the peak finding smooths and spaces twice as much)
    pair = np.zeros((2, 80, 120), np.float32)
    pair[1] = sum(np.exp(-((yy - 40) ** 2 + (xx - c) ** 2) / (2 * 12.0**2)) for c in (30, 60))
    pair[0] = np.clip(1 - pair[1], 0, 1)
    assert len(detect_cells(pair)[0]) == 2 and len(detect_cells(pair, radius_px=24.0)[0]) == 1
    with pytest.raises(ValueError, match="class probabilities"):
        detect_cells(probs[0])


def test_streamed_cells_match_the_in_memory_detection(backbone, head, image, tmp_path):
    """A head adapted on clicked centroids on a slide: the cells are detected window by window over the stored
    foreground map (windows of 96 px here), and match :func:`detect_cells` on the in-memory prediction."""
    from napari_metahistoseg.inference import detect_cells, read_cells
    from napari_metahistoseg.metrics import detection_scores

    mem, _ = run(predict(backbone, head, image, mpp=0.5, tiling=TILING))
    want, want_cls, _ = detect_cells(mem.probs, radius_px=6.0)
    res, events = run(predict_large(backbone, head, image, out_dir=tmp_path / "c.zarr", mpp=0.5, tiling=TILING,
                                    cells_radius_px=6.0))
    cells = [e for e in events if e["stage"] == "cells"]
    assert len(cells) == 3 * 3 and cells[-1]["done"] == cells[-1]["total"]  # 200 x 264 in 96 px windows
    assert res.points_csv == tmp_path / "c.points.csv" and res.complete
    got, got_cls, prob = read_cells(res.points_csv)
    assert res.n_cells == len(got) and len(want) > 3 and (prob >= 0.4 - 1 / 255).all()
    det = detection_scores(got, want, 2.0)
    assert det["f1"] > 0.9, det
    near = np.abs(got[:, None] - want[None]).max(-1).argmin(1)
    assert (got_cls == want_cls[near]).mean() > 0.9
