"""Tiling: the grid covers the image, blending is exact for pixel-wise models, no seams with the real network,
band blending equals in-memory blending, and instance stitching keeps every nucleus exactly once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_metahistoseg.config import HoVerPostConfig, ModelConfig, TilingConfig
from napari_metahistoseg.data.synthetic import synthetic_tile
from napari_metahistoseg.models import MetaHistoSegNet
from napari_metahistoseg.postprocess import HoVerPostProcessor, hv_targets, instance_table
from napari_metahistoseg.tiling import (
    BandBlender,
    InstanceStitcher,
    TileRunner,
    blend_device,
    blend_window,
    blend_window_t,
    image_tiling,
    predict_tiled,
    tile_grid,
)

CPU = [torch.device("cpu")]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a small shared machine two OpenMP threads spin against other processes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(gen):
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


# ------------------------------------------------------------------------------------------ grid and weights


@pytest.mark.parametrize("shape", [(1, 1), (50, 700), (128, 128), (129, 257), (300, 417), (64, 1000)])
@pytest.mark.parametrize("tile,halo,multiple", [(128, 32, 1), (64, 0, 1), (100, 17, 1), (128, 32, 16)])
def test_tile_grid_covers_image_exactly(shape, tile, halo, multiple):
    tiles = tile_grid(shape, tile, halo, multiple)
    cover = np.zeros(shape, np.int32)
    sizes = {(r1 - r0, c1 - c0) for r0, c0, r1, c1 in tiles}
    assert len(sizes) == 1  # one tile size: whole batches
    (th, tw), = sizes
    assert th == shape[0] if shape[0] <= tile else 2 * halo < th <= tile
    assert tw == shape[1] if shape[1] <= tile else 2 * halo < tw <= tile
    for r0, c0, r1, c1 in tiles:
        assert 0 <= r0 < r1 <= shape[0] and 0 <= c0 < c1 <= shape[1]
        cover[r0:r1, c0:c1] += 1
    assert cover.min() >= 1
    for axis in (0, 1):  # neighbours overlap by at least 2*halo
        starts = sorted({t[axis] for t in tiles})
        assert all(b - a <= tile - 2 * halo for a, b in zip(starts, starts[1:], strict=False))
    assert len(set(tiles)) == len(tiles)


def test_tile_grid_is_balanced():
    """1024 px with tiles of at most 512 and a 32 px halo needs 3 tiles per axis: 384 px each, not 512."""
    tiles = tile_grid((1024, 1024), 512, 32, 16)
    assert len(tiles) == 9 and {t[2] - t[0] for t in tiles} == {384}
    assert len(tile_grid((20000, 512), 512, 32, 16)) == 45


def test_tile_grid_rejects_halo_too_large():
    with pytest.raises(ValueError, match="twice the halo"):
        tile_grid((100, 100), 64, 32)


@pytest.mark.parametrize("shape", [(128, 128), (300, 417), (40, 90)])
def test_blend_weights_positive_everywhere(shape):
    wsum = np.zeros(shape, np.float64)
    for r0, c0, r1, c1 in tile_grid(shape, 128, 32):
        win = blend_window(r1 - r0, c1 - c0, 32, (r0 == 0, r1 == shape[0], c0 == 0, c1 == shape[1]))
        assert win.min() > 0 and win.max() <= 1
        wsum[r0:r1, c0:c1] += win
    assert wsum.min() > 0.5  # ramps of overlapping neighbours add up to about 1


@pytest.mark.parametrize("th,tw,halo", [(880, 880, 32), (512, 384, 32), (100, 37, 32), (7, 9, 4), (64, 64, 0)])
def test_blend_windows_are_the_cosine_ramp(th, tw, halo):
    """The blend window (made on the device for the GPU path: no host-to-device copy, which would wait for the
    queued forwards) is the outer product of cosine ramps 0.5 - 0.5 cos(pi (i + 0.5) / k), k = min(halo, n // 2),
    on the sides that touch another tile, in float32; the host window is the same array."""

    def ramp(n, lo_border, hi_border):
        w = np.ones(n, np.float32)
        k = min(halo, n // 2)
        if k:
            r = (0.5 - 0.5 * np.cos(np.pi * (np.arange(k) + 0.5) / k)).astype(np.float32)
            w[:k] = w[:k] if lo_border else r
            w[n - k:] = w[n - k:] if hi_border else r[::-1]
        return w

    for edges in [(False,) * 4, (True, False, True, False), (True,) * 4, (False, True, False, True)]:
        ref = np.outer(ramp(th, *edges[:2]), ramp(tw, *edges[2:]))
        t = blend_window_t(th, tw, halo, edges, torch.device("cpu"))
        assert t.dtype == torch.float32 and t.device.type == "cpu"
        np.testing.assert_array_equal(t.numpy(), ref)
        np.testing.assert_array_equal(blend_window(th, tw, halo, edges), ref)


def test_compile_applies_to_cuda_forwards_only(monkeypatch):
    """TilingConfig.compile compiles the forwards of CUDA devices; a CPU's forward stays eager (slower compiled)."""
    import napari_metahistoseg.tiling as tiling_mod

    monkeypatch.setattr(tiling_mod, "compiled", lambda f: ("compiled", f))
    f, g = (lambda x: {}), (lambda x: {})
    devs = [torch.device("cuda", 0), torch.device("cpu")]
    on = TileRunner([f, g], devs, TilingConfig(compile=True), {"y": 1})
    assert on.forwards == [("compiled", f), g]
    off = TileRunner([f, g], devs, TilingConfig(), {"y": 1})
    assert off.forwards == [f, g]


def test_channels_last_setting_per_device():
    """NHWC on CPUs only by default (GPUs: NCHW, faster with GroupNorm's CUDA path); booleans of older configs."""
    cfg = TilingConfig()
    assert cfg.channels_last == "cpu" and cfg.channels_last_on("cpu") and cfg.channels_last_on(torch.device("cpu"))
    assert not cfg.channels_last_on(torch.device("cuda", 0)) and not cfg.channels_last_on("cuda:1")
    assert TilingConfig(channels_last=True).channels_last == "all"
    assert TilingConfig(channels_last="all").channels_last_on("cuda:0")
    assert TilingConfig(channels_last=False).channels_last == "none"
    assert not TilingConfig(channels_last="none").channels_last_on("cpu")
    with pytest.raises(ValueError, match="channels_last"):
        TilingConfig(channels_last="gpu")


def test_image_tiling_scales_tile_and_halo():
    cfg = TilingConfig(tile_px=512, halo_px=32)
    assert image_tiling(cfg, 1.0) == (512, 32, 16)
    assert image_tiling(cfg, 0.5) == (1024, 64, 32)  # a 0.25 µm/px image for a 0.5 µm/px model
    assert image_tiling(cfg, 2.0) == (256, 16, 8)


# ------------------------------------------------------------------------------------------ blending exactness


def _conv1x1() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Conv2d(3, 4, 1).eval()


def test_predict_tiled_is_exact_for_pixelwise_model():
    net = _conv1x1()
    img = (np.random.default_rng(0).random((200, 333, 3)) * 255).astype(np.uint8)
    cfg = TilingConfig(tile_px=64, halo_px=16, batch_size=3, cpu_batch_size=3, channels_last=False)
    out = run(predict_tiled(lambda x: {"y": net(x)}, img, cfg=cfg, devices=CPU, channels={"y": 4}))["y"]
    with torch.inference_mode():
        ref = net(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255)[0].numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_predict_tiled_splits_batches_across_a_device_set():
    net = _conv1x1()
    img = (np.random.default_rng(1).random((150, 150, 3)) * 255).astype(np.uint8)
    cfg = TilingConfig(tile_px=64, halo_px=8, batch_size=2, cpu_batch_size=2, channels_last=False)
    seen = []

    def fwd(tag):
        return lambda x: (seen.append((tag, x.shape[0])), {"y": net(x)})[1]

    out = run(predict_tiled(None, img, cfg=cfg, devices=CPU * 2, channels={"y": 4}, forwards=[fwd(0), fwd(1)]))
    one = run(predict_tiled(lambda x: {"y": net(x)}, img, cfg=cfg, devices=CPU, channels={"y": 4}))
    assert {t for t, _ in seen} == {0, 1}
    np.testing.assert_allclose(out["y"], one["y"], atol=1e-6)


def test_blending_on_the_device_equals_host_blending(monkeypatch):
    """The GPU path (tiles blended in device tensors, maps fetched once) on the CPU: same maps as host blending,
    also with a device set whose tiles are gathered onto the first device."""
    import napari_metahistoseg.tiling as tiling_mod

    net = _conv1x1()
    img = (np.random.default_rng(2).random((170, 230, 3)) * 255).astype(np.uint8)
    cfg = TilingConfig(tile_px=64, halo_px=12, batch_size=3, cpu_batch_size=3, channels_last=False)
    acts = {"y": lambda t: t.softmax(1)}
    host = run(predict_tiled(lambda x: {"y": net(x)}, img, cfg=cfg, devices=CPU, channels={"y": 4},
                             activations=acts))["y"]
    seen = []
    monkeypatch.setattr(tiling_mod, "blend_device", lambda c, d, shape, ch: seen.append(shape) or torch.device("cpu"))
    for devs in (CPU, CPU * 2):
        dev = run(predict_tiled(lambda x: {"y": net(x)}, img, cfg=cfg, devices=devs, channels={"y": 4},
                                activations=acts))["y"]
        assert isinstance(dev, np.ndarray) and dev.dtype == np.float32
        np.testing.assert_allclose(dev, host, atol=1e-6)
    assert seen == [(170, 230)] * 2


def test_blend_device_leaves_half_of_the_free_gpu_memory(monkeypatch):
    import napari_metahistoseg.tiling as tiling_mod

    cuda, cfg = [torch.device("cuda", 0)], TilingConfig(device_blend_max_mb=64)
    monkeypatch.setattr(tiling_mod, "_free_mb", lambda dev: 40.0)
    assert blend_device(cfg, cuda, (1024, 1024), 3) == cuda[0]  # 16 MB <= 20
    monkeypatch.setattr(tiling_mod, "_free_mb", lambda dev: 20.0)
    assert blend_device(cfg, cuda, (1024, 1024), 3) is None  # 16 MB > 10


def test_blend_device_picks_a_gpu_only_when_its_accumulators_fit():
    cfg = TilingConfig(device_blend_max_mb=64)
    cuda = [torch.device("cuda", 0)]
    assert blend_device(cfg, CPU, (4096, 4096), 2) is None  # never on a CPU-first set
    assert blend_device(cfg, [torch.device("mps")], (64, 64), 2) is None  # MPS keeps the host path
    assert blend_device(cfg, cuda + CPU, (1024, 1024), 3) == torch.device("cuda", 0)  # 16 MB
    assert blend_device(cfg, cuda, (4096, 4096), 3) is None  # 256 MB > 64 MB: host memory
    assert blend_device(TilingConfig(device_blend_max_mb=0), cuda, (64, 64), 1) is None
    assert blend_device(cfg, cuda, (1024, 1024), 3, extra_mb=60) is None  # 16 + 60 MB > 64 MB
    with pytest.raises(ValueError, match="device_blend_max_mb"):
        TilingConfig(device_blend_max_mb=-1)


def test_tile_runner_resamples_to_model_size_and_back():
    seen = []
    runner = TileRunner([lambda x: (seen.append(tuple(x.shape[-2:])), {"y": x[:, :1]})[1]], CPU,
                        TilingConfig(channels_last=False), {"y": 1})
    crops = np.full((2, 64, 80, 3), 128, np.uint8)
    out = runner(crops, (32, 40))
    assert seen == [(32, 40)] and out["y"].shape == (2, 1, 64, 80)
    np.testing.assert_allclose(out["y"], 128 / 255, atol=1e-5)


# ------------------------------------------------------------------------------------------ no seams


def test_no_seams_tiled_equals_single_pass_with_tiny_backbone():
    """Tile 128 / halo 32 vs one pass over the whole 320x352 image with a random GroupNorm U-Net.

    Tolerance: GroupNorm normalises with statistics of whatever it is given, i.e. of each tile instead of the whole
    image, so the tiled probabilities differ smoothly from the single pass everywhere (measured with three seeds:
    mean |diff| 0.007-0.015, 99th percentile 0.04-0.07, max 0.11-0.16). We require mean < 0.03, p99 < 0.12 and
    no seams: across tile borders and overlap centres, the tiled map changes between neighbouring pixels no more
    than the single-pass map does (+0.005).
    """
    torch.manual_seed(0)
    net = MetaHistoSegNet(ModelConfig(base_channels=8, depth=3), {"user": 2}).eval()
    img = synthetic_tile((320, 352), seed=0).image
    cfg = TilingConfig(tile_px=128, halo_px=32, channels_last=False)
    tiled = run(predict_tiled(lambda x: net(x, "user"), img, cfg=cfg, devices=CPU, channels={"seg": 2},
                              activations={"seg": lambda t: t.softmax(1)}))["seg"][1]
    with torch.inference_mode():
        full = net(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255, "user")["seg"].softmax(1)[0, 1]
    full = full.numpy()
    diff = np.abs(tiled - full)
    assert diff.mean() < 0.03 and np.percentile(diff, 99) < 0.12
    cols = sorted({c for t in tile_grid(img.shape[:2], 128, 32, 16) for c in (t[1], t[3])} - {0, img.shape[1]})
    cols += [(a + b) // 2 for a, b in zip(cols, cols[1:], strict=False)]
    rows = sorted({r for t in tile_grid(img.shape[:2], 128, 32, 16) for r in (t[0], t[2])} - {0, img.shape[0]})
    rows += [(a + b) // 2 for a, b in zip(rows, rows[1:], strict=False)]
    for axis, lines in ((1, cols), (0, rows)):
        jt = np.abs(np.diff(tiled, axis=axis)).take([c - 1 for c in lines], axis=axis)
        jf = np.abs(np.diff(full, axis=axis)).take([c - 1 for c in lines], axis=axis)
        assert jt.mean() <= jf.mean() + 0.005


def test_band_blender_matches_in_memory_blending():
    rng = np.random.default_rng(3)
    shape, tile, halo = (150, 170), 64, 16
    tiles = tile_grid(shape, tile, halo)
    maps = {t: rng.random((2, t[2] - t[0], t[3] - t[1])).astype(np.float32) for t in tiles}
    acc, wsum = np.zeros((2, *shape), np.float32), np.zeros(shape, np.float32)
    band = BandBlender(shape[1], tile, {"y": 2})
    out = np.zeros((2, *shape), np.float32)
    starts = sorted({t[0] for t in tiles})
    for k, s in enumerate(starts):
        for t in (t for t in tiles if t[0] == s):
            r0, c0, r1, c1 = t
            win = blend_window(r1 - r0, c1 - c0, halo, (r0 == 0, r1 == shape[0], c0 == 0, c1 == shape[1]))
            acc[:, r0:r1, c0:c1] += maps[t] * win
            wsum[r0:r1, c0:c1] += win
            band.add({"y": maps[t]}, win, r0, c0)
        top = band.top
        until = starts[k + 1] if k + 1 < len(starts) else shape[0]
        out[:, top:until] = band.release(until)["y"]
    np.testing.assert_allclose(out, acc / wsum, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ instance stitching


def _discs(shape, centres, radius):
    inst = np.zeros(shape, np.uint32)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    for i, (r, c) in enumerate(centres, start=1):
        inst[(yy - r) ** 2 + (xx - c) ** 2 <= radius**2] = i
    return inst


def _stitch(np_prob, hv, core, margin, mpp=0.5):
    post = HoVerPostProcessor(HoVerPostConfig())
    out = np.zeros(np_prob.shape, np.uint32)
    tables = []

    def segment(r0, c0, r1, c1):
        return post(np_prob[r0:r1, c0:c1], hv[:, r0:r1, c0:c1], mpp)

    def write(r0, block):
        assert not out[r0:r0 + block.shape[0]].any()  # each row is written once
        out[r0:r0 + block.shape[0]] = block

    st = InstanceStitcher(np_prob.shape, core=core, margin=margin, segment=segment, write=write, emit=tables.append)
    for rows in range(0, np_prob.shape[0] + 1, 7):  # rows become available band by band
        list(st.advance(rows))
    list(st.advance(np_prob.shape[0]))
    assert st.finished
    return out, tables, st


def test_instance_stitching_keeps_each_disc_once_across_window_borders():
    shape, core = (200, 260), 64
    # discs centred on and next to window-core borders (multiples of 64), corners included, plus free ones
    centres = [(64, 64), (64, 150), (128, 20), (128, 128), (63, 200), (192, 64), (30, 128), (100, 250),
               (160, 190), (20, 30), (180, 240)]
    truth = _discs(shape, centres, 7)
    np_prob = np.where(truth > 0, 0.95, 0.02).astype(np.float32)
    hv = hv_targets(truth)
    out, tables, st = _stitch(np_prob, hv, core, margin=20)
    assert st.n_instances == len(centres) == len(np.unique(out)) - 1
    for i in range(1, len(centres) + 1):
        ids, counts = np.unique(out[truth == i], return_counts=True)
        assert len(ids) == 1 and ids[0] > 0, f"disc {i} is cut into {ids}"
        assert counts[0] == (truth == i).sum() and (out == ids[0]).sum() == counts[0]  # whole, nothing extra
    table_ids = np.concatenate([t["id"] for t in tables])
    assert sorted(table_ids.tolist()) == list(range(1, len(centres) + 1))
    cy = np.concatenate([t["centroid_row"] for t in tables])
    cx = np.concatenate([t["centroid_col"] for t in tables])
    found = sorted(zip(np.rint(cy).astype(int).tolist(), np.rint(cx).astype(int).tolist(), strict=False))
    assert found == sorted(centres)


def _matched(truth, pred, iou=0.5):
    """Objects of ``truth`` with a ``pred`` object of IoU >= ``iou``."""
    n = 0
    for i in range(1, int(truth.max()) + 1):
        m = truth == i
        ids, counts = np.unique(pred[m], return_counts=True)
        j = ids[counts.argmax()]
        n += bool(j) and (m & (pred == j)).sum() / (m | (pred == j)).sum() >= iou
    return n


def test_instance_stitching_of_touching_nuclei_is_as_good_as_one_pass():
    """Clusters of touching nuclei across window borders. hover_net's edge map min-max normalises the Sobel
    gradients over whatever it is given, so a window's split of a cluster can differ from the whole image's by a few
    pixels or nuclei; stitched instances must still match the truth as well as a single pass does (within 2)."""
    tile = synthetic_tile((256, 256), seed=4, mpp=0.5, cluster_fraction=0.6)
    truth = tile.instances
    np_prob = np.where(truth > 0, 0.9, 0.05).astype(np.float32)
    hv = hv_targets(truth)
    whole, _ = HoVerPostProcessor(HoVerPostConfig())(np_prob, hv, 0.5)
    stitched, tables, st = _stitch(np_prob, hv, core=80, margin=24)
    assert abs(st.n_instances - int(whole.max())) <= 2
    assert _matched(truth, stitched) >= _matched(truth, whole) - 2
    assert ((whole > 0) == (stitched > 0)).mean() > 0.999  # the same nuclear pixels
    assert len(np.unique(stitched)) - 1 == st.n_instances == sum(len(t["id"]) for t in tables)


def test_instance_stitcher_table_matches_the_pasted_pixels():
    """Two windows side by side (cores at columns 0 and 40): the left one keeps discs A and D, the right one B,
    which overlaps A, and C, which lies inside D. B keeps only its free pixels, C none: the table describes the
    pixels written (C is dropped), not the windows' own segmentation."""
    shape = (40, 80)
    own = {0: [((20, 36), 8), ((5, 38), 5)], 30: [((20, 46), 8), ((5, 41), 2)]}  # window column -> discs

    def segment(r0, c0, r1, c1):
        inst = np.zeros(shape, np.uint32)
        yy, xx = np.mgrid[:shape[0], :shape[1]]
        for i, ((r, c), rad) in enumerate(own[c0], start=1):
            inst[(yy - r) ** 2 + (xx - c) ** 2 <= rad**2] = i
        crop = inst[r0:r1, c0:c1]
        return crop, instance_table(crop)

    out = np.zeros(shape, np.uint32)
    tables = []
    st = InstanceStitcher(shape, core=40, margin=10, segment=segment,
                          write=lambda r0, block: out.__setitem__(slice(r0, r0 + block.shape[0]), block),
                          emit=tables.append)
    list(st.advance(shape[0]))
    table = {k: np.concatenate([t[k] for t in tables]) for k in ("id", "area_px", "bbox", "centroid_row",
                                                                  "centroid_col")}
    assert st.n_instances == 3 and sorted(table["id"].tolist()) == [1, 2, 3] == np.unique(out[out > 0]).tolist()
    b = table["id"][np.argmin(np.abs(table["centroid_col"] - 47))]
    assert 0 < np.count_nonzero(out == b) < np.count_nonzero(segment(0, 30, 40, 80)[0] == 1)  # B lost pixels
    ref = instance_table(out)
    order = np.argsort(table["id"])
    for k in ("id", "area_px", "bbox"):
        np.testing.assert_array_equal(table[k][order], ref[k])
    for k in ("centroid_row", "centroid_col"):
        np.testing.assert_allclose(table[k][order], ref[k])
    contours = [c for t in tables for c in t["contour"]]  # image coordinates, the outline of what was written
    for i, j in enumerate(order):
        np.testing.assert_allclose(contours[j], ref["contour"][i])


def test_instance_stitcher_rejects_bad_windows():
    with pytest.raises(ValueError, match="core > 0"):
        InstanceStitcher((10, 10), core=0, margin=2, segment=None, write=None, emit=None)


def test_cpu_batch_size_applies_only_to_cpu_device_sets():
    cfg = TilingConfig(batch_size=4, cpu_batch_size=1)
    assert cfg.batch_for([torch.device("cpu")]) == 1 and cfg.batch_for(["cpu", "cpu"]) == 1
    assert cfg.batch_for([torch.device("cuda", 0)]) == 4 and cfg.batch_for(["cuda:0", "cuda:1"]) == 4
    assert TilingConfig(batch_size=2, cpu_batch_size=8).batch_for(["cpu"]) == 2  # the OOM fallback caps it
    with pytest.raises(ValueError):
        TilingConfig(cpu_batch_size=0)


def test_upload_takes_read_only_arrays_without_a_warning():
    """In fresh interpreters with warnings as errors: torch warns about non-writable arrays only once per process,
    so an earlier test could have used the warning up. The control (a plain ``torch.from_numpy``) must fail."""
    import subprocess
    import sys

    setup = ("import numpy as np, torch\nfrom napari_metahistoseg.tiling import upload\n"
             "a = np.arange(24, dtype=np.uint8).reshape(2, 4, 3); a.setflags(write=False)\n")
    ours = setup + "t = upload(a, torch.device('cpu'))\nassert t.dtype == torch.uint8 and t.tolist() == a.tolist()\n"
    control = setup + "torch.from_numpy(a)\n"
    run = [sys.executable, "-W", "error::UserWarning", "-c"]
    assert subprocess.run(run + [ours], capture_output=True, text=True).returncode == 0
    res = subprocess.run(run + [control], capture_output=True, text=True)
    assert res.returncode != 0 and "not writable" in res.stderr
