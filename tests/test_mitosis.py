"""Mitosis patches, augmentation, classifier, few-shot adaptation and the bundled weights (fast, CPU)."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from napari_metahistoseg.config import MitosisConfig
from napari_metahistoseg.mitosis import (
    BUNDLED_WEIGHTS,
    MitosisNet,
    adapt_classifier,
    adapted_model,
    augment_support,
    classify,
    decide,
    extract_patches,
    load_mitosis_model,
    patch_side_px,
    patches_at,
    points_from_table,
    rotate_patches,
    rotations_for,
    save_mitosis_model,
    stain_jitter,
)
from napari_metahistoseg.slide import open_image

CFG = MitosisConfig()  # 32 µm patches resized to 64 px


def disc_image(shape=(200, 240), centre=(100.0, 120.0), radius=10.0) -> np.ndarray:
    """White RGB image with a dark disc (a stand-in for a nucleus)."""
    rr, cc = np.indices(shape)
    img = np.full((*shape, 3), 230, np.uint8)
    img[(rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius**2] = (40, 20, 90)
    return img


def dark_centroid_and_area(patch: np.ndarray) -> tuple[np.ndarray, int]:
    dark = patch.mean(-1) < 135
    return np.argwhere(dark).mean(0), int(dark.sum())


# ------------------------------------------------------------------------------------------ patches


def test_um_to_px():
    assert patch_side_px(0.25, CFG) == 128 and patch_side_px(0.5, CFG) == 64 and patch_side_px(0.3, CFG) == 107
    for bad in (0, -1.0, float("nan"), "0.25"):
        with pytest.raises(ValueError, match="mpp"):
            patch_side_px(bad, CFG)


def test_point_at_disc_centre_gives_centred_patch():
    img = disc_image()
    patches, padded = extract_patches(img, np.array([[100.0, 120.0], [100.4, 119.6]]), 0.25, CFG)
    assert patches.shape == (2, 64, 64, 3) and patches.dtype == np.uint8 and not padded.any()
    for p in patches:
        centre, _ = dark_centroid_and_area(p)
        np.testing.assert_allclose(centre, (31.5, 31.5), atol=1.0)  # within one output pixel of the centre


def test_physical_scale_is_matched():
    """The same 5 µm-radius disc at 0.25 and at 0.5 µm/px gives the same disc in the patch (radius 10 px)."""
    p40, _ = extract_patches(disc_image(radius=20.0), np.array([[100.0, 120.0]]), 0.25, CFG)
    p20, _ = extract_patches(disc_image(radius=10.0), np.array([[100.0, 120.0]]), 0.5, CFG)
    a40, a20 = dark_centroid_and_area(p40[0])[1], dark_centroid_and_area(p20[0])[1]
    assert abs(a40 - np.pi * 10**2) < 25 and abs(a20 - np.pi * 10**2) < 25


@pytest.mark.parametrize("mode", ["reflect", "constant", "edge"])
def test_border_points_are_padded_not_dropped(mode):
    cfg = MitosisConfig(pad_mode=mode)
    img = disc_image(centre=(5.0, 6.0))
    pts = np.array([[5.0, 6.0], [100.0, 120.0], [199.0, 239.0], [0.0, 0.0]])
    patches, padded = extract_patches(img, pts, 0.25, cfg)
    assert patches.shape == (4, 64, 64, 3)
    assert padded.tolist() == [True, False, True, True]
    assert (patches[0][30:34, 30:34].mean(-1) < 135).all()  # the point stays at the patch centre
    # the window starts at image row -59 (output row = (image row + 59) / 2): image row -14 is dark when
    # reflected (row 14 is in the disc) or edge-replicated (row 0), image row -25 only when edge-replicated
    assert (patches[0][22, 32].mean() < 135) == (mode != "constant")
    assert (patches[0][17, 32].mean() < 135) == (mode == "edge")
    if mode == "constant":  # padded with white glass, not black
        assert (patches[3][:20, :20] == 255).all()


def test_extract_patches_bad_input():
    img = disc_image()
    with pytest.raises(ValueError, match="outside"):
        extract_patches(img, np.array([[300.0, 10.0]]), 0.25, CFG)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        extract_patches(img, np.zeros((3, 3)), 0.25, CFG)
    with pytest.raises(ValueError, match="uint8"):
        extract_patches(img.astype(np.float32), np.zeros((1, 2)), 0.25, CFG)
    patches, padded = extract_patches(img, np.zeros((0, 2)), 0.25, CFG)
    assert patches.shape == (0, 64, 64, 3) and padded.shape == (0,)


@pytest.mark.parametrize("mode", ["reflect", "constant", "edge"])
def test_patches_at_reads_windows_and_matches_the_whole_image(mode):
    cfg = MitosisConfig(pad_mode=mode)
    img = disc_image(shape=(600, 700), centre=(5.0, 6.0))
    pts = np.array([[5.0, 6.0], [100.3, 119.6], [599.4, 699.0], [-0.4, 0.0], [350.0, 3.0]])
    lazy = open_image(img)
    reads = []
    read = lazy.read
    lazy.read = lambda r0, c0, r1, c1: reads.append((r1 - r0) * (c1 - c0)) or read(r0, c0, r1, c1)
    np.testing.assert_array_equal(patches_at(lazy, pts, 0.25, cfg), extract_patches(img, pts, 0.25, cfg)[0])
    assert len(reads) == len(pts) and max(reads) <= (2 * 130 + 1) ** 2 < 600 * 700  # windows, never the image
    with pytest.raises(ValueError, match=r"2 point\(s\) lie outside the 600x700 image: \(row 600\.6, col 3\), "
                                         r"\(row 3, col -0\.6\)"):
        patches_at(img, np.array([[600.6, 3.0], [50.0, 50.0], [3.0, -0.6]]), 0.25, cfg)


def test_points_from_table():
    pts = points_from_table({"centroid_row": [1.0, 2.0], "centroid_col": [3.0, 4.0]})
    np.testing.assert_array_equal(pts, [[1, 3], [2, 4]])
    with pytest.raises(ValueError, match="centroid_col"):
        points_from_table({"centroid_row": [1.0]})


# ------------------------------------------------------------------------------------------ augmentation


def test_rotation_counts():
    assert rotations_for(1, CFG) == (0.0, 45.0, 90.0) and rotations_for(0, CFG) == (0.0, 45.0)
    with pytest.raises(ValueError, match="label"):
        rotations_for(2, CFG)
    x = np.random.default_rng(0).integers(0, 255, (5, 64, 64, 3), dtype=np.uint8)
    y = np.array([1, 1, 0, 0, 0])
    xs, ys = augment_support(x, y, CFG)
    assert (ys == 1).sum() == 2 * 3 * 4 and (ys == 0).sum() == 3 * 2 * 4  # rotations x 4 flip combinations
    xs, ys = augment_support(x, y, MitosisConfig(adapt_flips=False))
    assert len(ys) == 2 * 3 + 3 * 2


def test_rotate_and_stain_jitter():
    x = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(rotate_patches(rotate_patches(x, 90), 270), x)
    assert rotate_patches(x, 45).shape == x.shape
    same = stain_jitter(x, np.random.default_rng(0), 0.0, 0.0)
    assert np.abs(same.astype(int) - x).max() <= 1  # exact round trip without jitter (x >= 1)
    moved = stain_jitter(x, np.random.default_rng(0), 0.3, 0.1)
    assert moved.shape == x.shape and moved.dtype == np.uint8 and (moved != x).any()


# ------------------------------------------------------------------------------------------ model


def test_forward_shapes():
    net = MitosisNet(CFG)
    x = torch.rand(5, 3, 64, 64)
    assert net(x).shape == (5, 2) and net.embed(x).shape == (5, CFG.channels[-1])
    probs = classify(net, (np.random.default_rng(0).random((7, 64, 64, 3)) * 255).astype(np.uint8))
    assert probs.shape == (7,) and probs.dtype == np.float32 and ((0 <= probs) & (probs <= 1)).all()
    assert decide(np.array([0.2, 0.5, 0.9]), CFG).tolist() == [False, True, True]


def _bright_dark(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = np.arange(n) % 2
    base = np.where(y[:, None, None, None] == 1, 60, 190)
    x = np.clip(base + rng.normal(0, 25, (n, 64, 64, 3)), 0, 255).astype(np.uint8)
    x[:, 24:40, 24:40] = np.where(y[:, None, None, None] == 1, 20, 230)  # a dark vs light centre
    return x, y


def test_few_shot_adaptation_easy_problem():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    fixed = MitosisConfig(normalise="fixed")  # per-patch normalisation would remove "bright vs dark"
    net = MitosisNet(fixed)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    xs, ys = _bright_dark(8, rng)
    cfg = dataclasses.replace(fixed, adapt_steps=15, adapt_lr=0.05)
    gen = adapt_classifier(net, xs, ys, cfg, devices="cpu", new_head=True)
    events = []
    try:
        while True:
            events.append(next(gen))
    except StopIteration as stop:
        state = stop.value
    assert [e["step"] for e in events] == list(range(1, 16)) and events[-1]["steps"] == 15
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # model not mutated
    xq, yq = _bright_dark(40, rng)
    acc = ((classify(adapted_model(net, state), xq) >= 0.5) == yq).mean()
    assert acc >= 0.95
    with pytest.raises(ValueError, match="positive"):
        next(adapt_classifier(net, xs[ys == 1], ys[ys == 1], cfg))
    with pytest.raises(ValueError, match="labels"):
        next(adapt_classifier(net, xs, ys + 1, cfg))


# ------------------------------------------------------------------------------------------ weights


def test_bundled_weights_load_and_classify():
    model, desc = load_mitosis_model()
    assert desc["classes"] == ["non-mitotic", "mitotic"] and BUNDLED_WEIGHTS.stat().st_size < 2_000_000
    x = (np.random.default_rng(1).random((4, model.cfg.patch_px, model.cfg.patch_px, 3)) * 255).astype(np.uint8)
    probs = classify(model, x)
    assert probs.shape == (4,) and np.isfinite(probs).all() and ((0 <= probs) & (probs <= 1)).all()


def test_save_load_roundtrip_and_corrupt_files(tmp_path):
    net = MitosisNet(MitosisConfig(channels=(4, 8)))
    path = save_mitosis_model(net, tmp_path / "m.safetensors", extra={"note": "test"})
    loaded, desc = load_mitosis_model(path)
    assert desc["note"] == "test" and all(torch.equal(v, loaded.state_dict()[k]) for k, v in net.state_dict().items())
    bad = tmp_path / "bad.safetensors"
    shutil.copy(path, bad)
    shutil.copy(tmp_path / "m.json", tmp_path / "bad.json")
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_mitosis_model(bad)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the tensor data: valid file, wrong SHA-256
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="bad.safetensors.*SHA-256"):
        load_mitosis_model(bad)
    (tmp_path / "bad.json").unlink()
    with pytest.raises(ValueError, match="bad.json"):
        load_mitosis_model(bad)


def test_blockwise_classification_equals_the_whole_image_across_block_borders():
    """A slide's candidates are classified block by block (each block read once with a patch of margin): the
    probabilities equal those of patches cut from the whole image, also for points on block borders and corners
    and at the image border."""
    from napari_metahistoseg.mitosis import classify_points_blockwise

    rng = np.random.default_rng(4)
    image = (rng.random((600, 520, 3)) * 255).astype(np.uint8)
    pts = np.array([[127.5, 127.5], [128.0, 10.0], [255.9, 256.2], [0.0, 0.0], [599.0, 519.0], [300.0, 383.6],
                    [-0.4, 200.0], *rng.uniform([0, 0], [599, 519], (20, 2))])
    torch.manual_seed(0)
    model = MitosisNet(MitosisConfig()).eval()
    reads = []

    def read(box):
        reads.append(box)
        r0, c0, r1, c1 = box
        return image[r0:r1, c0:c1]

    got = classify_points_blockwise(model, read, image.shape[:2], pts, 0.5, block_px=128)
    want = classify(model, extract_patches(image, pts, 0.5, model.cfg)[0])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert len(reads) == len({tuple(k) for k in np.floor(pts / 128).astype(int).tolist()})  # each block once
    assert all((r1 - r0) * (c1 - c0) < image.shape[0] * image.shape[1] / 2 for r0, c0, r1, c1 in reads)
