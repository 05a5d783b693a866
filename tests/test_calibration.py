"""Threshold calibration of an adapted head: the support-optimal foreground threshold decides the classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from napari_metahistoseg.checkpoints import save_model
from napari_metahistoseg.config import MAMLConfig, ModelConfig, TilingConfig
from napari_metahistoseg.data.synthetic import synthetic_tile
from napari_metahistoseg.data.task import IGNORE
from napari_metahistoseg.inference import decide, predict, predict_large
from napari_metahistoseg.maml import head_pixel_logits, run
from napari_metahistoseg.models import MetaHistoSegNet, PixelHead
from napari_metahistoseg.pipeline import AdaptedHead, adapt, calibrate_threshold, calibrates, load_backbone


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
def backbone(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bb") / "bb"
    save_model(MetaHistoSegNet(ModelConfig(base_channels=8, depth=3), {"generic": 2}, hover_types=0), path,
               head_classes={"generic": ["background", "foreground"]})
    return load_backbone(str(path))


def test_adapt_records_the_threshold_and_predictions_use_it(backbone, tmp_path):
    tile = synthetic_tile((96, 96), seed=3, mpp=0.5)
    dense = (tile.semantic > 0).astype(np.uint8)
    head = run(adapt(backbone, [tile.image], [dense], ["background", "nucleus"], cfg=MAMLConfig(steps=3)))
    t = head.threshold
    assert t is not None and 0.2 <= t <= 0.8 and head.provenance["calibrated_threshold"] == t
    plain = run(adapt(backbone, [tile.image], [dense], ["background", "nucleus"],
                      cfg=MAMLConfig(steps=3, calibrate_threshold=False)))
    assert plain.threshold is None
    assert all(torch.equal(head.state[k], plain.state[k]) for k in head.state)  # the weights are the same
    pred = run(predict(backbone, head, tile.image, instances=False))
    assert np.array_equal(pred.semantic, (pred.probs[1] >= t).astype(np.uint8))
    store = run(predict_large(backbone, head, tile.image, out_dir=tmp_path / "s.zarr", instances=False,
                              tiling=TilingConfig(tile_px=64, halo_px=16)))
    assert np.array_equal(zarr.open_group(str(store.store), mode="r")["semantic"][:], pred.semantic)
    head.save(tmp_path / "h")
    back = AdaptedHead.load(tmp_path / "h", backbone)
    assert back.threshold == t  # exported heads keep it
    strokes = np.full_like(dense, IGNORE)
    strokes[:8] = 0
    strokes[44, 44] = 1
    sparse = run(adapt(backbone, [tile.image], [strokes], ["background", "nucleus"], cfg=MAMLConfig(steps=3)))
    assert sparse.threshold is None
