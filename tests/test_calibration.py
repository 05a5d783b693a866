"""Threshold calibration of an adapted head: the support-optimal foreground threshold folded into the output bias."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_metahistoseg.checkpoints import save_model
from napari_metahistoseg.config import MAMLConfig, ModelConfig
from napari_metahistoseg.data.synthetic import synthetic_tile
from napari_metahistoseg.data.task import IGNORE
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


def test_the_support_optimal_threshold_becomes_the_argmax():
    head, fast = _head()
    x = torch.randn(4000, 6) * 3
    p = _p1(head, fast, x)
    cut = float(torch.quantile(p, 0.6))
    y = (p >= cut).long()  # the truth is "foreground above the 60th percentile"
    new, t = calibrate_threshold(head, fast, x, y, MAMLConfig(threshold_min=0.05, threshold_max=0.95,
                                                                 threshold_step=0.01))
    assert abs(t - cut) <= 0.011  # the grid point next to the cut
    assert set(new) == set(fast) and all(torch.equal(new[k], fast[k]) for k in fast if not k.endswith("2.bias"))
    x2 = torch.randn(4000, 6) * 3  # unseen pixels: argmax of the new head == old probability >= t
    p2 = _p1(head, fast, x2)
    argmax = head_pixel_logits(head, new, x2).argmax(1)
    away = (p2 - t).abs() > 1e-5
    assert torch.equal(argmax[away], (p2[away] >= t).long()[away])
    assert not any(v.requires_grad for v in new.values())


def test_ties_keep_the_plain_argmax():
    head, fast = _head(1)
    x = torch.randn(500, 6)
    y = (_p1(head, fast, x) >= 0.5).long()
    fast_far = dict(fast)
    fast_far["net.2.weight"] = fast["net.2.weight"] * 0  # every probability = sigmoid(bias difference)
    fast_far["net.2.bias"] = torch.tensor([3.0, -3.0])  # p1 ≈ 0.0025 everywhere: every threshold scores the same
    new, t = calibrate_threshold(head, fast_far, x, y, MAMLConfig())
    assert t == 0.5 and torch.allclose(new["net.2.bias"], fast_far["net.2.bias"])


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


def test_adapt_records_the_threshold_and_exports_it_in_the_weights(backbone, tmp_path):
    tile = synthetic_tile((96, 96), seed=3, mpp=0.5)
    dense = (tile.semantic > 0).astype(np.uint8)
    head = run(adapt(backbone, [tile.image], [dense], ["background", "nucleus"], cfg=MAMLConfig(steps=3)))
    t = head.provenance["calibrated_threshold"]
    assert t is not None and 0.2 <= t <= 0.8
    plain = run(adapt(backbone, [tile.image], [dense], ["background", "nucleus"],
                      cfg=MAMLConfig(steps=3, calibrate_threshold=False)))
    assert plain.provenance["calibrated_threshold"] is None
    bias = "heads.user.net.2.bias"
    shift = float(np.log(t / (1 - t)))
    delta = (head.state[bias] - plain.state[bias]).numpy()
    assert delta == pytest.approx([shift / 2, -shift / 2], abs=1e-5)  # the same head, only the bias moved
    head.save(tmp_path / "h")
    back = AdaptedHead.load(tmp_path / "h", backbone)
    assert torch.equal(back.state[bias], head.state[bias]) and back.provenance["calibrated_threshold"] == t
    strokes = np.full_like(dense, IGNORE)
    strokes[:8], strokes[40:48] = 0, dense[40:48]
    strokes[40:48][dense[40:48] == 0] = IGNORE
    strokes[44, 44] = 1
    sparse = run(adapt(backbone, [tile.image], [strokes], ["background", "nucleus"], cfg=MAMLConfig(steps=3)))
    assert sparse.provenance["calibrated_threshold"] is None
