"""Calibration of an adapted head: the support-optimal foreground threshold and smoothing decide the classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from napari_metahistoseg.config import MAMLConfig, TilingConfig
from napari_metahistoseg.data.synthetic import synthetic_tile
from napari_metahistoseg.data.task import IGNORE
from napari_metahistoseg.inference import decide, predict, predict_large
from napari_metahistoseg.maml import head_pixel_logits, run
from napari_metahistoseg.models import PixelHead
from napari_metahistoseg.pipeline import (
    AdaptedHead,
    adapt,
    calibrate_smoothing,
    calibrate_threshold,
    calibrates,
    calibration_window,
    gaussian_smooth,
)


def _head(seed=0):
    torch.manual_seed(seed)
    head = PixelHead(6, 2, 8)
    return head, {k: v.detach().clone() for k, v in head.named_parameters()}


def _p1(head, fast, x):
    with torch.no_grad():
        return head_pixel_logits(head, fast, x).softmax(1)[:, 1]


def test_the_support_optimal_threshold_is_found():
    head, fast = _head()
    x = torch.randn(4000, 6) * 3
    p = _p1(head, fast, x)
    cut = float(torch.quantile(p, 0.6))
    y = (p >= cut).long()  # the truth is "foreground above the 60th percentile"
    t = calibrate_threshold(head, fast, x, y, MAMLConfig(threshold_min=0.05, threshold_max=0.95,
                                                         threshold_step=0.01))
    assert abs(t - cut) <= 0.011  # the grid point next to the cut
    assert decide(np.stack([1 - p.numpy(), p.numpy()]), t).tolist() == (p.numpy() >= t).tolist()


def test_ties_keep_the_plain_argmax():
    head, fast = _head(1)
    x = torch.randn(500, 6)
    y = (_p1(head, fast, x) >= 0.5).long()
    flat = dict(fast)
    flat["net.2.weight"] = fast["net.2.weight"] * 0  # every probability = sigmoid(bias difference)
    flat["net.2.bias"] = torch.tensor([3.0, -3.0])  # p1 ≈ 0.0025 everywhere: every threshold scores the same
    assert calibrate_threshold(head, flat, x, y, MAMLConfig()) == 0.5


def test_decide():
    probs = np.array([[[0.7, 0.4]], [[0.3, 0.6]]])
    assert decide(probs).tolist() == [[0, 1]]
    assert decide(probs, 0.25).tolist() == [[1, 1]] and decide(probs, 0.65).tolist() == [[0, 0]]
    three = np.array([[[0.5]], [[0.3]], [[0.2]]])
    assert decide(three, 0.1).tolist() == [[0]]  # a threshold only applies to two-class heads


def test_which_supports_calibrate():
    dense = [np.zeros((10, 10), np.uint8)]
    sparse = [np.full((10, 10), IGNORE, np.uint8)]
    sparse[0][:2] = 1
    assert calibrates(MAMLConfig(), dense, 2)
    assert not calibrates(MAMLConfig(), sparse, 2)  # strokes: the foreground share is arbitrary
    assert not calibrates(MAMLConfig(), dense, 3)  # multi-class: no single threshold
    assert not calibrates(MAMLConfig(adapt="decoder"), dense, 2)
    assert not calibrates(MAMLConfig(calibrate_threshold=False), dense, 2)
    with pytest.raises(ValueError, match="threshold_min"):
        MAMLConfig(threshold_min=0.9, threshold_max=0.5)
    with pytest.raises(ValueError, match="threshold_step"):
        MAMLConfig(threshold_step=0)


@pytest.fixture(scope="module")
def backbone(small_backbone):
    return small_backbone


def test_adapt_records_the_threshold_and_predictions_use_it(backbone, tmp_path):
    tile = synthetic_tile((96, 96), seed=3, mpp=0.5)
    dense = (tile.semantic > 0).astype(np.uint8)
    # the smoothing is tested below; here the threshold alone decides
    head = run(adapt(backbone, [tile.image], [dense], ["background", "nucleus"],
                     cfg=MAMLConfig(steps=3, calibrate_smoothing=False)))
    t = head.threshold
    assert t is not None and 0.2 <= t <= 0.8 and head.provenance["calibrated_threshold"] == t
    plain = run(adapt(backbone, [tile.image], [dense], ["background", "nucleus"],
                      cfg=MAMLConfig(steps=3, calibrate_threshold=False)))
    assert plain.threshold is None
    assert all(torch.equal(head.state[k], plain.state[k]) for k in head.state)  # the weights are the same
    tiling = TilingConfig(tile_px=64, halo_px=16)
    pred = run(predict(backbone, head, tile.image, instances=False, tiling=tiling))
    assert np.array_equal(pred.semantic, (pred.probs[1] >= t).astype(np.uint8))
    store = run(predict_large(backbone, head, tile.image, out_dir=tmp_path / "s.zarr", instances=False,
                              tiling=tiling))  # the same tiles: the same decision
    assert np.array_equal(zarr.open_group(str(store.store), mode="r")["semantic"][:], pred.semantic)
    head.save(tmp_path / "h")
    back = AdaptedHead.load(tmp_path / "h", backbone)
    assert back.threshold == t  # exported heads keep it
    strokes = np.full_like(dense, IGNORE)
    strokes[:8] = 0
    strokes[44, 44] = 1
    sparse = run(adapt(backbone, [tile.image], [strokes], ["background", "nucleus"], cfg=MAMLConfig(steps=3)))
    assert sparse.threshold is None


def test_gaussian_smooth():
    t = torch.rand(1, 2, 20, 30, generator=torch.Generator().manual_seed(0)).softmax(1)
    assert gaussian_smooth(t, 0) is t
    s = gaussian_smooth(t, 2.0)
    torch.testing.assert_close(s.sum(1), torch.ones(1, 20, 30))  # still probabilities
    torch.testing.assert_close(gaussian_smooth(t.flip(3), 2.0), s.flip(3))  # isotropic: commutes with flips
    torch.testing.assert_close(gaussian_smooth(t.transpose(2, 3), 2.0), s.transpose(2, 3))
    assert s.std() < t.std()
    delta = torch.zeros(1, 1, 41, 41)
    delta[0, 0, 20, 20] = 1
    g = gaussian_smooth(delta, 3.0)[0, 0]
    assert abs(float(g.sum()) - 1) < 1e-5 and float(g[20, 20]) == float(g.max())
    torch.testing.assert_close(g, g.t())


def _sign_head():
    """A linear two-class head whose foreground probability is sigmoid(4 * feature 0)."""
    head = PixelHead(3, 2, 0)
    w = torch.zeros(2, 3, 1, 1)
    w[1, 0], w[0, 0] = 2.0, -2.0
    return head, {"net.0.weight": w, "net.0.bias": torch.zeros(2)}


def test_smoothing_calibration_follows_the_support():
    head, fast = _sign_head()
    rr, cc = np.mgrid[:96, :96]
    blobs = (((rr % 32) - 16) ** 2 + ((cc % 32) - 16) ** 2 < 10 ** 2).astype(np.uint8)  # large round objects
    rng = np.random.default_rng(0)
    noisy = np.where(rng.random(blobs.shape) < 0.15, 1 - blobs, blobs)  # the head is wrong on 15 % of pixels
    feats = torch.zeros(3, 96, 96)
    feats[0] = torch.from_numpy(noisy * 2.0 - 1)
    cfg = MAMLConfig()
    assert calibrate_smoothing(head, fast, [calibration_window(feats, blobs, 64)], 0.5, cfg, 0.5) > 0
    # a gain below smoothing_min_gain is not enough (the support is the head's own training data)
    assert calibrate_smoothing(head, fast, [calibration_window(feats, blobs, 64)], 0.5,
                               MAMLConfig(smoothing_min_gain=1.0), 0.5) == 0.0
    stripes = ((cc // 2) % 2).astype(np.uint8)  # fine structure that the head gets exactly right
    feats[0] = torch.from_numpy(stripes * 2.0 - 1)
    assert calibrate_smoothing(head, fast, [calibration_window(feats, stripes, 64)], 0.5, cfg, 0.5) == 0.0
    assert calibrate_smoothing(head, fast, [calibration_window(feats, blobs, 64)], 0.5,
                               MAMLConfig(smoothing_um=(0.0,)), 0.5) == 0.0
    unknown = np.full_like(blobs, IGNORE)  # nothing labelled in the window: no evidence, no smoothing
    assert calibrate_smoothing(head, fast, [calibration_window(feats, unknown, 64)], 0.5, cfg, 0.5) == 0.0
    win, lab = calibration_window(feats, blobs, 64)
    assert win.shape == (3, 64, 64) and win.dtype == torch.float16 and lab.shape == (64, 64)
    assert np.array_equal(lab, blobs[16:80, 16:80])  # the centre window
    with pytest.raises(ValueError, match="smoothing_um"):
        MAMLConfig(smoothing_um=(-1.0,))
    with pytest.raises(ValueError, match="smoothing_min_gain"):
        MAMLConfig(smoothing_min_gain=-0.1)
    with pytest.raises(ValueError, match="calibration_window_px"):
        MAMLConfig(calibration_window_px=4)


def test_adapt_records_the_smoothing_and_predictions_use_it(backbone, tmp_path, caplog):
    tile = synthetic_tile((96, 96), seed=3, mpp=0.5)
    dense = (tile.semantic > 0).astype(np.uint8)
    head = run(adapt(backbone, [tile.image], [dense], ["background", "nucleus"], cfg=MAMLConfig(steps=3)))
    assert head.provenance["calibrated_smoothing_um"] in MAMLConfig().smoothing_um
    off = run(adapt(backbone, [tile.image], [dense], ["background", "nucleus"],
                    cfg=MAMLConfig(steps=3, calibrate_smoothing=False)))
    assert off.provenance["calibrated_smoothing_um"] is None and off.smoothing_um == 0.0
    # a head whose decision smooths by 2 µm: the classes follow the smoothed probabilities, which stay unsmoothed
    head.provenance.update(calibrated_smoothing_um=2.0, calibrated_threshold=0.5)
    assert head.smoothing_um == 2.0
    pred = run(predict(backbone, head, tile.image, instances=False))
    plain = run(predict(backbone, off, tile.image, instances=False))
    np.testing.assert_allclose(pred.probs, plain.probs, atol=1e-6)  # probabilities are not smoothed
    smoothed = gaussian_smooth(torch.from_numpy(pred.probs)[None], 2.0 / backbone.mpp)[0].numpy()
    inner = (slice(8, -8), slice(8, -8))  # away from the image border (each tile is smoothed at its edges)
    assert (pred.semantic[inner] == decide(smoothed, 0.5)[inner]).mean() > 0.99
    store = run(predict_large(backbone, head, tile.image, out_dir=tmp_path / "s.zarr", instances=False,
                              tiling=TilingConfig(tile_px=64, halo_px=16)))
    streamed = zarr.open_group(str(store.store), mode="r")["semantic"][:]
    tiled = run(predict(backbone, head, tile.image, instances=False, tiling=TilingConfig(tile_px=64, halo_px=16)))
    assert np.array_equal(streamed, tiled.semantic)  # same tiles, same smoothing: identical
    head.save(tmp_path / "h")
    assert AdaptedHead.load(tmp_path / "h", backbone).smoothing_um == 2.0  # exported heads keep it
    with caplog.at_level("WARNING", logger="napari_metahistoseg.inference"):  # 3 sigma = 12 px > an 8 px halo
        run(predict(backbone, head, tile.image, instances=False, tiling=TilingConfig(tile_px=64, halo_px=8)))
    assert "beyond the 8 px tile halo" in caplog.text
    three = AdaptedHead(["a", "b", "c"], {}, "x", MAMLConfig(), 0.5, {"calibrated_smoothing_um": 2.0})
    assert three.smoothing_um == 0.0  # two-class heads only
