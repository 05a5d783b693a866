"""Colour inputs of an adapted head: RGB and haematoxylin/eosin optical density, standardised per image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from skimage.color import rgb2hed

from napari_metahistoseg.config import MAMLConfig, TilingConfig
from napari_metahistoseg.data.synthetic import synthetic_tile
from napari_metahistoseg.inference import predict, predict_large
from napari_metahistoseg.maml import pixel_support, run
from napari_metahistoseg.models import colour_base, colour_channels, to_tensor_image
from napari_metahistoseg.pipeline import (
    AdaptedHead,
    adapt,
    colour_check,
    colour_sigmas,
    colour_support,
    colour_window,
    image_colour_stats,
    initial_head,
    support_indices,
    support_object_um2,
)
from napari_metahistoseg.slide import open_array

SIGMAS_UM = MAMLConfig().colour_sigmas_um


@pytest.fixture(scope="module")
def backbone(small_backbone):
    return small_backbone


def test_stain_channels_are_skimage_rgb2hed():
    rgb = np.random.default_rng(0).integers(3, 256, (16, 16, 3), dtype=np.uint8)
    base = colour_base(to_tensor_image(rgb))[0].numpy()
    np.testing.assert_allclose(base[:3], rgb.transpose(2, 0, 1) / 255.0, atol=1e-6)
    # skimage scales the optical density by 1 / -log(1e-6) and clips negative stains; the stain vectors are the same
    ref = rgb2hed(rgb)[..., :2].transpose(2, 0, 1) * -np.log(1e-6)
    np.testing.assert_allclose(np.maximum(base[3:], 0), ref, rtol=1e-4, atol=1e-4)


def test_statistics_standardise_the_image_and_agree_for_arrays_and_slides():
    tile = synthetic_tile((96, 128), seed=1, mpp=0.5)
    stats = image_colour_stats(tile.image)
    assert stats.shape == (2, 5)
    every = image_colour_stats(tile.image, tissue_min_od=0.0)  # every pixel counts: the image is standardised
    z = colour_channels(to_tensor_image(tile.image), every, [0.0])[0].reshape(5, -1).double()
    np.testing.assert_allclose(z.mean(1).numpy(), 0, atol=1e-4)
    np.testing.assert_allclose(z.std(1).numpy(), 1, atol=1e-3)
    # a stain shift (the image darker and bluer) cancels in the standardised channels
    shifted = np.clip(tile.image.astype(int) * [0.8, 0.85, 0.95], 0, 255).astype(np.uint8)
    z2 = colour_channels(to_tensor_image(shifted), image_colour_stats(shifted, tissue_min_od=0.0), [0.0])[0]
    z2 = z2.reshape(5, -1)
    assert np.corrcoef(z.numpy()[3], z2.numpy()[3])[0, 1] > 0.99
    # above COLOUR_STATS_ALL_PX a slide is sampled in windows; its array and its lazy view give the same numbers
    big = np.tile(tile.image, (22, 18, 1))  # 2112 x 2304 px = 4.9 MP
    assert big.shape[0] * big.shape[1] > 4_000_000
    torch.testing.assert_close(image_colour_stats(big), image_colour_stats(open_array(big, "big")))
    torch.testing.assert_close(image_colour_stats(torch.from_numpy(big)), image_colour_stats(big))  # a GPU's way
    # glass does not count: the tile on a slide that is mostly white background has the tile's statistics
    slide = np.full((300, 400, 3), 240, np.uint8)
    slide[100:196, 150:278] = tile.image
    torch.testing.assert_close(image_colour_stats(slide), stats)
    assert not torch.allclose(image_colour_stats(slide, tissue_min_od=0.0), stats)  # counted, it would shift them
    one = image_colour_stats(tile.image[:1, :1])  # a single pixel: finite (std floored), never NaN
    assert torch.isfinite(one).all() and (one[1] > 0).all()
    with pytest.raises(ValueError, match="colour_sigmas_um"):
        MAMLConfig(colour_sigmas_um=(-1.0,))
    with pytest.raises(ValueError, match="colour_lr_scale"):
        MAMLConfig(colour_lr_scale=0.0)
    with pytest.raises(ValueError, match="colour_tissue_min_od"):
        MAMLConfig(colour_tissue_min_od=-1.0)


def test_support_pixels_and_windows_are_cut_from_the_whole_colour_map():
    tile = synthetic_tile((80, 100), seed=2, mpp=0.5)
    lab = (tile.semantic > 0).astype(np.uint8)
    lab[:10] = 255  # unknown rows are never sampled
    stats = image_colour_stats(tile.image)
    sig = [0.0, 1.0, 4.0]
    full = colour_channels(to_tensor_image(tile.image), stats, sig)
    kw = {"max_pixels": 500, "seed": 3, "stratified": True}
    want, _ = pixel_support(full, torch.from_numpy(lab)[None], 2, **kw)
    torch.testing.assert_close(colour_support(tile.image, support_indices(lab, 2, **kw), stats, sig), want)
    win = colour_window(tile.image, stats, sig, 48)  # the centre window, with 12 px of context
    torch.testing.assert_close(win.float(), full[0, :, 16:64, 26:74].half().float())


def test_adapted_heads_see_colour_and_start_from_the_meta_learned_head(backbone, tmp_path):
    tile = synthetic_tile((96, 96), seed=3, mpp=0.5)
    dense = (tile.semantic > 0).astype(np.uint8)
    classes = ["background", "nucleus"]
    plain0 = run(adapt(backbone, [tile.image], [dense], classes, cfg=MAMLConfig(steps=0, colour_features=False)))
    colour0 = run(adapt(backbone, [tile.image], [dense], classes, cfg=MAMLConfig(steps=0, colour_check=False)))
    assert colour0.colour_sigmas_um == SIGMAS_UM and not plain0.colour_sigmas_um
    w = colour0.state["heads.user.net.0.weight"]
    assert w.shape[1] == backbone.model.backbone.out_channels + 5 * len(SIGMAS_UM)
    assert not w[:, backbone.model.backbone.out_channels:].any()  # colour weights start at 0 ...
    p_plain = run(predict(backbone, plain0, tile.image)).probs
    p_colour = run(predict(backbone, colour0, tile.image)).probs
    np.testing.assert_allclose(p_colour, p_plain, atol=1e-5)  # ... so before any step it is the same head
    head = run(adapt(backbone, [tile.image], [dense], classes, cfg=MAMLConfig(steps=5, colour_check=False)))
    assert head.state["heads.user.net.0.weight"][:, backbone.model.backbone.out_channels:].abs().sum() > 0
    assert head.provenance["colour_sigmas_um"] == list(SIGMAS_UM)
    head.save(tmp_path / "h")
    back = AdaptedHead.load(tmp_path / "h", backbone)
    assert back.colour_sigmas_um == SIGMAS_UM
    np.testing.assert_array_equal(run(predict(backbone, back, tile.image)).semantic,
                                  run(predict(backbone, head, tile.image)).semantic)
    # re-adapting from a colour head keeps its colour inputs, whatever the config says
    again = run(adapt(backbone, [tile.image], [dense], classes, cfg=MAMLConfig(steps=2, colour_features=False),
                      init=head))
    assert again.colour_sigmas_um == SIGMAS_UM
    with pytest.raises(ValueError, match="head mode only"):
        run(adapt(backbone, [tile.image], [dense], classes, cfg=MAMLConfig(steps=1, adapt="decoder"), init=head))
    assert not run(adapt(backbone, [tile.image], [dense], classes,
                         cfg=MAMLConfig(steps=1, adapt="decoder"))).colour_sigmas_um  # decoder mode: features only


def test_colour_heads_predict_the_same_streamed_and_in_memory(backbone, tmp_path):
    tile = synthetic_tile((112, 136), seed=4, mpp=0.5)
    dense = (tile.semantic > 0).astype(np.uint8)
    head = run(adapt(backbone, [tile.image], [dense], ["background", "nucleus"],
                     cfg=MAMLConfig(steps=5, calibrate_smoothing=False, colour_check=False)))
    assert head.colour_sigmas_um
    # each tile computes its colour inputs from its own pixels with the image's statistics (3 sigma = 12 px is
    # within the halo; test_support_pixels_and_windows_are_cut_from_the_whole_colour_map checks the cut itself)
    tiled = run(predict(backbone, head, tile.image, tiling=TilingConfig(tile_px=64, halo_px=16)))
    store = run(predict_large(backbone, head, tile.image, out_dir=tmp_path / "c.zarr",
                              tiling=TilingConfig(tile_px=64, halo_px=16)))
    assert np.array_equal(zarr.open_group(str(store.store), mode="r")["semantic"][:], tiled.semantic)


def _init(backbone):
    return {k.split("heads.user.")[1]: v for k, v in initial_head(backbone, 2).items()}


def test_the_cross_check_keeps_colour_where_it_helps_and_drops_it_where_it_does_not(backbone):
    g = torch.Generator().manual_seed(0)
    n_feat, n = backbone.model.backbone.out_channels, 4000
    fold = (torch.arange(n) % 2).long()
    cfg = MAMLConfig(steps=20)
    # the classes are a colour property the features do not show
    x = torch.randn(n, n_feat + 20, generator=g)
    y = (x[:, n_feat + 3] > 0).long()
    got = colour_check(backbone, x, y, fold, 2, _init(backbone), cfg, True)
    assert got["colour"] > got["features"] + 0.2
    # the features show the classes, the colour channels are loud noise: colour does not win
    x = torch.cat([torch.randn(n, n_feat, generator=g), 5 * torch.randn(n, 20, generator=g)], 1)
    y = (x[:, 0] > 0).long()
    got = colour_check(backbone, x, y, fold, 2, _init(backbone), cfg, True)
    assert got["colour"] <= got["features"]
    # a fold without both classes: nothing to check on (and adaptation then keeps the features only)
    y = torch.where(fold == 0, 0, y)
    assert colour_check(backbone, x, y, fold, 2, _init(backbone), cfg, True) is None


def test_adapt_records_the_cross_check(backbone):
    tile = synthetic_tile((96, 96), seed=5, mpp=0.5)
    dense = (tile.semantic > 0).astype(np.uint8)
    head = run(adapt(backbone, [tile.image], [dense], ["background", "nucleus"], cfg=MAMLConfig(steps=5)))
    check = head.provenance["colour_check_miou"]
    assert set(check) == {"features", "colour"}
    kept = check["colour"] - check["features"] >= MAMLConfig().colour_min_gain
    assert bool(head.colour_sigmas_um) == kept
    n_in = head.state["heads.user.net.0.weight"].shape[1]
    assert n_in == backbone.model.backbone.out_channels + (5 * len(SIGMAS_UM) if kept else 0)
    # a gain no check can reach drops the colour inputs; no check keeps them
    assert not run(adapt(backbone, [tile.image], [dense], ["background", "nucleus"],
                         cfg=MAMLConfig(steps=5, colour_min_gain=1.0))).colour_sigmas_um
    unchecked = run(adapt(backbone, [tile.image], [dense], ["background", "nucleus"],
                          cfg=MAMLConfig(steps=5, colour_check=False)))
    assert unchecked.colour_sigmas_um and unchecked.provenance["colour_check_miou"] is None
    with pytest.raises(ValueError, match="colour_min_gain"):
        MAMLConfig(colour_min_gain=2.0)
    # nuclei only in the left half of the one support image: the right fold has no nuclei, nothing to check on,
    # so the head keeps the features only
    left = np.where(np.arange(96)[None, :] < 40, dense, 0).astype(np.uint8)
    head = run(adapt(backbone, [tile.image], [left], ["background", "nucleus"], cfg=MAMLConfig(steps=2)))
    assert head.provenance["colour_check_miou"] is None and not head.colour_sigmas_um


def test_colour_inputs_are_for_cell_sized_objects(backbone):
    lab = np.zeros((120, 120), np.uint8)
    lab[10:20, 10:20] = 1  # two 10 x 10 px cells and one 100 x 4 px strip, at 0.5 µm/px: 25, 25 and 100 µm²
    lab[40:50, 40:50] = 1
    lab[100:104, 10:110] = 1
    lab[60:70] = 255  # unknown pixels are not objects
    assert support_object_um2([lab], 0.5) == pytest.approx(25.0)
    assert support_object_um2([np.where(lab == 1, 0, lab)], 0.5) is None  # background only: no objects
    cfg = MAMLConfig()
    assert colour_sigmas(cfg, [lab], 0.5) == (SIGMAS_UM, pytest.approx(25.0))
    gland = np.zeros((200, 200), np.uint8)
    gland[20:120, 30:150] = 1  # 100 x 120 px = 3000 µm²: a gland
    assert colour_sigmas(cfg, [gland], 0.5)[0] == ()
    assert colour_sigmas(MAMLConfig(colour_features=False), [lab], 0.5)[0] == ()
    assert colour_sigmas(MAMLConfig(adapt="decoder"), [lab], 0.5)[0] == ()
    with pytest.raises(ValueError, match="colour_max_object_um2"):
        MAMLConfig(colour_max_object_um2=0.0)
    # adapt: a gland-sized support gets a features-only head, and its object size is recorded
    tile = synthetic_tile((96, 96), seed=6, mpp=0.5)
    big = np.zeros((96, 96), np.uint8)
    big[10:80, 10:80] = 1
    head = run(adapt(backbone, [tile.image], [big], ["background", "gland"], cfg=MAMLConfig(steps=2)))
    assert not head.colour_sigmas_um and head.provenance["support_object_um2"] == pytest.approx(1225.0)


def test_colour_head_builds_an_unadapted_head_with_colour_inputs(backbone):
    from napari_metahistoseg.pipeline import colour_head

    n_feat = backbone.model.backbone.out_channels
    plain = colour_head(backbone, ["a", "b", "c"])
    first = plain.state["heads.user.net.0.weight"]
    assert plain.colour_sigmas_um == MAMLConfig().colour_sigmas_um and first.shape[1] == n_feat + 5 * 4
    assert torch.count_nonzero(first[:, n_feat:]) == 0  # without noise: the meta-learned head itself
    noisy = colour_head(backbone, ["a", "b", "c"], noise=0.05)
    assert torch.count_nonzero(noisy.state["heads.user.net.0.weight"][:, n_feat:]) > 0
    img = synthetic_tile((64, 80), seed=0).image
    pred = run(predict(backbone, noisy, img, tiling=TilingConfig(tile_px=64, halo_px=8)))
    assert pred.probs.shape == (3, 64, 80)
