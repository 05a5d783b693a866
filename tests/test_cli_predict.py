"""``metahistoseg adapt`` and ``metahistoseg predict`` end to end with a tiny random backbone; bad input gives one
line naming the file and exit code 2; torchrun-style sharding with two processes."""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

from napari_metahistoseg.checkpoints import save_model
from napari_metahistoseg.cli import main
from napari_metahistoseg.cli.adapt import _from_points
from napari_metahistoseg.config import MAMLConfig, ModelConfig, PointsConfig
from napari_metahistoseg.data.io import read_points_csv
from napari_metahistoseg.data.points import points_to_masks
from napari_metahistoseg.data.synthetic import synthetic_points_tile, synthetic_tile
from napari_metahistoseg.models import MetaHistoSegNet
from napari_metahistoseg.slide import LazyImage, open_array, open_image

REPO = Path(__file__).resolve().parents[1]
HOVER_TYPES = ["background", "other", "inflammatory", "epithelial", "spindle"]
FAST = ["--steps", "3", "--threads", "1"]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_backbone(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    save_model(MetaHistoSegNet(ModelConfig(base_channels=8, depth=3), {"generic": 2}, hover_types=5), path,
               head_classes={"generic": ["background", "foreground"], "hover": HOVER_TYPES})
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A backbone, three synthetic images (0.5 µm/px in the TIFF tags), labels and points."""
    d = tmp_path_factory.mktemp("cli")
    tiny_backbone(d / "bb")
    tags = {"resolution": (2e4, 2e4), "resolutionunit": "CENTIMETER"}
    s = synthetic_tile((160, 192), seed=1, mpp=0.5)
    tifffile.imwrite(d / "a.tif", s.image, **tags)
    lab = np.full(s.semantic.shape, 255, np.uint8)
    lab[::3, ::3] = s.semantic[::3, ::3]
    tifffile.imwrite(d / "a_labels.tif", lab)
    p = synthetic_points_tile((160, 192), seed=2, mpp=0.5)
    tifffile.imwrite(d / "b.tif", p.image, **tags)
    with open(d / "b_points.csv", "w") as f:
        f.write("row,col,class\n" + "".join(f"{r:.1f},{c:.1f},1\n" for r, c in p.points))
    imgs = d / "images"
    imgs.mkdir()
    for i in range(3):
        tifffile.imwrite(imgs / f"q{i}.tif", synthetic_tile((144, 176), seed=10 + i, mpp=0.5).image, **tags)
    return d


@pytest.fixture(scope="module")
def head(work) -> Path:
    code = main(["adapt", str(work / "a.tif"), "--labels", str(work / "a_labels.tif"), "--backbone",
                 str(work / "bb"), *FAST, "--classes", "background,nucleus", "--out", str(work / "head")])
    assert code == 0
    return work / "head"


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("metahistoseg: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------ adapt


def test_adapt_with_labels_writes_a_head_with_provenance(head):
    desc = json.loads((head.parent / "head.mhshead.json").read_text())
    assert desc["classes"] == ["background", "nucleus"]
    prov = desc["provenance"]
    assert prov["support_kind"] == "labels" and prov["image_mpp"] == 0.5 and prov["backbone"].endswith("bb")
    assert (head.parent / "head.mhshead.safetensors").exists()
    # the exact support is named by hashes of the image and labels as given (USERS.md: support-set hashes)
    from napari_metahistoseg.data.io import to_rgb_uint8
    from napari_metahistoseg.pipeline import array_sha256

    [sup] = prov["support"]
    image = to_rgb_uint8(tifffile.imread(head.parent / "a.tif"))
    assert sup["image_sha256"] == array_sha256(image)
    assert sup["labels_sha256"] == array_sha256(tifffile.imread(head.parent / "a_labels.tif"))
    assert array_sha256(image[::-1]) != sup["image_sha256"]
    assert array_sha256(np.zeros((2, 3), np.uint8)) != array_sha256(np.zeros((3, 2), np.uint8))  # shape counts


def test_adapt_decoder_mode_last_blocks(work, capsys, tmp_path):
    from safetensors.numpy import load_file

    code, out, err = cli(capsys, "adapt", work / "a.tif", "--labels", work / "a_labels.tif", "--backbone",
                         work / "bb", "--steps", "2", "--threads", "1", "--mode", "decoder", "--decoder-blocks", "1",
                         "--out", tmp_path / "dec")
    assert code == 0, err
    desc = json.loads((tmp_path / "dec.mhshead.json").read_text())
    assert desc["provenance"]["maml"]["adapt"] == "decoder" and desc["provenance"]["maml"]["decoder_blocks"] == 1
    state = load_file(tmp_path / "dec.mhshead.safetensors")
    assert {k.split(".")[2] for k in state if k.startswith("backbone.")} == {"1"}  # depth 3: decoder blocks 0, 1
    code, out, err = cli(capsys, "adapt", work / "a.tif", "--labels", work / "a_labels.tif", "--backbone",
                         work / "bb", "--mode", "decoder", "--decoder-blocks", "-1", "--out", tmp_path / "bad")
    assert code == 2 and "decoder_blocks" in one_error_line(err)


def test_adapt_with_points(work, capsys):
    code, out, err = cli(capsys, "adapt", work / "b.tif", "--points", work / "b_points.csv", "--points-exhaustive",
                         "--radius", "3", "--radius-unit", "um", "--backbone", work / "bb", *FAST,
                         "--out", work / "headP")
    assert code == 0, err
    assert out.strip().splitlines()[-1].endswith("headP.mhshead.json")
    prov = json.loads((work / "headP.mhshead.json").read_text())["provenance"]
    assert prov["support_kind"] == "points" and prov["points_radius_model_px"] == pytest.approx(6.0)
    assert 0.2 <= prov["calibrated_threshold"] <= 0.8  # exhaustive points: a dense two-class support
    assert prov["calibrated_smoothing_um"] in (0.0, 1.0, 2.0, 4.0)
    code, out, err = cli(capsys, "adapt", work / "b.tif", "--points", work / "b_points.csv", "--points-exhaustive",
                         "--radius", "3", "--radius-unit", "um", "--backbone", work / "bb", *FAST, "--no-calibrate",
                         "--out", work / "headP0")
    assert code == 0, err
    prov0 = json.loads((work / "headP0.mhshead.json").read_text())["provenance"]
    assert prov0["calibrated_threshold"] is None and prov0["calibrated_smoothing_um"] is None
    assert prov["colour_sigmas_um"] == list(MAMLConfig().colour_sigmas_um)  # the head sees the image's colour
    code, out, err = cli(capsys, "adapt", work / "b.tif", "--points", work / "b_points.csv", "--points-exhaustive",
                         "--radius", "3", "--radius-unit", "um", "--backbone", work / "bb", *FAST, "--no-colour",
                         "--out", work / "headPc")
    assert code == 0, err
    assert json.loads((work / "headPc.mhshead.json").read_text())["provenance"]["colour_sigmas_um"] is None
    # a points head finds the cells on a streamed image too (window by window), as in memory
    code, out, err = cli(capsys, "predict", work / "b.tif", "--head", work / "headP", "--stream", "--threads", "1",
                         "--out", work / "cellsP")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])["images"][str(work / "b.tif")]
    rows = (work / "cellsP" / "b.points.csv").read_text().splitlines()
    assert summary["points"].endswith("b.points.csv") and rows[0] == "row,col,class,class_name,prob"
    assert summary["n_cells"] == len(rows) - 1


def test_adapt_points_need_a_contrast(work, capsys):
    code, _, err = cli(capsys, "adapt", work / "b.tif", "--points", work / "b_points.csv", "--backbone", work / "bb",
                       *FAST, "--out", work / "headX")
    assert code == 2
    line = one_error_line(err)
    assert "b_points.csv" in line and "--points-exhaustive" in line and "class 0" in line


def _points_args(points: Path) -> argparse.Namespace:
    return argparse.Namespace(points=str(points), points_exhaustive=True, classes=None, radius=3.0, radius_unit="um")


def test_exhaustive_points_support_of_a_small_image_is_the_whole_image(work):
    """The window around the points covers this image: the support is the one of the whole image, as before."""
    with open_image(work / "b.tif") as img:
        crop, sem, classes, _ = _from_points(_points_args(work / "b_points.csv"), img, 0.5, 48)
        full = img.read(0, 0, *img.shape[:2])
    pts, cls = read_points_csv(work / "b_points.csv", shape=full.shape[:2])
    ref, _ = points_to_masks(pts, cls, full.shape[:2], 6.0, background="background",
                             background_margin_px=PointsConfig().background_margin_px)
    assert classes == ["background", "nucleus"]
    np.testing.assert_array_equal(crop, full)
    np.testing.assert_array_equal(sem, ref)


def test_exhaustive_points_in_a_corner_read_only_their_window(tmp_path, monkeypatch):
    """Points in one corner of a large (lazy) image: only their box plus radius and context is read, and the
    support there is the whole-image support's window."""
    big = open_array(np.random.default_rng(0).integers(0, 256, (2000, 2400, 3), dtype=np.uint8), "big", mpp=0.5)
    (tmp_path / "p.csv").write_text("row,col,class\n1900.5,2300.2,1\n1950,2350,1\n1930,2380.7,1\n")
    reads = []
    real_read = LazyImage.read
    monkeypatch.setattr(LazyImage, "read", lambda self, *box: reads.append(box) or real_read(self, *box))
    crop, sem, _, _ = _from_points(_points_args(tmp_path / "p.csv"), big, 0.5, 48)
    reach = 6 + 48
    assert reads == [(1900 - reach, 2300 - reach, 2000, 2400)]
    assert crop.shape == (100 + reach, 100 + reach, 3) and sem.shape == crop.shape[:2]
    pts, cls = read_points_csv(tmp_path / "p.csv", shape=(2000, 2400))
    ref, _ = points_to_masks(pts, cls, (2000, 2400), 6.0, background="background",
                             background_margin_px=PointsConfig().background_margin_px)
    np.testing.assert_array_equal(sem, ref[1900 - reach:, 2300 - reach:])


def test_adapt_with_napari_style_labels(work, capsys, tmp_path):
    lab = tifffile.imread(work / "a_labels.tif")
    napari = np.where(lab == 255, 0, lab + 1).astype(np.uint8)  # 0 unknown, k = class k-1
    tifffile.imwrite(tmp_path / "n.tif", napari)
    code, _, err = cli(capsys, "adapt", work / "a.tif", "--labels", tmp_path / "n.tif", "--unlabelled", "0",
                       "--backbone", work / "bb", *FAST, "--out", tmp_path / "h")
    assert code == 0, err
    code, _, err = cli(capsys, "adapt", work / "a.tif", "--labels", tmp_path / "n.tif", "--backbone", work / "bb",
                       "--classes", "background,nucleus", *FAST, "--out", tmp_path / "h2")  # 255-convention: 0..2
    assert code == 2 and "class ids up to 2" in one_error_line(err)


def test_adapt_with_labels_of_a_region(work, capsys, tmp_path):
    """--origin: the labels file covers a region of the image; the head equals the one from the same labels
    written into an image-sized file (the same window is read)."""
    full = tifffile.imread(work / "a_labels.tif")  # 160 x 192, every third pixel labelled
    part = np.full_like(full, 255)
    part[40:100, 60:150] = full[40:100, 60:150]
    tifffile.imwrite(tmp_path / "full.tif", part)
    tifffile.imwrite(tmp_path / "region.tif", part[40:100, 60:150])
    heads = []
    for name, extra in (("full", []), ("region", ["--origin", "40,60"])):
        code, out, err = cli(capsys, "adapt", work / "a.tif", "--labels", tmp_path / f"{name}.tif", *extra,
                             "--backbone", work / "bb", *FAST, "--out", tmp_path / name)
        assert code == 0, err
        heads.append(json.loads((tmp_path / f"{name}.mhshead.json").read_text())["provenance"])
    assert heads[0]["support"][0]["shape"] == heads[1]["support"][0]["shape"]
    assert heads[0]["support"][0]["labels_sha256"] == heads[1]["support"][0]["labels_sha256"]  # the same window
    from safetensors.numpy import load_file

    a, b = (load_file(tmp_path / f"{n}.mhshead.safetensors") for n in ("full", "region"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    for origin, message in (("150,0", "do not fit the image"), ("4", "ROW,COL"), ("-1,2", "non-negative")):
        code, _, err = cli(capsys, "adapt", work / "a.tif", "--labels", tmp_path / "region.tif", f"--origin={origin}",
                           "--backbone", work / "bb", *FAST, "--out", tmp_path / "bad")
        assert code == 2 and message in one_error_line(err)


# ------------------------------------------------------------------------------------------ predict


def test_predict_in_memory_outputs(work, head, capsys, tmp_path):
    code, out, err = cli(capsys, "predict", work / "images", "--head", head, "--instances", "--threads", "1",
                         "--out", tmp_path)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert len(summary["images"]) == 3 and summary["world"] == 1
    for i in range(3):
        sem = tifffile.imread(tmp_path / f"q{i}.semantic.tif")
        inst = tifffile.imread(tmp_path / f"q{i}.instances.tif")
        assert sem.shape == inst.shape == (144, 176) and sem.dtype == np.uint8 and inst.dtype == np.uint32
        with open(tmp_path / f"q{i}.nuclei.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == len(np.unique(inst)) - 1
        outlines = json.loads((tmp_path / f"q{i}.nuclei.geojson").read_text())["features"]
        assert [f["properties"]["measurements"]["id"] for f in outlines] == [int(r["id"]) for r in rows]
        assert (tmp_path / f"q{i}.points.csv").read_text().startswith("row,col,class,class_name,prob")
    with tifffile.TiffFile(tmp_path / "q0.semantic.tif") as tf:
        assert json.loads(tf.pages[0].description)["classes"] == ["background", "nucleus"]
    assert "[predict] q0.tif" in err  # progress on stderr
    prov = json.loads((tmp_path / "q0.provenance.json").read_text())
    head_json = json.loads((work / "head.mhshead.json").read_text())
    assert prov["backbone"]["sha256"] == head_json["backbone_sha256"]
    assert prov["head"]["classes"] == head_json["classes"]
    assert prov["image"].endswith("q0.tif") and prov["devices"] == ["cpu"] and prov["tiling"]["tile_px"] > 0
    assert "hover" in prov and prov["outputs"]["semantic"].endswith("q0.semantic.tif")
    assert summary["images"][prov["image"]]["provenance"].endswith("q0.provenance.json")


def test_predict_streamed_matches_in_memory(work, head, capsys, tmp_path):
    args = ["predict", work / "images" / "q1.tif", "--head", head, "--threads", "1", "--tile", "128"]
    assert cli(capsys, *args, "--out", tmp_path / "mem")[0] == 0
    code, out, err = cli(capsys, *args, "--stream", "--instances", "--out", tmp_path / "zarr")
    assert code == 0, err
    root = zarr.open_group(str(tmp_path / "zarr" / "q1.zarr"), mode="r")
    assert root.attrs["complete"] is True
    mem = tifffile.imread(tmp_path / "mem" / "q1.semantic.tif")
    assert (root["semantic"][:] == mem).mean() > 0.999
    assert (tmp_path / "zarr" / "q1.nuclei.csv").exists() and "instances" in root
    with open(tmp_path / "zarr" / "q1.nuclei.csv", newline="") as f:
        ids = [int(r["id"]) for r in csv.DictReader(f)]
    outlines = json.loads((tmp_path / "zarr" / "q1.nuclei.geojson").read_text())["features"]
    assert ids and [f["properties"]["measurements"]["id"] for f in outlines] == ids
    summary = json.loads(out.strip().splitlines()[-1])["images"]
    assert summary[str(work / "images" / "q1.tif")]["nuclei_geojson"].endswith("q1.nuclei.geojson")


def test_predict_with_test_time_augmentation(work, head, capsys, tmp_path):
    args = ["predict", work / "images" / "q1.tif", "--head", head, "--threads", "1", "--tile", "128", "--stream"]
    assert cli(capsys, *args, "--tta", "4", "--out", tmp_path / "tta")[0] == 0
    root = zarr.open_group(str(tmp_path / "tta" / "q1.zarr"), mode="r")
    assert root.attrs["complete"] is True and root.attrs["tiling"]["tta_variants"] == 4  # provenance
    code, _, err = cli(capsys, *args, "--tta", "3", "--out", tmp_path / "bad")
    assert code == 2 and "--tta" in err and "invalid choice" in err


def test_predict_bf16_and_compile_flags_reach_the_tiling(work, head, capsys, tmp_path):
    """``--bf16`` / ``--compile`` set TilingConfig.autocast_bf16 / compile (CUDA-only: a CPU run is unchanged),
    recorded in the output's provenance."""
    args = ["predict", work / "images" / "q1.tif", "--head", head, "--threads", "1", "--tile", "128", "--stream"]
    assert cli(capsys, *args, "--bf16", "--compile", "--out", tmp_path / "gpu")[0] == 0
    assert cli(capsys, *args, "--out", tmp_path / "plain")[0] == 0
    on = zarr.open_group(str(tmp_path / "gpu" / "q1.zarr"), mode="r")
    off = zarr.open_group(str(tmp_path / "plain" / "q1.zarr"), mode="r")
    assert on.attrs["tiling"]["autocast_bf16"] is True and on.attrs["tiling"]["compile"] is True
    assert off.attrs["tiling"]["autocast_bf16"] is False and off.attrs["tiling"]["compile"] is False
    assert (on["semantic"][:] == off["semantic"][:]).all()


def test_predict_a_region_only(work, head, capsys, tmp_path):
    """``--roi``: only the region is predicted (streamed; the rest empty), its nuclei in the table in image
    coordinates; bad regions and --objects are refused with one line."""
    import csv

    args = ["predict", work / "images" / "q1.tif", "--head", head, "--threads", "1", "--tile", "128"]  # 144x176
    code, out, err = cli(capsys, *args, "--instances", "--roi", "20,30,110,150", "--out", tmp_path / "roi")
    assert code == 0, err
    root = zarr.open_group(str(tmp_path / "roi" / "q1.zarr"), mode="r")
    inst = root["instances"][:]
    outside = np.ones(inst.shape, bool)
    outside[20:110, 30:150] = False
    assert not inst[outside].any() and not root["semantic"][:][outside].any()
    with open(tmp_path / "roi" / "q1.nuclei.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["id"]) for r in rows) == sorted(set(np.unique(inst)) - {0})
    for r in rows:  # image coordinates: each centroid lies on its own nucleus
        assert inst[round(float(r["centroid_row"])), round(float(r["centroid_col"]))] in (0, int(r["id"]))
        assert 20 <= float(r["centroid_row"]) < 110 and 30 <= float(r["centroid_col"]) < 150
    [summary] = json.loads(out.strip().splitlines()[-1])["images"].values()
    assert summary["roi"] == [20, 30, 110, 150] and summary["mode"] == "streamed, region only"
    assert summary["n_nuclei"] == len(rows)
    for bad, message in (("5,5,5,9", "R0 < R1"), ("1,2,3", "four integers"), ("-1,0,5,5", "non-negative"),
                         ("a,b,c,d", "four integers")):
        code, _, err = cli(capsys, *args, f"--roi={bad}", "--out", tmp_path / "bad")
        assert code == 2 and message in one_error_line(err)
    code, _, err = cli(capsys, *args, "--roi", "0,0,50,50", "--objects", "--out", tmp_path / "bad")
    assert code == 2 and "--objects needs the whole" in one_error_line(err)


def test_predict_objects_in_memory_and_streamed(work, head, capsys, tmp_path):
    """``--objects``: large-object instances + table, as a TIFF in memory and in the zarr when streamed."""
    args = ["predict", work / "images" / "q2.tif", "--head", head, "--threads", "1", "--tile", "128", "--objects"]
    code, out, err = cli(capsys, *args, "--out", tmp_path / "mem")
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])["images"][str(work / "images" / "q2.tif")]
    obj = tifffile.imread(tmp_path / "mem" / "q2.objects.tif")
    assert obj.dtype == np.uint32 and obj.shape == (144, 176)
    with open(tmp_path / "mem" / "q2.objects.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert res["n_objects"] == len(rows) == len(np.unique(obj)) - 1
    assert all(r["class_name"] in ("background", "nucleus") for r in rows)
    code, out, err = cli(capsys, *args, "--stream", "--out", tmp_path / "zarr")
    assert code == 0, err
    root = zarr.open_group(str(tmp_path / "zarr" / "q2.zarr"), mode="r")
    assert root.attrs["complete"] is True and "objects" in root and root["objects"].shape == (144, 176)
    res = json.loads(out.strip().splitlines()[-1])["images"][str(work / "images" / "q2.tif")]
    assert res["n_objects"] == root.attrs["n_objects"] and Path(res["objects_csv"]).exists()
    assert "[objects] q2.tif" in err


def test_predict_list_file_and_device_set(work, head, capsys, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("# images\n" + "".join(f"{work / 'images' / f'q{i}.tif'}\n" for i in range(3)))
    code, out, err = cli(capsys, "predict", lst, "--head", head, "--devices", "cpu,cpu", "--threads", "1",
                         "--out", tmp_path / "o")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "o").glob("*.semantic.tif")) == [f"q{i}.semantic.tif" for i in range(3)]


def test_predict_needs_a_head(work, capsys, tmp_path):
    code, _, err = cli(capsys, "predict", work / "a.tif", "--out", tmp_path)
    assert code == 2 and "adapt a head first" in one_error_line(err)


def test_predict_mitosis_without_the_module(work, head, capsys, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.endswith(".mitosis") else real(name, *a))
    code, _, err = cli(capsys, "predict", work / "a.tif", "--head", head, "--mitosis", "--out", tmp_path)
    assert code == 2 and "--mitosis needs the mitosis module" in one_error_line(err)


def test_predict_mitosis_classifies_every_nucleus(work, head, capsys, tmp_path):
    mitosis = pytest.importorskip("napari_metahistoseg.mitosis")
    from napari_metahistoseg.config import MitosisConfig

    torch.manual_seed(0)
    mitosis.save_mitosis_model(mitosis.MitosisNet(MitosisConfig()), tmp_path / "mit")
    code, out, err = cli(capsys, "predict", work / "a.tif", "--head", head, "--mitosis", "--mitosis-model",
                         tmp_path / "mit", "--np-source", "hover", "--threads", "1", "--out", tmp_path)
    assert code == 0, err
    with open(tmp_path / "a.mitosis.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(tmp_path / "a.nuclei.csv", newline="") as f:
        nuclei = list(csv.DictReader(f))
    assert len(rows) == len(nuclei) and all(0 <= float(r["prob"]) <= 1 for r in rows)
    # scored against truth figures: two of the nuclei (x, y columns), one CSV for the image, or a folder of <stem>.csv
    from napari_metahistoseg.metrics import detection_scores

    truth = [(float(r["centroid_row"]) + 1.0, float(r["centroid_col"]) - 1.0) for r in nuclei[:2]] + [(2.0, 3.0)]
    (tmp_path / "truth").mkdir()
    (tmp_path / "truth" / "a.csv").write_text("x,y\n" + "".join(f"{c},{r}\n" for r, c in truth))
    called = [(float(r["row"]), float(r["col"])) for r in rows if r["mitotic"] == "1"]
    want = detection_scores(np.reshape(called, (-1, 2)), np.asarray(truth), MitosisConfig().match_radius_um / 0.5)
    for spec in (tmp_path / "truth" / "a.csv", tmp_path / "truth"):
        code, out, err = cli(capsys, "predict", work / "a.tif", "--head", head, "--mitosis", "--mitosis-model",
                             tmp_path / "mit", "--np-source", "hover", "--threads", "1", "--mpp", "0.5",
                             "--mitosis-truth", spec, "--out", tmp_path / "scored")
        assert code == 0, err
        got = json.loads(out.strip().splitlines()[-1])["images"][str(work / "a.tif")]["mitosis_scores"]
        assert got["n_truth"] == len(truth) and got["n_called"] == len(called)
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((want["precision"], want["recall"],
                                                                             want["f1"]))
    (tmp_path / "truth" / "a.csv").write_text("x,y\n5000,5000\n")
    code, _, err = cli(capsys, "predict", work / "a.tif", "--head", head, "--mitosis", "--mitosis-model",
                       tmp_path / "mit", "--threads", "1", "--mitosis-truth", tmp_path / "truth", "--out",
                       tmp_path / "bad")
    assert code == 2 and "a.csv" in err and "outside the image" in err, (code, err)


# ------------------------------------------------------------------------------------------ bad input


def _bad_files(d: Path) -> dict[str, tuple[Path, str]]:
    a = (np.random.default_rng(0).random((200, 200, 3)) * 255).astype(np.uint8)
    tifffile.imwrite(d / "truncated.tif", a, tile=(64, 64), photometric="rgb")
    data = (d / "truncated.tif").read_bytes()
    (d / "truncated.tif").write_bytes(data[: len(data) // 2])
    (d / "garbage.tif").write_bytes(b"II*\x00garbage" * 20)
    (d / "empty.tif").write_bytes(b"")
    tifffile.imwrite(d / "five.tif", np.zeros((50, 50, 5), np.uint8), photometric="minisblack", planarconfig="contig")
    return {"truncated": (d / "truncated.tif", "truncated"), "garbage": (d / "garbage.tif", "corrupt"),
            "empty": (d / "empty.tif", "empty"), "five": (d / "five.tif", "RGB or RGBA")}


@pytest.mark.parametrize("case", ["truncated", "garbage", "empty", "five"])
def test_predict_bad_image_one_line(work, head, capsys, tmp_path, case):
    path, problem = _bad_files(tmp_path)[case]
    code, _, err = cli(capsys, "predict", path, "--head", head, "--out", tmp_path / "o")
    assert code == 2
    line = one_error_line(err)
    assert str(path) in line and problem in line


@pytest.mark.parametrize("command", ["predict", "adapt"])
@pytest.mark.parametrize("case", ["garbage", "truncated"])
def test_bad_image_is_one_line_in_a_fresh_process(work, head, tmp_path, command, case):
    """In a process of its own (pytest's log capture out of the way) a bad TIFF gives our one error line and no
    other message (tifffile warned about the garbage file on a line of its own); progress lines aside."""
    path, _ = _bad_files(tmp_path)[case]
    extra = (["--head", head] if command == "predict"
             else ["--points", work / "b_points.csv", "--backbone", work / "bb", *FAST])
    p = subprocess.run([sys.executable, "-m", "napari_metahistoseg", command, path, *extra, "--out", tmp_path / "o"],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith(f"[{command}] ")]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0].startswith("metahistoseg: error:") and str(path) in lines[0]


def test_predict_goes_on_after_a_bad_image(work, head, capsys, tmp_path):
    path, _ = _bad_files(tmp_path)["garbage"]
    code, out, err = cli(capsys, "predict", path, work / "a.tif", "--head", head, "--threads", "1",
                         "--out", tmp_path / "o")
    assert code == 2 and "garbage.tif" in one_error_line(err)
    assert (tmp_path / "o" / "a.semantic.tif").exists()


def test_predict_converts_uint16_and_greyscale(work, head, capsys, tmp_path):
    img = tifffile.imread(work / "a.tif")
    tifffile.imwrite(tmp_path / "u16.tif", img.astype(np.uint16) * 257)
    tifffile.imwrite(tmp_path / "grey.tif", img[..., 1])
    code, _, err = cli(capsys, "predict", tmp_path / "u16.tif", tmp_path / "grey.tif", "--head", head,
                       "--mpp", "0.5", "--threads", "1", "--out", tmp_path / "o")
    assert code == 0, err
    ref = tifffile.imread(tmp_path / "o" / "u16.semantic.tif")
    assert ref.shape == img.shape[:2]


def test_predict_head_for_another_backbone(work, head, capsys, tmp_path):
    other = tiny_backbone(tmp_path / "other", seed=1)
    code, _, err = cli(capsys, "predict", work / "a.tif", "--head", head, "--backbone", other, "--out", tmp_path)
    assert code == 2
    line = one_error_line(err)
    assert "head.mhshead.json" in line and "adapted on backbone" in line


def test_adapt_points_outside_the_image(work, capsys, tmp_path):
    (tmp_path / "p.csv").write_text("row,col,class\n10,10,1\n20,20,0\n500,30,1\n")
    code, _, err = cli(capsys, "adapt", work / "b.tif", "--points", tmp_path / "p.csv", "--backbone", work / "bb",
                       *FAST, "--out", tmp_path / "h")
    assert code == 2
    line = one_error_line(err)
    assert "p.csv" in line and "line 4" in line and "outside the image" in line


def test_adapt_labels_of_the_wrong_size(work, capsys, tmp_path):
    tifffile.imwrite(tmp_path / "l.tif", np.zeros((10, 10), np.uint8))
    code, _, err = cli(capsys, "adapt", work / "a.tif", "--labels", tmp_path / "l.tif", "--backbone", work / "bb",
                       *FAST, "--out", tmp_path / "h")
    assert code == 2 and "l.tif" in one_error_line(err) and "does not match" in one_error_line(err)


def test_predict_missing_head_and_input(work, head, capsys, tmp_path):
    code, _, err = cli(capsys, "predict", work / "a.tif", "--head", tmp_path / "nohead", "--out", tmp_path)
    assert code == 2 and "nohead" in one_error_line(err)
    code, _, err = cli(capsys, "predict", tmp_path / "missing.tif", "--head", head, "--out", tmp_path)
    assert code == 2 and "missing.tif: not found" in one_error_line(err)


# ------------------------------------------------------------------------------------------ torchrun sharding


def test_torchrun_style_sharding_with_two_processes(work, head, tmp_path):
    """Two processes with torchrun's RANK/WORLD_SIZE each predict their shard ``files[rank::2]``."""
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "napari_metahistoseg", "predict", str(work / "images"), str(work / "a.tif"),
             "--head", str(head), "--threads", "1", "--out", str(tmp_path)],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=900) for p in procs]
    files = [str(work / "images" / f"q{i}.tif") for i in range(3)] + [str(work / "a.tif")]
    for rank, (p, (out, err)) in enumerate(zip(procs, results, strict=True)):
        assert p.returncode == 0, err
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["rank"] == rank and summary["world"] == 2
        assert sorted(summary["images"]) == sorted(files[rank::2])
    assert sorted(p.name for p in tmp_path.glob("*.semantic.tif")) == ["a.semantic.tif"] + [
        f"q{i}.semantic.tif" for i in range(3)]
