"""Run every bad input we know of through the library and the CLI and write the results to BAD_INPUTS.md.

Usage::

    .venv/bin/python scripts/bad_inputs_table.py            # writes BAD_INPUTS.md at the repository root
    .venv/bin/python scripts/bad_inputs_table.py --out -    # prints the table instead

Nothing in the table is typed by hand: each row is one case, built in a temporary folder, run for real, and its
outcome recorded — the exception type and message for the library, the exit code and stderr's last line for the
CLI (``python -m napari_metahistoseg ...`` in a subprocess). "Expected" is what the case should get: ``error``
(a ``ValueError`` / a non-zero exit with one line naming the problem, no traceback) or ``converted``/``loads``
(a supported odd input accepted by the documented rule). A row whose outcome differs from its expectation is
marked ✘ and is a bug; temporary paths are shown as ``<tmp>``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass
class Case:
    what: str  # the bad input
    where: str  # where it enters
    expected: str  # "error" | "converted" | "loads"
    run: Callable[[], str]  # returns a description of a success; raises on failure
    needs: str = ""  # for "error": a word the message must contain to count as clear


@dataclass
class CliCase:
    what: str
    args: list[str]
    expected: str = "error"
    check: Callable[[], bool] | None = None  # e.g. that earlier outputs were kept


# ------------------------------------------------------------------------------------------------ fixtures


def _png(path: Path, arr: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(arr).save(path)
    return path


def _tif(path: Path, arr: np.ndarray, **kw) -> Path:
    import tifffile

    tifffile.imwrite(path, arr, **kw)
    return path


class Fixtures:
    """Every file the cases read, built once in ``root``."""

    def __init__(self, root: Path) -> None:
        import torch

        from napari_metahistoseg import pipeline
        from napari_metahistoseg.checkpoints import save_model
        from napari_metahistoseg.config import MAMLConfig, ModelConfig
        from napari_metahistoseg.data import Sample, save_unified
        from napari_metahistoseg.models import MetaHistoSegNet

        self.root = root
        rng = np.random.default_rng(0)
        self.rgb = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
        self.png = _png(root / "ok.png", self.rgb)
        self.tif = _tif(root / "ok.tif", self.rgb, photometric="rgb")
        raw = self.png.read_bytes()
        (root / "truncated.png").write_bytes(raw[: len(raw) // 2])
        raw = self.tif.read_bytes()
        (root / "truncated.tif").write_bytes(raw[: len(raw) // 3])
        from PIL import Image

        Image.fromarray(self.rgb).save(root / "ok.jpg")
        raw = (root / "ok.jpg").read_bytes()
        (root / "truncated.jpg").write_bytes(raw[:20])
        (root / "garbage.png").write_bytes(b"this is not a PNG" * 8)
        (root / "empty.png").write_bytes(b"")
        # backbones: two tiny ones (another backbone = another seed) and one of another architecture
        for name, seed, base in (("bb", 0, 8), ("other", 1, 8), ("wide", 0, 16)):
            torch.manual_seed(seed)
            net = MetaHistoSegNet(ModelConfig(base_channels=base, depth=3), {"generic": 2}, hover_types=5)
            save_model(net, root / name, head_classes={"generic": ["background", "foreground"],
                                                       "hover": ["bg", "a", "b", "c", "d"]})
        self.bb = pipeline.load_backbone(str(root / "bb"))
        image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        labels = np.full((32, 32), 255, np.uint8)
        labels[2:8, 2:8], labels[16:24, 16:24] = 0, 1
        self.support = (image, labels)
        gen = pipeline.adapt(self.bb, [image], [labels], ["background", "cell"], cfg=MAMLConfig(steps=2))
        self.head = _finish(gen)
        self.head.save(root / "head")
        sem = np.full((8, 9), 255, np.uint8)
        sem[:3], sem[5:] = 0, 1
        self.data = save_unified([Sample(rng.integers(0, 256, (8, 9, 3), dtype=np.uint8), "t", f"s{i}", semantic=sem,
                                         mpp=0.5) for i in range(2)], root / "data")

    def copy_pair(self, stem: str, new: str, *, edit=None, wbytes: bytes | None = None, fix_sha: bool = False,
                  head: bool = False) -> Path:
        """Copy checkpoint ``stem`` to ``new`` with the JSON edited and/or the weights replaced."""
        from napari_metahistoseg.checkpoints import file_sha256

        sfx = ".mhshead" if head else ""
        src_w, src_j = (self.root / f"{stem}{sfx}.safetensors", self.root / f"{stem}{sfx}.json")
        dst_w, dst_j = (self.root / f"{new}{sfx}.safetensors", self.root / f"{new}{sfx}.json")
        dst_w.write_bytes(src_w.read_bytes() if wbytes is None else wbytes)
        desc = json.loads(src_j.read_text())
        if edit:
            edit(desc)
        if fix_sha:
            desc["weights_sha256"] = file_sha256(dst_w)
        dst_j.write_text(json.dumps(desc))
        return self.root / new

    def folder_with_bad_image(self, name: str, payload: bytes) -> Path:
        from napari_metahistoseg.data import Sample, save_unified

        folder = save_unified([Sample(self.rgb, "t", f"s{i}") for i in range(2)], self.root / name)
        (folder / "images" / "s1.png").write_bytes(payload)
        return folder


def _finish(gen):
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def _shape(a: np.ndarray) -> str:
    return f"{tuple(a.shape)} {a.dtype}"


# ------------------------------------------------------------------------------------------------ cases


def library_cases(fx: Fixtures) -> list[Case]:
    from napari_metahistoseg import pipeline
    from napari_metahistoseg.checkpoints import import_head
    from napari_metahistoseg.config import MAMLConfig, TrainConfig, load_json
    from napari_metahistoseg.data import Sample, open_dataset
    from napari_metahistoseg.data.io import read_mask, read_points_csv, read_rgb, to_rgb_uint8
    from napari_metahistoseg.data.points import points_to_masks
    from napari_metahistoseg.inference import predict

    r = fx.root
    cases: list[Case] = []

    def img(what, make, expected="error"):
        def run():
            path = make()
            return "read as " + _shape(read_rgb(path))
        cases.append(Case(what, "`data.io.read_rgb`", expected, run))

    img("missing image file", lambda: r / "nope.png")
    img("empty (0-byte) file", lambda: r / "empty.png")
    img("a folder instead of a file", lambda: r)
    img("random bytes named .png", lambda: r / "garbage.png")
    img("truncated PNG (first half)", lambda: r / "truncated.png")
    img("truncated TIFF (first third)", lambda: r / "truncated.tif")
    img("truncated JPEG (first 20 bytes)", lambda: r / "truncated.jpg")
    img("16-bit greyscale TIFF", lambda: _tif(r / "u16.tif", np.array([[0, 32768, 65535]], np.uint16)), "converted")
    img("float32 TIFF in [0, 1]", lambda: _tif(r / "f.tif", np.array([[0, 0.5, 1]], np.float32)), "converted")
    img("float32 TIFF with NaN", lambda: _tif(r / "nan.tif", np.full((4, 4), np.nan, np.float32)))
    img("greyscale PNG", lambda: _png(r / "grey.png", np.zeros((4, 5), np.uint8)), "converted")
    img("RGBA PNG (transparent pixels)", lambda: _png(r / "rgba.png", np.zeros((4, 5, 4), np.uint8)), "converted")
    img("CMYK 8-bit TIFF", lambda: _tif(r / "cmyk.tif", np.zeros((4, 5, 4), np.uint8), photometric="separated"),
        "converted")
    img("CMYK 16-bit TIFF", lambda: _tif(r / "cmyk16.tif", np.full((4, 5, 4), 1000, np.uint16),
                                         photometric="separated"), "converted")
    img("multi-page TIFF (3 pages)", lambda: _tif(r / "pages.tif", np.zeros((3, 6, 7), np.uint8),
                                                  photometric="minisblack"), "converted")
    img("5-channel TIFF", lambda: _tif(r / "c5.tif", np.zeros((6, 7, 5), np.uint8), photometric="minisblack",
                                       planarconfig="contig"))
    img("1×1 PNG", lambda: _png(r / "one.png", np.zeros((1, 1, 3), np.uint8)), "converted")

    def arr(what, a, expected="error"):
        cases.append(Case(what, "`data.io.to_rgb_uint8` (arrays from napari layers)", expected,
                          lambda: "converted to " + _shape(to_rgb_uint8(a, source="layer"))))

    arr("0×0 array", np.zeros((0, 0), np.uint8))
    arr("0×4 RGB array", np.zeros((0, 4, 3), np.uint8))
    arr("4-D stack (2, H, W, 3)", np.zeros((2, 6, 7, 3), np.uint8))
    arr("array with inf", np.array([[0.2, np.inf]]))
    arr("complex array", np.zeros((3, 3), np.complex64))
    arr("ragged nested list", [[1], [2, 3]])
    arr("signed int16 with negatives", np.array([[-32768, 0, 32767]], np.int16), "converted")
    arr("channel-first (3, H, W)", np.zeros((3, 6, 7), np.uint8), "converted")

    def mask(what, make, shape=None):
        cases.append(Case(what, "`data.io.read_mask`", "error", lambda: "read as " + _shape(read_mask(make(),
                                                                                                     shape=shape))))

    mask("label image of the wrong shape", lambda: _png(r / "m45.png", np.zeros((4, 5), np.uint8)), (5, 5))
    mask("fractional float labels", lambda: _tif(r / "mf.tif", np.array([[0.5, 1]], np.float32)))
    mask("negative labels", lambda: _tif(r / "mneg.tif", np.array([[-1, 1]], np.int16)))
    mask("RGB labels with differing channels", lambda: _png(r / "mrgb.png", np.array([[[1, 2, 3]]], np.uint8)))
    cases.append(Case("semantic mask with unknown class id 7", "`data.task.Sample`", "error",
                      lambda: str(Sample(fx.rgb[:2, :2], "t", "s", semantic=np.array([[0, 1], [7, 255]], np.uint8)))))

    def pts(what, text):
        def run():
            (r / "p.csv").write_text(text)
            p, c = read_points_csv(r / "p.csv", shape=(10, 10))
            return f"read {len(p)} points"
        cases.append(Case(what, "`data.io.read_points_csv`", "error", run))

    pts("point outside the image", "row,col\n1,99\n")
    pts("point with NaN", "row,col\nnan,2\n")
    pts("class 'inf'", "row,col,class\n1,2,inf\n")
    pts("unknown header", "a,b\n1,2\n")
    pts("200 000-character field", "row,col\n1," + "2" * 200_000 + "\n")

    def circles(what, points, classes, radius):
        cases.append(Case(what, "`data.points.points_to_masks`", "error", lambda: "masks " + _shape(
            points_to_masks(np.asarray(points), classes, (5, 5), radius)[0])))

    circles("point with NaN", [[1.0, np.nan]], None, 2.0)
    circles("point outside", [[1.0, 9.0]], None, 2.0)
    circles("radius NaN", [[1.0, 1.0]], None, float("nan"))
    circles("radius inf", [[1.0, 1.0]], None, float("inf"))
    circles("fewer classes than points", [[1.0, 1.0], [3.0, 3.0]], np.array([1]), 1.0)
    circles("class id 300", [[1.0, 1.0]], np.array([300]), 1.0)

    def task_json(what, edit):
        def run():
            folder = r / "tj"
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(fx.data, folder)
            desc = json.loads((folder / "task.json").read_text())
            edit(desc)
            (folder / "task.json").write_text(json.dumps(desc))
            return f"opened {len(open_dataset(folder))} samples"
        cases.append(Case(what, "`data.open_dataset` (unified task.json)", "error", run))

    task_json("mpp = -1", lambda d: d.update(mpp=-1))
    task_json("sample id '../../etc/passwd'", lambda d: d["samples"][0].update(id="../../etc/passwd"))
    task_json("patch_label out of range", lambda d: d["samples"][0].update(patch_label=9))
    task_json("class_names not strings", lambda d: d.update(class_names=[1, 2]))
    task_json("no 'samples' field", lambda d: d.pop("samples"))

    def cfg(what, text):
        def run():
            path = r / "cfg.json"
            if text is None:
                path.unlink(missing_ok=True)
            else:
                path.write_text(text)
            return "loaded " + repr(load_json(TrainConfig, path))[:60]
        cases.append(Case(what, "`config.load_json` (`metahistoseg train --config`)",
                          "loads" if text == '{"meta_steps": 7}' else "error", run))

    cfg("config file missing", None)
    cfg("config not JSON", "{not json")
    cfg("config field misspelt", '{"meta_step": 5}')
    cfg("config field of the wrong type", '{"meta_steps": "5"}')
    cfg("config nested value invalid", '{"model": {"depth": 0}}')
    cfg("config with missing fields (defaults used)", '{"meta_steps": 7}')

    def backbone(what, make, expected="error"):
        def run():
            stem = make()
            pipeline._BACKBONES.pop(str(stem), None)
            return "loaded " + pipeline.load_backbone(str(stem)).sha256[:12]
        cases.append(Case(what, "`pipeline.load_backbone` / `checkpoints.load_model`", expected, run))

    raw = (r / "bb.safetensors").read_bytes()
    tampered = bytearray(raw)
    tampered[_header_end(raw) + 5] ^= 0x40
    backbone("truncated safetensors", lambda: fx.copy_pair("bb", "t1", wbytes=raw[: len(raw) // 2], fix_sha=True))
    backbone("safetensors header length 2^60", lambda: fx.copy_pair(
        "bb", "t2", wbytes=struct.pack("<Q", 2**60) + raw[8:], fix_sha=True))
    backbone("weights changed after saving (SHA-256)", lambda: fx.copy_pair("bb", "t3", wbytes=bytes(tampered)))
    backbone("JSON: 'heads' entries not objects", lambda: fx.copy_pair(
        "bb", "t4", edit=lambda d: d.update(heads={"generic": [1, 2]})))
    backbone("JSON: hover_types = -1", lambda: fx.copy_pair("bb", "t5", edit=lambda d: d.update(hover_types=-1)))
    backbone("JSON: backbone_sha256 missing", lambda: fx.copy_pair("bb", "t6", edit=lambda d: d.pop("backbone_sha256")))
    backbone("JSON: model.depth = 1 000 000", lambda: fx.copy_pair(
        "bb", "t7", edit=lambda d: d["model"].update(depth=10**6)))
    backbone("JSON: model.mean of length 1", lambda: fx.copy_pair(
        "bb", "t8", edit=lambda d: d["model"].update(mean=[0.5])))
    backbone("JSON: model.base_channels = 16 (weights are 8)", lambda: fx.copy_pair(
        "bb", "t9", edit=lambda d: d["model"].update(base_channels=16)))
    backbone("pickle (torch.save) named .safetensors", lambda: _pickle_pair(fx))
    backbone("description file not JSON", lambda: _write(r / "t10.json", "{", r / "t10"))

    def head(what, make, backbone=None):
        def run():
            pipeline.AdaptedHead.load(make(), backbone or fx.bb)
            return "loaded"
        cases.append(Case(what, "`pipeline.AdaptedHead.load` / `checkpoints.import_head`", "error", run))

    other = pipeline.load_backbone(str(r / "other"))
    wide = pipeline.load_backbone(str(r / "wide"))
    hraw = (r / "head.mhshead.safetensors").read_bytes()
    htampered = bytearray(hraw)
    htampered[_header_end(hraw) + 5] ^= 0x40
    head("head adapted on another backbone", lambda: r / "head", other)
    head("head for another architecture (SHA check bypassed)", lambda: fx.copy_pair(
        "head", "h1", edit=lambda d: d.update(backbone_sha256=wide.sha256), head=True), wide)
    head("head weights changed after export (SHA-256)", lambda: fx.copy_pair("head", "h2", wbytes=bytes(htampered),
                                                                             head=True))
    head("head truncated", lambda: fx.copy_pair("head", "h3", wbytes=hraw[:100], head=True))
    head("head JSON: provenance.mpp = null", lambda: fx.copy_pair(
        "head", "h4", edit=lambda d: d["provenance"].update(mpp=None), head=True))
    head("head JSON: provenance.maml.steps = '20'", lambda: fx.copy_pair(
        "head", "h5", edit=lambda d: d["provenance"]["maml"].update(steps="20"), head=True))
    head("head JSON: one class", lambda: fx.copy_pair("head", "h6", edit=lambda d: d.update(classes=["x"]),
                                                      head=True))
    head("head JSON: provenance.colour_sigmas_um = 'abc'", lambda: fx.copy_pair(
        "head", "h7", edit=lambda d: d["provenance"].update(colour_sigmas_um="abc"), head=True))
    head("head JSON: colour sigmas that do not fit its weights", lambda: fx.copy_pair(
        "head", "h8", edit=lambda d: d["provenance"].update(colour_sigmas_um=[0.0]), head=True))
    cases.append(Case("head: SHA-256 matches but the file is not safetensors", "`checkpoints.import_head`", "error",
                      lambda: str(import_head(_pickle_pair(fx, head=True))[1]["classes"])))

    image, labels = fx.support

    def adapt_case(what, images, labs, classes=("bg", "fg"), mpp=None, needs=""):
        def run():
            h = _finish(pipeline.adapt(fx.bb, images, labs, list(classes), mpp=mpp, cfg=MAMLConfig(steps=1)))
            return f"adapted ({len(h.classes)} classes)"
        cases.append(Case(what, "`pipeline.adapt` (support set)", "error", run, needs))

    wrong = labels.copy()
    wrong[labels == 1] = 7
    adapt_case("support mask of the wrong shape", [image], [labels[:20]])
    adapt_case("support with unknown class id 7", [image], [wrong])
    adapt_case("all-unknown support", [image], [np.full_like(labels, 255)])
    adapt_case("one-class support", [image], [np.where(labels == 0, 255, labels).astype(np.uint8)])
    adapt_case("support image with NaN", [np.full((32, 32, 3), np.nan)], [labels])
    adapt_case("only one class named", [image], [labels], ("bg",))
    adapt_case("support labels negative (-1)", [image], [np.where(labels == 0, -1, labels.astype(int))])
    adapt_case("support labels NaN", [image], [np.where(labels == 0, np.nan, labels)], needs="label")
    adapt_case("support labels fractional (0.5)", [image], [np.where(labels == 0, 0.5, labels)])
    adapt_case("support mpp = -1", [image], [labels], mpp=-1.0)
    adapt_case("2 support images, 1 mpp value", [image, image], [labels, labels], mpp=[0.5])

    def predict_case(what, im, expected="error", mpp=None, needs=""):
        def run():
            return "predicted " + _shape(_finish(predict(fx.bb, fx.head, im, mpp=mpp)).semantic)
        cases.append(Case(what, "`inference.predict`", expected, run, needs))

    predict_case("0×0 image", np.zeros((0, 0, 3), np.uint8))
    predict_case("image with inf", np.full((4, 4), np.inf))
    predict_case("1×1 image", np.zeros((1, 1, 3), np.uint8), "converted")
    predict_case("16-bit RGBA image", np.full((9, 7, 4), 40000, np.uint16), "converted")
    predict_case("mpp = -1", image, mpp=-1.0)
    predict_case("mpp = NaN", image, mpp=float("nan"), needs="mpp")

    def objects_case(what, run):
        cases.append(Case(what, "`postprocess.object_instances` (gland instances)", "error", run))

    from napari_metahistoseg.config import ObjectPostConfig
    from napari_metahistoseg.postprocess import object_instances

    objects_case("object rules: work grid -1 µm/px", lambda: ObjectPostConfig(work_mpp_um=-1.0))
    objects_case("object rules: marker grid NaN µm/px", lambda: ObjectPostConfig(marker_mpp_um=float("nan")))
    objects_case("object instances of a 3-D mask", lambda: "objects " + _shape(
        object_instances(np.zeros((4, 5, 6), bool), ObjectPostConfig(), 0.5)))
    objects_case("object instances at mpp 0", lambda: "objects " + _shape(
        object_instances(np.zeros((5, 6), bool), ObjectPostConfig(), 0.0)))

    from napari_metahistoseg.config import TilingConfig
    from napari_metahistoseg.session import SessionStore

    cases.append(Case("threshold grid 0.9..0.5", "`config.MAMLConfig` (threshold calibration)", "error",
                      lambda: repr(MAMLConfig(threshold_min=0.9, threshold_max=0.5))[:40]))
    cases.append(Case("pyramid_min_px = -1", "`config.TilingConfig` (label pyramids)", "error",
                      lambda: repr(TilingConfig(pyramid_min_px=-1))[:40]))

    def session_region(what, entry):
        def run():
            store = SessionStore(r / "sessions")
            store.save_support("ab12", np.zeros((4, 4), np.uint8), origin=(10, 20))
            meta_path = store.folder("ab12") / "session.json"
            meta = json.loads(meta_path.read_text())
            meta["regions"]["10,20"] = entry
            meta_path.write_text(json.dumps(meta))
            return f"{len(store.load('ab12').regions)} region(s) loaded"
        cases.append(Case(what, "`session.SessionStore.load` (support regions)", "error", run))

    session_region("session region file '../x.png'", {"file": "../x.png", "shape": [4, 4]})
    session_region("session region without a shape", {"file": "region-10-20.png"})
    session_region("session region of the wrong shape", {"file": "region-10-20.png", "shape": [5, 4]})
    return cases


def _header_end(raw: bytes) -> int:
    return 8 + struct.unpack("<Q", raw[:8])[0]


def _write(path: Path, text: str, ret: Path) -> Path:
    path.write_text(text)
    (ret.with_name(ret.name + ".safetensors")).write_bytes(b"")
    return ret


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _pickle_pair(fx: Fixtures, head: bool = False) -> Path:
    import torch

    marker = fx.root / "CODE_RAN"
    buf = fx.root / "evil.pt"
    torch.save({"w": _Evil(str(marker))}, buf)
    stem = fx.copy_pair("head" if head else "bb", "evil", wbytes=buf.read_bytes(), fix_sha=True, head=head)
    return stem


def cli_cases(fx: Fixtures) -> list[CliCase]:
    r = fx.root
    bad_img = fx.folder_with_bad_image("data_bad_img", (r / "truncated.png").read_bytes())
    bad_json = r / "data_bad_json"
    bad_json.mkdir(exist_ok=True)
    (bad_json / "task.json").write_text('{"format": "metahistoseg-task", "task": 3}')
    fx.copy_pair("bb", "cli_trunc", wbytes=(r / "bb.safetensors").read_bytes()[:50], fix_sha=True)
    _pickle_pair(fx)
    cases = [
        CliCase("data folder missing", ["inspect", str(r / "nope")]),
        CliCase("a file instead of a folder", ["inspect", str(fx.png)]),
        CliCase("folder of an unknown layout", ["inspect", str(r / "empty_dir")]),
        CliCase("unified folder with a truncated PNG", ["inspect", str(bad_img)]),
        CliCase("task.json with a field of the wrong type", ["inspect", str(bad_json)]),
        CliCase("--layout that does not fit the folder", ["inspect", str(fx.data), "--layout", "glas"]),
        CliCase("unknown support id", ["evaluate", str(fx.data), "--support", "zz", "--backbone", str(r / "bb")]),
        CliCase("every image in the support", ["evaluate", str(fx.data), "--support", "s0,s1",
                                               "--backbone", str(r / "bb")]),
        CliCase("truncated backbone", ["evaluate", str(fx.data), "--support", "s0", "--backbone",
                                       str(r / "cli_trunc")]),
        CliCase("pickle as backbone weights", ["evaluate", str(fx.data), "--support", "s0", "--backbone",
                                               str(r / "evil")]),
        CliCase("backbone path missing", ["evaluate", str(fx.data), "--support", "s0", "--backbone", str(r / "no")]),
        CliCase("--steps -1", ["evaluate", str(fx.data), "--support", "s0", "--backbone", str(r / "bb"),
                               "--steps", "-1"]),
        CliCase("patch data: every support patch of one class", ["evaluate", str(_patch_folder(r)), "--support",
                                                                  "p0,p1"]),
        CliCase("train config missing", ["train", "--config", str(r / "missing.json")]),
        CliCase("train config with a misspelt field", ["train", "--config", str(_cfg(r, '{"meta_step": 1}'))]),
    ]
    (r / "empty_dir").mkdir(exist_ok=True)
    bb, head, out = str(r / "bb"), str(r / "head"), r / "out"
    if importlib.util.find_spec("napari_metahistoseg.cli.adapt") is not None:
        img = _png(r / "support.png", fx.support[0])
        lab = _png(r / "support_labels.png", fx.support[1])
        _png(r / "labels_small.png", fx.support[1][:20])
        _png(r / "labels_unknown.png", np.full_like(fx.support[1], 255))
        (r / "pts_outside.csv").write_text("row,col,class\n5,500,1\n")
        (r / "pts_nan.csv").write_text("row,col,class\nnan,5,1\n")
        a = ["--backbone", bb, "--steps", "1", "--out", str(r / "cli_head")]
        cases += [
            CliCase("`adapt`: image missing", ["adapt", str(r / "nope.png"), "--labels", str(lab), *a]),
            CliCase("`adapt`: truncated image", ["adapt", str(r / "truncated.png"), "--labels", str(lab), *a]),
            CliCase("`adapt`: labels of the wrong shape", ["adapt", str(img), "--labels",
                                                          str(r / "labels_small.png"), *a]),
            CliCase("`adapt`: labels all unknown", ["adapt", str(img), "--labels", str(r / "labels_unknown.png"),
                                                   *a]),
            CliCase("`adapt`: labels given as a corrupt file", ["adapt", str(img), "--labels",
                                                               str(r / "garbage.png"), *a]),
            CliCase("`adapt`: point outside the image", ["adapt", str(img), "--points", str(r / "pts_outside.csv"),
                                                        *a]),
            CliCase("`adapt`: point with NaN", ["adapt", str(img), "--points", str(r / "pts_nan.csv"), *a]),
            CliCase("`adapt`: --mpp -1", ["adapt", str(img), "--labels", str(lab), "--mpp", "-1", *a]),
            CliCase("`adapt`: --classes with one name", ["adapt", str(img), "--labels", str(lab), "--classes", "x",
                                                        *a]),
            CliCase("`adapt`: --decoder-blocks -1", ["adapt", str(img), "--labels", str(lab), "--mode", "decoder",
                                                    "--decoder-blocks", "-1", *a]),
            CliCase("`adapt`: --origin puts the labels beyond the image", ["adapt", str(img), "--labels", str(lab),
                                                                         "--origin", "5000,0", *a]),
            CliCase("`adapt`: --origin not ROW,COL", ["adapt", str(img), "--labels", str(lab), "--origin", "12", *a]),
        ]
    if importlib.util.find_spec("napari_metahistoseg.cli.predict") is not None:
        fx.copy_pair("head", "head_tampered", head=True,
                     wbytes=_flip_body_byte((r / "head.mhshead.safetensors").read_bytes()))
        p = ["--backbone", bb, "--out", str(out)]
        out.mkdir(exist_ok=True)
        (out / "earlier.semantic.tif").write_bytes(b"an earlier result")
        kept = lambda: (out / "earlier.semantic.tif").read_bytes() == b"an earlier result"  # noqa: E731
        cases += [
            CliCase("`predict`: input missing", ["predict", str(r / "nope.png"), "--head", head, *p], check=kept),
            CliCase("`predict`: a truncated image among good ones (the good one is still predicted)",
                    ["predict", str(fx.png), str(r / "truncated.png"), "--head", head, *p],
                    check=lambda: kept() and (out / "ok.semantic.tif").exists()),
            CliCase("`predict`: head missing", ["predict", str(fx.png), "--head", str(r / "nohead"), *p]),
            CliCase("`predict`: head weights tampered", ["predict", str(fx.png), "--head", str(r / "head_tampered"),
                                                         *p]),
            CliCase("`predict`: head of another backbone", ["predict", str(fx.png), "--head", head, "--backbone",
                                                           str(r / "other"), "--out", str(out)]),
            CliCase("`predict`: --mpp -1", ["predict", str(fx.png), "--head", head, "--mpp", "-1", *p]),
            CliCase("`predict`: --tile 0", ["predict", str(fx.png), "--head", head, "--tile", "0", *p]),
            CliCase("`predict`: --roi with R1 <= R0", ["predict", str(fx.png), "--head", head, "--roi", "9,0,4,8", *p]),
            CliCase("`predict`: --roi with --objects", ["predict", str(fx.png), "--head", head, "--roi", "0,0,8,8",
                                                       "--objects", *p]),
            CliCase("`predict`: --roi negative", ["predict", str(fx.png), "--head", head, "--roi=-1,0,4,8", *p]),
            CliCase("`predict`: --tta 3 (not 1, 2, 4 or 8)", ["predict", str(fx.png), "--head", head, "--tta", "3",
                                                              *p]),
        ]
    return cases


def _flip_body_byte(raw: bytes) -> bytes:
    b = bytearray(raw)
    b[_header_end(raw) + 5] ^= 0x40
    return bytes(b)


def _patch_folder(root: Path) -> Path:
    """A small folder in the AMi-Br layout (labels.csv + patches/): p0, p1, p3 normal, p2 atypical."""
    folder = root / "patches_amibr"
    rows = ["patch,slide,dataset,uid,x,y,expert1_atypical,expert2_atypical,expert3_atypical"]
    for i, atyp in enumerate([False, False, True, False]):
        sub = folder / "patches" / ("atypical" if atyp else "normal")
        sub.mkdir(parents=True, exist_ok=True)
        _png(sub / f"p{i}.png", np.full((64, 64, 3), 120 + 20 * i, np.uint8))
        rows.append(f"patches/{sub.name}/p{i}.png,s.tiff,D,{i},0,0,{atyp},{atyp},{atyp}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


def _cfg(root: Path, text: str) -> Path:
    (root / "cfg_cli.json").write_text(text)
    return root / "cfg_cli.json"


# ------------------------------------------------------------------------------------------------ running


def _clean(text: str, root: Path) -> str:
    text = " ".join(str(text).split()).replace(str(root), "<tmp>").replace(str(root.resolve()), "<tmp>")
    return text.replace("|", "\\|")[:400]


def run_library(case: Case, root: Path) -> tuple[str, str, bool]:
    """(outcome, message, as expected)."""
    try:
        msg = case.run()
    except ValueError as e:
        return "ValueError", _clean(e, root), case.expected == "error" and case.needs in str(e)
    except Exception as e:  # noqa: BLE001 - recorded: any other exception is a bug
        return f"**{type(e).__name__}**", _clean(e, root), False
    return "accepted", _clean(msg, root), case.expected in ("converted", "loads")


def run_cli(case: CliCase, root: Path) -> tuple[str, str, bool]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "napari_metahistoseg", *case.args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=600)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    last = lines[-1] if lines else "(no output)"
    ok = (proc.returncode != 0 and "Traceback" not in proc.stderr and last.startswith("metahistoseg")
          and "error:" in last if case.expected == "error" else proc.returncode == 0)
    if case.check is not None:
        ok = ok and case.check()
    return f"exit {proc.returncode}", _clean(last, root), ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "BAD_INPUTS.md"), help="output file ('-' = stdout)")
    args = ap.parse_args(argv)
    import napari_metahistoseg

    with tempfile.TemporaryDirectory(prefix="mhs_bad_inputs_") as d:
        root = Path(d)
        fx = Fixtures(root)
        lib = [(c, *run_library(c, root)) for c in library_cases(fx)]
        cli = [(c, *run_cli(c, root)) for c in cli_cases(fx)]
        code_ran = (root / "CODE_RAN").exists()
    rows = ["| # | Bad input | Enters through | Expected | Outcome | Message / result | OK |",
            "|---|---|---|---|---|---|---|"]
    for i, (c, outcome, msg, ok) in enumerate(lib, 1):
        rows.append(f"| {i} | {c.what} | {c.where} | {c.expected} | {outcome} | {msg} | {'✔' if ok else '✘'} |")
    cli_rows = ["| # | Bad input | Command | Expected | Exit | Last stderr line | OK |",
                "|---|---|---|---|---|---|---|"]
    for i, (c, outcome, msg, ok) in enumerate(cli, 1):
        cmd = "metahistoseg " + " ".join(_clean(a, root) if "/" in a else a for a in c.args)
        cli_rows.append(f"| {i} | {c.what} | `{cmd}` | {c.expected} | {outcome} | {msg} | {'✔' if ok else '✘'} |")
    n_bad = sum(not ok for *_, ok in lib + cli)
    absent = [s for s in ("adapt", "predict") if importlib.util.find_spec(f"napari_metahistoseg.cli.{s}") is None]
    doc = [
        "# Bad inputs",
        "",
        f"Generated by `scripts/bad_inputs_table.py` (napari-metahistoseg {napari_metahistoseg.__version__}); do not "
        "edit by hand — rerun the script. Every row was run for real: library cases in-process (outcome = the "
        "exception raised, or `accepted` with what came out), CLI cases as `python -m napari_metahistoseg ...` "
        "subprocesses (exit code and the last line of stderr). *Expected* `error` means one `ValueError` / one "
        "`metahistoseg: error: ...` line with a non-zero exit and no traceback; `converted`/`loads` means the "
        "input is supported and converted by the documented rule (`napari_metahistoseg/data/io.py`). ✘ marks a "
        "row whose outcome is not the expected one: a known bug (see the notes at the end).",
        "",
        f"**{len(lib) + len(cli) - n_bad} of {len(lib) + len(cli)} cases behave as expected; {n_bad} do not.** "
        f"Code executed by a pickled weight file: **{'YES' if code_ran else 'never'}**.",
        "",
        "## Library",
        "",
        *rows,
        "",
        "## Command line",
        "",
        *cli_rows,
        "",
        "Subcommands not present when this table was generated: " + (", ".join(f"`{s}`" for s in absent) or "none")
        + ".",
        "",
        "## Notes",
        "",
        *(["* ✘ rows are bugs: each needs the validation that makes it a clear `ValueError` / one error line."]
          if n_bad else []),
        "* `predict` with several inputs reports a bad image on one line, still predicts the others and exits 2; "
        "rows marked so also check that an earlier output in `--out` was kept.",
        "* Saving is crash-safe (temporary file + atomic rename; checkpoints commit their JSON between a "
        "`.pending` weights file and its final rename): see `tests/hardening/test_faults.py`.",
        "",
    ]
    text = "\n".join(doc)
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}: {len(lib) + len(cli)} cases, {n_bad} not as expected", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
