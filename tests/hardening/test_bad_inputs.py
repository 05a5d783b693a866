"""Bad input everywhere input enters: readers, CLI, checkpoints, configs, the adapt/predict pipeline.

Every bad input gets one ``ValueError`` naming the file (or the argument) and the problem; the CLI turns it into
one line on stderr with a non-zero exit and no traceback; supported odd formats (16-bit, float, greyscale,
RGBA, CMYK, multi-page) are converted by the rule documented in :mod:`napari_metahistoseg.data.io`; nothing
already written is lost when a later save fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_metahistoseg.cli import main
from napari_metahistoseg.config import MAMLConfig, TrainConfig, load_json
from napari_metahistoseg.data import Sample, open_dataset, save_unified
from napari_metahistoseg.data.io import read_mask, read_points_csv, read_rgb, to_rgb_uint8
from napari_metahistoseg.data.points import points_to_masks

from .conftest import run_gen, support

REPO = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------------------ image files


def _png(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr).save(path)
    return path


@pytest.mark.filterwarnings("ignore:The legacy `DICOM` plugin:DeprecationWarning")  # imageio probing .xyz
@pytest.mark.parametrize(
    "name, make, problem",
    [
        ("missing.png", None, "file not found"),
        ("empty.png", lambda p: p.write_bytes(b""), "empty"),
        ("folder.png", lambda p: p.mkdir(), "is a folder"),
        ("garbage.png", lambda p: p.write_bytes(b"not an image at all" * 10), "cannot read image"),
        ("garbage.tif", lambda p: p.write_bytes(b"II*\x00" + b"\xff" * 40), "cannot read image"),
        ("unknown.xyz", lambda p: p.write_bytes(b"hello"), "cannot read image"),
    ],
)
def test_unreadable_image_files(tmp_path: Path, name: str, make, problem: str) -> None:
    path = tmp_path / name
    if make:
        make(path)
    with pytest.raises(ValueError, match=problem) as info:
        read_rgb(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("kind", ["png", "tif", "tif16", "jpg"])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_truncated_image_files(tmp_path: Path, valid_images: dict[str, Path], kind: str, keep: float) -> None:
    raw = valid_images[kind].read_bytes()
    path = tmp_path / f"cut{valid_images[kind].suffix}"
    path.write_bytes(raw[: int(len(raw) * keep)])
    try:
        out = read_rgb(path)  # decoders may fill a truncated JPEG/strip with grey: then it must be a valid image
    except ValueError as e:
        assert str(path) in str(e)
    else:
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3


def test_16bit_float_grey_rgba_cmyk_multipage_converted(tmp_path: Path) -> None:
    # 16-bit: scaled by 65535 when any value exceeds 255
    tifffile.imwrite(tmp_path / "u16.tif", np.array([[0, 32768, 65535]], np.uint16))
    assert read_rgb(tmp_path / "u16.tif")[0, :, 0].tolist() == [0, 128, 255]
    # float in [0, 1]: scaled by 255
    tifffile.imwrite(tmp_path / "f32.tif", np.array([[0.0, 0.5, 1.0]], np.float32))
    assert read_rgb(tmp_path / "f32.tif")[0, :, 1].tolist() == [0, 128, 255]
    # greyscale PNG: replicated
    grey = _png(tmp_path / "grey.png", np.array([[0, 7], [200, 255]], np.uint8))
    assert np.array_equal(read_rgb(grey), np.repeat(np.array([[0, 7], [200, 255]], np.uint8)[..., None], 3, -1))
    # RGBA: composited onto white
    rgba = _png(tmp_path / "rgba.png", np.array([[[10, 20, 30, 255], [10, 20, 30, 0]]], np.uint8))
    assert read_rgb(rgba).tolist() == [[[10, 20, 30], [255, 255, 255]]]
    # CMYK 8 and 16 bit: RGB = (1 - C) (1 - K)
    tifffile.imwrite(tmp_path / "cmyk8.tif", np.array([[[0, 0, 0, 0], [255, 0, 0, 0]]], np.uint8),
                     photometric="separated")
    assert read_rgb(tmp_path / "cmyk8.tif").tolist() == [[[255, 255, 255], [0, 255, 255]]]
    tifffile.imwrite(tmp_path / "cmyk16.tif", np.array([[[1000, 0, 0, 0]]], np.uint16), photometric="separated")
    assert read_rgb(tmp_path / "cmyk16.tif").tolist() == [[[251, 255, 255]]]  # was 129 (uint8 wrap-around)
    # multi-page: the first page
    pages = np.stack([np.full((6, 7), v, np.uint8) for v in (10, 20, 30)])
    tifffile.imwrite(tmp_path / "pages.tif", pages, photometric="minisblack")
    out = read_rgb(tmp_path / "pages.tif")
    assert out.shape == (6, 7, 3) and (out == 10).all()
    # signed 16-bit uses the dtype's full range (no half-range saturation)
    assert to_rgb_uint8(np.array([[-32768, 0, 32767]], np.int16))[0, :, 0].tolist() == [0, 128, 255]
    # 1x1 is an image
    assert read_rgb(_png(tmp_path / "one.png", np.zeros((1, 1, 3), np.uint8))).shape == (1, 1, 3)


@pytest.mark.parametrize(
    "arr, problem",
    [
        (np.zeros((0, 0), np.uint8), "not an image array"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.zeros((2, 6, 7, 3), np.uint8), "multi-page"),
        (np.zeros((6, 7, 5), np.uint8), "expected a 2-D"),
        (np.array([[0.2, np.nan]]), "NaN or inf"),
        (np.array([[0.2, np.inf]], np.float32), "NaN or inf"),
        (np.zeros((3, 3), np.complex64), "unsupported dtype"),
        (np.array([["a", "b"]]), "unsupported dtype"),
        ([[1], [2, 3]], "not an image array"),
        (None, "not an image array"),
    ],
)
def test_unsupported_arrays(arr, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as info:
        to_rgb_uint8(arr, source="slide.tif")
    assert "slide.tif" in str(info.value)


def test_list_of_large_ints_is_scaled_not_crashing() -> None:
    # used to raise AttributeError ('list' object has no attribute 'dtype')
    out = to_rgb_uint8([[0, 1000]])
    assert out.shape == (1, 2, 3) and out.dtype == np.uint8


def test_five_channel_tiff_rejected(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "c5.tif", np.zeros((6, 7, 5), np.uint8), photometric="minisblack",
                     planarconfig="contig")
    with pytest.raises(ValueError, match="c5.tif.*expected a 2-D"):
        read_rgb(tmp_path / "c5.tif")


def test_nan_tiff_rejected(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "nan.tif", np.full((4, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="nan.tif: image contains NaN or inf"):
        read_rgb(tmp_path / "nan.tif")


# ------------------------------------------------------------------------------------------------ masks, points


def test_bad_masks(tmp_path: Path) -> None:
    m = _png(tmp_path / "m.png", np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"m.png: label image shape \(4, 5\) does not match the image shape"):
        read_mask(m, shape=(5, 5))
    tifffile.imwrite(tmp_path / "f.tif", np.array([[0.5, 1.0]], np.float32))
    with pytest.raises(ValueError, match="f.tif: label image must hold integers"):
        read_mask(tmp_path / "f.tif")
    tifffile.imwrite(tmp_path / "neg.tif", np.array([[-1, 1]], np.int16))
    with pytest.raises(ValueError, match="neg.tif: label image has negative values"):
        read_mask(tmp_path / "neg.tif")
    rgb = _png(tmp_path / "rgb.png", np.array([[[1, 2, 3]]], np.uint8))
    with pytest.raises(ValueError, match="rgb.png: label image has colour channels that differ"):
        read_mask(rgb)
    with pytest.raises(ValueError, match=r"class ids \[7\] outside 0..1"):
        Sample(np.zeros((2, 2, 3), np.uint8), "t", "s1", semantic=np.array([[0, 1], [7, 255]], np.uint8))


@pytest.mark.parametrize(
    "text, problem",
    [
        ("row,col\n1,99\n", "line 2: point .* lies outside the image of 10x10"),
        ("row,col\n-1,2\n", "lies outside"),
        ("row,col\nnan,2\n", "line 2: point has NaN/inf"),
        ("row,col,class\n1,2,inf\n", "line 2: cannot parse"),  # used to raise OverflowError
        ("row,col,class\n1,2,-3\n", "negative class"),
        ("a,b\n1,2\n", "header must name row,col or x,y"),
        ("row,col\n1,abc\n", "cannot parse"),
        ("", "empty points file"),
        ("row,col\n1," + "2" * 200_000 + "\n", "not a valid CSV"),  # used to raise _csv.Error
    ],
)
def test_bad_points_csv(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "p.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=problem) as info:
        read_points_csv(path, shape=(10, 10))
    assert str(path) in str(info.value)


def test_points_csv_binary_and_folder(tmp_path: Path) -> None:
    (tmp_path / "b.csv").write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ValueError, match="not a text CSV"):
        read_points_csv(tmp_path / "b.csv")
    with pytest.raises(ValueError, match="is a folder"):  # used to raise IsADirectoryError
        read_points_csv(tmp_path)


@pytest.mark.parametrize(
    "points, classes, radius, problem",
    [
        ([[1.0, np.nan]], None, 2.0, "NaN or inf"),
        ([[1.0, 10.0]], None, 2.0, "outside the image of 5x5"),
        ([[1.0, 1.0]], None, float("nan"), "radius_px must be a finite number"),  # used to be a bare NaN error
        ([[1.0, 1.0]], None, float("inf"), "radius_px must be a finite number"),  # used to raise OverflowError
        ([[1.0, 1.0]], None, -1.0, "radius_px must be a finite number >= 0"),  # used to draw nothing silently
        ([[1.0, 1.0], [3.0, 3.0]], [1], 1.0, r"classes must be \(2,\) integers"),  # used to raise IndexError
        ([[1.0, 1.0]], [300], 1.0, "point classes must be in 0..254"),  # used to wrap around to 44
        ([[1.0, 1.0]], [255], 1.0, "255 = unknown"),
        ([1.0, 2.0, 3.0], None, 1.0, r"\(N, 2\)"),
    ],
)
def test_bad_points_to_masks(points, classes, radius, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        points_to_masks(np.asarray(points), None if classes is None else np.asarray(classes), (5, 5), radius)


# ------------------------------------------------------------------------------------------------ unified folder


def _unified(tmp_path: Path, n: int = 2, value: int = 0) -> Path:
    rng = np.random.default_rng(value)
    samples = []
    for i in range(n):
        sem = np.full((8, 9), 255, np.uint8)
        sem[:3] = 0
        sem[5:] = 1
        samples.append(Sample(rng.integers(0, 256, (8, 9, 3), dtype=np.uint8), "t", f"s{i}", semantic=sem,
                              instances=(sem == 1).astype(np.uint32), points=np.array([[1.0, 2.0]]), mpp=0.5))
    return save_unified(samples, tmp_path / "u")


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda d: d.update(mpp=-1), "'mpp' must be null or a number > 0"),
        (lambda d: d.update(mpp="0.5"), "'mpp' must be null or a number > 0"),
        (lambda d: d["samples"][0].update(id="../../etc/passwd"), "not a valid file name"),
        (lambda d: d["samples"][0].update(patch_label=5), "'patch_label' must be null or a class id"),
        (lambda d: d.update(class_names=[1, 2]), "'class_names' must be a non-empty list of strings"),
        (lambda d: d.pop("samples"), "field 'samples' missing"),
        (lambda d: d.update(format="other"), "'format' must be"),
    ],
)
def test_bad_task_json(tmp_path: Path, edit, problem: str) -> None:
    folder = _unified(tmp_path)
    desc = json.loads((folder / "task.json").read_text())
    edit(desc)
    (folder / "task.json").write_text(json.dumps(desc))
    with pytest.raises(ValueError, match=problem) as info:
        open_dataset(folder)
    assert "task.json" in str(info.value)


def test_save_unified_refuses_path_like_ids(tmp_path: Path) -> None:
    s = Sample(np.zeros((2, 2, 3), np.uint8), "t", "../escape")
    with pytest.raises(ValueError, match="not a valid file name"):
        save_unified([s], tmp_path / "u")
    assert not (tmp_path / "escape.png").exists()


def test_failed_save_keeps_previous_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _unified(tmp_path, value=0)
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    import skimage.io

    calls = {"n": 0}
    real = skimage.io.imsave

    def flaky(path, *a, **k):  # the third image write fails (disk full, killed writer...)
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real(path, *a, **k)

    monkeypatch.setattr(skimage.io, "imsave", flaky)
    with pytest.raises(OSError):
        _unified(tmp_path, value=1)
    monkeypatch.undo()
    files = {p.relative_to(folder) for p in folder.rglob("*") if p.is_file()}
    assert files == set(before), "no temp file may be left behind"
    ds = open_dataset(folder)
    assert [s.sample_id for s in ds] == ["s0", "s1"]  # still loads; task.json and files untouched
    assert (folder / "task.json").read_bytes() == before[Path("task.json")]


# ------------------------------------------------------------------------------------------------ config JSON


@pytest.mark.parametrize(
    "text, problem",
    [
        (None, "config file not found"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object for TrainConfig"),
        ('{"meta_step": 5}', r"unknown field\(s\) \['meta_step'\]"),
        ('{"meta_steps": "5"}', "meta_steps: expected int, got str"),
        ('{"meta_steps": true}', "meta_steps: expected int, got bool"),
        ('{"model": {"depth": 0}}', "model: ModelConfig.depth must be > 0"),
        ('{"model": 3}', "model: expected a JSON object for ModelConfig"),
        ('{"maml": {"adapt": "everything"}}', "MAMLConfig.adapt must be"),
        ('{"method": "magic"}', "TrainConfig.method must be"),
        ('{"holdout_tasks": ["a", 3]}', r"holdout_tasks\[1\]: expected str"),  # used to be accepted
        ('{"data": {"monuseg": 3}}', r"data\['monuseg'\]: expected str"),  # used to be accepted
        ('{"outer_lr": NaN}', "outer_lr: expected a finite number"),  # used to be accepted
    ],
)
def test_bad_config_json(tmp_path: Path, text: str | None, problem: str) -> None:
    path = tmp_path / "cfg.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ValueError, match=problem) as info:
        load_json(TrainConfig, path)
    assert str(path) in str(info.value)


def test_config_missing_fields_take_defaults(tmp_path: Path) -> None:
    (tmp_path / "cfg.json").write_text('{"meta_steps": 7}')
    cfg = load_json(TrainConfig, tmp_path / "cfg.json")
    assert cfg.meta_steps == 7 and cfg == TrainConfig(meta_steps=7)


# ------------------------------------------------------------------------------------------------ checkpoints


def test_truncated_backbone(tmp_path: Path, tiny_backbone_dir: Path) -> None:
    from napari_metahistoseg import pipeline

    raw = tiny_backbone_dir.with_suffix(".safetensors").read_bytes()
    desc = json.loads(tiny_backbone_dir.with_suffix(".json").read_text())
    for cut in (0, 7, 100, len(raw) // 2):
        (tmp_path / "bb.safetensors").write_bytes(raw[:cut])
        (tmp_path / "bb.json").write_text(json.dumps({**desc, "weights_sha256": None}))
        pipeline._BACKBONES.pop(str(tmp_path / "bb"), None)
        with pytest.raises(ValueError, match="bb.safetensors: not a valid safetensors file"):
            pipeline.load_backbone(str(tmp_path / "bb"))


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda d: d.pop("heads"), "field 'heads' must map"),
        (lambda d: d.update(heads={"generic": [1, 2]}), "field 'heads' must map"),  # used to raise TypeError
        (lambda d: d.update(heads={"generic": {"classes": 3}}), "field 'heads' must map"),  # TypeError
        (lambda d: d.update(hover_types="5"), "'hover_types' must be null or an integer"),  # TypeError
        (lambda d: d.update(hover_types=-1), "'hover_types' must be null or an integer"),  # RuntimeError
        (lambda d: d.pop("backbone_sha256"), "'backbone_sha256' missing"),  # KeyError in load_backbone
        (lambda d: d["model"].update(mean=[0.5]), "model.mean: expected 3 values"),  # RuntimeError
        (lambda d: d["model"].update(std=[0.2, [], 0.2]), r"model.std\[1\]: expected float"),  # TypeError
        (lambda d: d["model"].update(mean=[0.5, float("nan"), 0.5]), "expected a finite number"),
        (lambda d: d["model"].update(depth=9), "describes a network of depth 9 but bb.safetensors holds 3"),
        (lambda d: d["model"].update(depth=10**6), "depth 1000000"),  # never built
        (lambda d: d["model"].update(head_hidden=64), "weights do not match the network.*wrong shape"),
        (lambda d: d.update(heads={"generic": {"classes": ["a", "b"]}, "extra": {"classes": ["a", "b"]}}),
         "weights do not match the network.*missing heads.extra"),
        (lambda d: d["model"].update(base_channels=100_000), "weights do not match"),  # never allocated
        (lambda d: d["model"].update(depth="3"), "model.depth: expected int"),
        (lambda d: d.update(weights_sha256="0" * 64), "SHA-256 does not match"),
        (lambda d: d.update(weights_sha256=5), "'weights_sha256' must be a string"),
    ],
)
def test_bad_backbone_description(tmp_path: Path, tiny_backbone_dir: Path, edit, problem: str) -> None:
    from napari_metahistoseg import pipeline

    desc = json.loads(tiny_backbone_dir.with_suffix(".json").read_text())
    edit(desc)
    (tmp_path / "bb.safetensors").write_bytes(tiny_backbone_dir.with_suffix(".safetensors").read_bytes())
    (tmp_path / "bb.json").write_text(json.dumps(desc))
    pipeline._BACKBONES.pop(str(tmp_path / "bb"), None)
    with pytest.raises(ValueError, match=problem) as info:
        pipeline.load_backbone(str(tmp_path / "bb"))
    assert str(tmp_path / "bb") in str(info.value)
    assert len(str(info.value)) < 600  # one readable message, not a state-dict dump


def test_nan_weights_refused(tmp_path: Path) -> None:
    import torch

    from napari_metahistoseg.checkpoints import load_model, save_model
    from napari_metahistoseg.config import ModelConfig
    from napari_metahistoseg.models import MetaHistoSegNet

    net = MetaHistoSegNet(ModelConfig(base_channels=8, depth=2), {"generic": 2})
    with torch.no_grad():
        net.heads["generic"].net[0].weight[0, 0] = float("nan")
    save_model(net, tmp_path / "nan", head_classes={"generic": ["a", "b"]})
    with pytest.raises(ValueError, match="nan.safetensors: weights contain NaN or inf"):
        load_model(tmp_path / "nan")


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda d: d.update(classes=["only"]), "'classes' must list at least 2"),
        (lambda d: d.update(provenance=[1]), "'provenance' must be an object"),  # used to raise TypeError
        (lambda d: d["provenance"].update(mpp=None), "'provenance.mpp' must be a number"),  # TypeError
        (lambda d: d["provenance"].update(mpp="x"), "'provenance.mpp' must be a number"),
        (lambda d: d["provenance"].update(maml=[]), "'provenance.maml' must be an object"),
        (lambda d: d["provenance"].update(maml={"steps": "20"}), "provenance.maml.steps: expected int"),
        (lambda d: d.update(backbone_sha256=7), "'backbone_sha256' must be a string"),
        (lambda d: d.pop("weights_sha256"), "field 'weights_sha256' missing"),
        (lambda d: d.update(colours=[1, 2]), "'colours' must be null or a list"),
        (lambda d: d["provenance"].update(colour_sigmas_um="abc"), "'provenance.colour_sigmas_um' must be null or"),
        (lambda d: d["provenance"].update(colour_sigmas_um=[-1]), "'provenance.colour_sigmas_um' must be null or"),
        (lambda d: d["provenance"].update(colour_sigmas_um=[0.0]), "colour channels of the 1 sigmas"),
    ],
)
def test_bad_head_description(tmp_path: Path, head_dir: Path, tiny_backbone, edit, problem: str) -> None:
    from napari_metahistoseg.pipeline import AdaptedHead

    src_w, src_j = (head_dir.with_name(head_dir.name + ".mhshead" + s) for s in (".safetensors", ".json"))
    desc = json.loads(src_j.read_text())
    edit(desc)
    (tmp_path / "h.mhshead.safetensors").write_bytes(src_w.read_bytes())
    (tmp_path / "h.mhshead.json").write_text(json.dumps(desc))
    with pytest.raises(ValueError, match=problem) as info:
        AdaptedHead.load(tmp_path / "h", tiny_backbone)
    assert str(tmp_path / "h") in str(info.value)


def test_head_for_another_backbone_refused(head_dir: Path, other_backbone_dir: Path) -> None:
    from napari_metahistoseg import pipeline

    other = pipeline.load_backbone(str(other_backbone_dir))
    with pytest.raises(ValueError, match="h.mhshead.json: this head was adapted on backbone .* not on the loaded"):
        pipeline.AdaptedHead.load(head_dir, other)


def test_head_of_wider_backbone_refused(tmp_path: Path, head_dir: Path) -> None:
    """A head whose tensors do not fit (another architecture) is refused even when the SHA check is bypassed."""
    from napari_metahistoseg import pipeline
    from napari_metahistoseg.checkpoints import import_head

    from .conftest import save_tiny_backbone

    wide = pipeline.load_backbone(str(save_tiny_backbone(tmp_path / "wide", base_channels=16)))
    state, desc = import_head(head_dir)
    head = pipeline.AdaptedHead(desc["classes"], state, wide.sha256, MAMLConfig(), 0.5)
    with pytest.raises(ValueError, match="does not fit this backbone"):
        head.module_for(wide)


# ------------------------------------------------------------------------------------------------ adapt, predict


def _bad_support_cases():
    image, labels = support()
    wrong_ids = labels.copy()
    wrong_ids[labels == 1] = 7
    return [
        ([image], [labels[:20]], ["bg", "fg"], r"support labels 0 have shape \(20, 32\), image has \(32, 32\)"),
        ([image], [wrong_ids], ["bg", "fg"], r"class ids \[7\] but only 2 classes are named"),
        ([image], [np.full_like(labels, 255)], ["bg", "fg"], "no labelled pixels"),
        ([image], [np.where(labels == 0, 255, labels).astype(np.uint8)], ["bg", "fg"], "only class 1"),
        ([image], [], ["bg", "fg"], "as many label masks as images"),
        ([np.full((32, 32, 3), np.nan)], [labels], ["bg", "fg"], "support image 0: image contains NaN"),
        ([image[:0]], [labels[:0]], ["bg", "fg"], "support image 0: image is empty"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_support_cases())))
def test_bad_support(tiny_backbone, case: int) -> None:
    from napari_metahistoseg.pipeline import adapt

    images, labels, classes, problem = _bad_support_cases()[case]
    with pytest.raises(ValueError, match=problem):
        run_gen(adapt(tiny_backbone, images, labels, classes, cfg=MAMLConfig(steps=1)))


@pytest.mark.parametrize("bad", ["negative", "nan", "fraction", "mpp", "mpp_list"])
def test_bad_support_values(tiny_backbone, bad: str) -> None:
    from napari_metahistoseg.pipeline import adapt

    image, labels = support()
    lab = labels.astype(np.float64)
    mpp = None
    images, labs = [image], [lab]
    if bad == "negative":
        lab[labels == 0] = -1
    elif bad == "nan":
        lab[labels == 0] = np.nan
    elif bad == "fraction":
        lab[labels == 0] = 0.5
    elif bad == "mpp":
        mpp = -0.5
    else:
        images, labs, mpp = [image, image], [labels, labels], [0.5]
    with pytest.raises(ValueError, match="label|mpp"):
        run_gen(adapt(tiny_backbone, images, labs, ["bg", "fg"], mpp=mpp, cfg=MAMLConfig(steps=1)))


def test_predict_odd_images(tiny_backbone, tiny_head) -> None:
    from napari_metahistoseg.inference import predict

    rng = np.random.default_rng(0)
    one = run_gen(predict(tiny_backbone, tiny_head, rng.integers(0, 256, (1, 1, 3), dtype=np.uint8)))
    assert one.semantic.shape == (1, 1)
    rgba16 = run_gen(predict(tiny_backbone, tiny_head, rng.integers(0, 65536, (9, 7, 4)).astype(np.uint16)))
    assert rgba16.semantic.shape == (9, 7) and np.isfinite(rgba16.probs).all()
    for bad, problem in ((np.zeros((0, 0, 3), np.uint8), "empty"), (np.full((4, 4), np.inf), "NaN or inf"),
                         (np.zeros((2, 4, 4, 3), np.uint8), "multi-page")):
        with pytest.raises(ValueError, match=problem):
            run_gen(predict(tiny_backbone, tiny_head, bad))


# ------------------------------------------------------------------------------------------------ CLI


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


def _one_line_error(err: str, *names: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("metahistoseg: error: "), err
    assert "Traceback" not in err
    for n in names:
        assert n in lines[-1], (n, lines[-1])


def test_cli_inspect_bad_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _cli(capsys, "inspect", str(tmp_path / "nope"))
    assert code == 2
    _one_line_error(err, str(tmp_path / "nope"), "folder not found")
    (tmp_path / "file.txt").write_text("x")
    code, err = _cli(capsys, "inspect", str(tmp_path / "file.txt"))
    assert code == 2
    _one_line_error(err, "not a folder")
    code, err = _cli(capsys, "inspect", str(tmp_path))
    assert code == 2
    _one_line_error(err, "layout not recognised")


def test_cli_inspect_corrupt_image_keeps_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _unified(tmp_path)
    img = folder / "images" / "s1.png"
    img.write_bytes(img.read_bytes()[:40])
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    code, err = _cli(capsys, "inspect", str(folder))
    assert code == 2
    _one_line_error(err, str(img), "corrupt or truncated")
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before  # nothing touched


def test_cli_evaluate_bad_backbone_and_support(tmp_path: Path, tiny_backbone_dir: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    folder = _unified(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.png").write_bytes(b"previous result")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 3)
    (tmp_path / "bad.json").write_text(tiny_backbone_dir.with_suffix(".json").read_text())
    code, err = _cli(capsys, "evaluate", str(folder), "--support", "s0", "--backbone", str(tmp_path / "bad"),
                     "--out", str(out))
    assert code == 2
    _one_line_error(err, "bad.safetensors")
    code, err = _cli(capsys, "evaluate", str(folder), "--support", "nope", "--backbone", str(tiny_backbone_dir))
    assert code == 2
    _one_line_error(err, "unknown support id")
    assert (out / "earlier.png").read_bytes() == b"previous result"


def test_cli_unexpected_exception_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import napari_metahistoseg.cli.inspect as cli_inspect

    def boom(*_a, **_k):
        raise KeyError("surprise")

    monkeypatch.setattr(cli_inspect, "summarise", boom)
    code, err = _cli(capsys, "inspect", ".")
    assert code == 1
    _one_line_error(err, "unexpected KeyError", "--debug")


def test_cli_real_process_exit_code_and_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    folder = tmp_path / "f"
    (folder / "images").mkdir(parents=True)
    (folder / "instance_masks").mkdir()
    bad.rename(folder / "images" / "a.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / "instance_masks" / "a.png")
    proc = subprocess.run([sys.executable, "-m", "napari_metahistoseg", "inspect", str(folder)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    _one_line_error(proc.stderr, str(folder / "images" / "a.png"), "corrupt or truncated")
