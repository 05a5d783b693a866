"""``metahistoseg adapt-mitosis``: clicked examples of a synthetic image → an adapted classifier that calls them the
way they were labelled, loadable by ``predict --mitosis-model``; bad input gives one line naming the file, exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from napari_metahistoseg.cli import main
from napari_metahistoseg.mitosis import classify, extract_patches, load_mitosis_model

MPP = 0.25  # µm/px of the synthetic image (in its TIFF tags)
MITOTIC = [(60, 60), (60, 200), (200, 60), (330, 330)]  # (row, col): dark round discs
NOT_MITOTIC = [(200, 200), (60, 330), (330, 60), (330, 200)]  # light small ellipses
STEPS = "100"  # the head only, on features computed once: well under a second


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A 400x400 RGB TIFF at 0.25 µm/px; the bundled classifier calls every blob mitotic (p > 0.9)."""
    rr, cc = np.indices((400, 400))
    img = np.full((400, 400, 3), 225, np.uint8)
    for r, c in MITOTIC:
        img[(rr - r) ** 2 + (cc - c) ** 2 <= 12**2] = (40, 20, 90)
    for r, c in NOT_MITOTIC:
        img[(rr - r) ** 2 / 81 + (cc - c) ** 2 / 36 <= 1] = (150, 110, 190)
    path = tmp_path_factory.mktemp("mitosis") / "tile.tif"
    tifffile.imwrite(path, img, photometric="rgb", resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit="CENTIMETER")
    return path, img


def write_points(path, rows, header=("x", "y", "class")):
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")
    return path


def examples(mitotic="mitotic", negative="0"):
    return [(c, r, mitotic) for r, c in MITOTIC] + [(c, r, negative) for r, c in NOT_MITOTIC]


def adapt(image_path, points, out, *extra):
    return main(["adapt-mitosis", str(image_path), "--points", str(points), "--steps", STEPS, "--out", str(out),
                 *extra])


def test_adapted_model_calls_the_examples_as_labelled(image, tmp_path, capsys):
    path, img = image
    pts = np.array(MITOTIC + NOT_MITOTIC, float)
    base, _ = load_mitosis_model()
    patches, _ = extract_patches(img, pts, MPP, base.cfg)
    assert (classify(base, patches) > 0.9).all()  # the base model cannot tell them apart: adaptation must
    points = write_points(tmp_path / "points.csv", examples())
    assert adapt(path, points, tmp_path / "adapted") == 0
    out = capsys.readouterr()
    assert out.out.strip().splitlines()[-1].endswith("adapted.safetensors") and "step 100/100" in out.err
    model, desc = load_mitosis_model(tmp_path / "adapted")
    prob = classify(model, patches)
    assert (prob[:4] > 0.5).all() and (prob[4:] < 0.5).all()
    prov = desc["adapted_from"]
    assert prov["n_mitotic"] == 4 and prov["n_not_mitotic"] == 4 and prov["steps"] == 100
    assert prov["image"] == str(path) and prov["points"] == str(points) and prov["base_model"] == "bundled"
    assert prov["mpp"] == pytest.approx(MPP)  # from the TIFF tags
    # the labels swapped (names and numbers mixed, row,col header): the calls swap too; the adapted model as base
    swapped = [(r, c, k) for c, r, k in examples(mitotic="negative", negative="1")]
    points2 = write_points(tmp_path / "swapped.csv", swapped, header=("row", "col", "class"))
    assert adapt(path, points2, tmp_path / "swapped", "--model", str(tmp_path / "adapted.json"), "--mpp", "0.25",
                 "--steps", "300") == 0
    model2, desc2 = load_mitosis_model(tmp_path / "swapped.safetensors")
    prob2 = classify(model2, patches)
    assert (prob2[:4] < 0.5).all() and (prob2[4:] > 0.5).all()
    assert desc2["adapted_from"]["base_model"] == str(tmp_path / "adapted.json")
    assert json.loads((tmp_path / "swapped.json").read_text())["adapted_from"]["steps"] == 300


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("metahistoseg: error: ")
    return err[0]


@pytest.mark.parametrize(("rows", "expected"), [
    ([(60, 60, 1), (200, 60, "positive")], "no non-mitotic (0/negative) example; 2 mitotic and 0 non-mitotic"),
    ([(60, 60, "negative"), (200, 60, 0)], "no mitotic (1/positive) example; 0 mitotic and 2 non-mitotic"),
    ([(60, 60, 1), (200, 60, "maybe")], "line 3: class 'maybe' is neither"),
    ([(60, 60, 1), (450, 60, 0), (60, 400, 0), (-1, 5, 0)],
     "3 point(s) lie outside the image of 400x400 pixels: line 3 (row 60, col 450), line 4 (row 400, col 60), "
     "line 5 (row 5, col -1)"),
])
def test_bad_examples_one_line_naming_the_file(image, tmp_path, capsys, rows, expected):
    points = write_points(tmp_path / "bad.csv", rows)
    assert adapt(image[0], points, tmp_path / "m") == 2
    line = one_error_line(capsys)
    assert str(points) in line and expected in line
    assert not (tmp_path / "m.safetensors").exists()


def test_missing_files_and_bad_header(image, tmp_path, capsys):
    points = write_points(tmp_path / "ok.csv", examples())
    assert adapt(tmp_path / "nope.tif", points, tmp_path / "m") == 2
    assert f"{tmp_path / 'nope.tif'}: file not found" in one_error_line(capsys)
    assert adapt(image[0], tmp_path / "nope.csv", tmp_path / "m") == 2
    assert f"{tmp_path / 'nope.csv'}: file not found" in one_error_line(capsys)
    no_class = write_points(tmp_path / "noclass.csv", [(1, 2), (3, 4)], header=("x", "y"))
    assert adapt(image[0], no_class, tmp_path / "m") == 2
    assert "header must name the coordinates (x,y or row,col) and a class column" in one_error_line(capsys)
    assert adapt(image[0], points, tmp_path / "m", "--model", str(tmp_path / "nomodel")) == 2
    assert "nomodel.json: description file not found" in one_error_line(capsys)
