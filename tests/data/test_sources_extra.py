"""Readers of the official Gleason2019, BreastPathQ and DigestPath layouts, on tiny files written here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage import io as skio

from napari_metahistoseg.config import PointsConfig
from napari_metahistoseg.data import IGNORE, READERS, detect_layout, open_dataset
from napari_metahistoseg.data.sources_extra import gleason_classes, read_breastpathq_xml

H, W = 32, 40
SUFFIX = "_classimg_nonconvex.png"


def _rgb(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(60, 200, (H, W, 3), dtype=np.uint8)


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    skio.imsave(path, arr, check_contrast=False)
    return path


def test_extra_readers_detected_before_generic_ones():
    order = list(READERS)
    for name in ("gleason2019", "breastpathq", "digestpath"):
        assert order.index(name) < order.index("cpm15") < order.index("glas")
    assert order[0] == "unified"


# ------------------------------------------------------------------------------------------ Gleason2019


def _gleason(root: Path, maps: dict[int, np.ndarray], name: str = "slide001_core004") -> Path:
    _png(root / "Train Imgs" / f"{name}.jpg", _rgb())
    for k, m in maps.items():
        _png(root / f"Maps{k}_T" / f"{name}{SUFFIX}", m.astype(np.uint8))
    return root


CODES = np.array([[0, 1, 3, 4, 5, 6]] * 2, np.uint8)


def _code_map() -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[:2, :6] = CODES
    return m


def test_gleason_detect_and_code_mapping(tmp_path):
    root = _gleason(tmp_path, {2: _code_map()})
    _png(root / "Train Imgs" / "slide001_core005.jpg", _rgb(1))  # no annotator map: not listed
    assert detect_layout(root) == "gleason2019"
    ds = open_dataset(root)
    assert ds.ids == ["slide001_core004"] and ds.task == "gleason2019"
    assert ds.class_names == ("background", "benign", "gleason_3", "gleason_4", "gleason_5", "gleason_code_6")
    s = ds.load("slide001_core004")
    assert s.image.shape == (H, W, 3) and s.semantic.dtype == np.uint8
    assert s.semantic[:2, :6].tolist() == [[0, 1, 2, 3, 4, 5]] * 2
    assert s.meta["annotators"] == [2] and s.mpp == 0.25
    s5 = open_dataset(root, code6="benign").load("slide001_core004")
    assert s5.class_names == gleason_classes("benign")[1] and len(s5.class_names) == 5
    assert s5.semantic[:2, :6].tolist() == [[0, 1, 2, 3, 4, 1]] * 2


def test_gleason_consolidation_staple_and_majority(tmp_path):
    a = np.zeros((H, W), np.uint8)
    a[:, W // 2 :] = 3  # right half Gleason 3
    b = a.copy()
    b[:8, :8] = 4  # annotator 3 disagrees in a corner
    c = a.copy()
    c[-4:, :4] = 1
    root = _gleason(tmp_path, {1: a, 3: b, 6: c})
    expected = np.where(a == 3, 2, 0)
    for how in ("staple", "majority"):
        s = open_dataset(root, consolidation=how).load("slide001_core004")
        assert s.meta["annotators"] == [1, 3, 6] and s.meta["consolidation"] == how
        assert np.array_equal(s.semantic, expected), how


def test_gleason_ties(tmp_path):
    a = np.zeros((H, W), np.uint8)
    a[:, : W // 2] = 4
    b = np.where(a == 4, 0, 4).astype(np.uint8)  # the exact opposite: every pixel is a 1-1 tie
    root = _gleason(tmp_path, {1: a, 2: b})
    ca, cb = np.where(a == 4, 3, 0), np.where(b == 4, 3, 0)
    load = lambda **kw: open_dataset(root, **kw).load("slide001_core004").semantic  # noqa: E731
    assert np.array_equal(load(consolidation="majority", tie="first"), ca)  # annotator Maps1_T decides
    assert np.array_equal(load(consolidation="majority", tie="lowest"), np.zeros((H, W)))
    assert (load(consolidation="majority", tie="ignore") == IGNORE).all()
    assert np.array_equal(load(consolidation="staple", undecided="first"), ca)
    assert (load(consolidation="staple", undecided="ignore") == IGNORE).all()
    assert not np.array_equal(ca, cb)


def test_gleason_maps_under_mask_folder_and_train_imgs_name(tmp_path):
    (tmp_path / "Train_imgs").mkdir()
    _png(tmp_path / "Train_imgs" / "slide002_core001.jpg", _rgb())
    _png(tmp_path / "mask" / "Maps4_T" / f"slide002_core001{SUFFIX}", _code_map())
    ds = open_dataset(tmp_path)
    assert ds.layout == "gleason2019" and ds.ids == ["slide002_core001"]


def test_gleason_errors_name_the_file(tmp_path):
    bad = _code_map()
    bad[5, 5] = 2  # not a Gleason code
    root = _gleason(tmp_path, {1: bad})
    with pytest.raises(ValueError, match=rf"Maps1_T.*{SUFFIX}.*unexpected Gleason code\(s\) \[2\]"):
        open_dataset(root).load("slide001_core004")
    _png(root / "Maps1_T" / f"slide001_core004{SUFFIX}", np.zeros((H, W + 1), np.uint8))
    with pytest.raises(ValueError, match=rf"Maps1_T.*{SUFFIX}.*does not match the image shape"):
        open_dataset(root).load("slide001_core004")
    img = root / "Train Imgs" / "slide001_core004.jpg"
    img.write_bytes(img.read_bytes()[:50])
    with pytest.raises(ValueError, match="slide001_core004.jpg"):
        open_dataset(root).load("slide001_core004")
    ds = open_dataset(root)
    img.unlink()  # removed after listing
    with pytest.raises(ValueError, match=r"Train Imgs.*'slide001_core004'.*missing file"):
        ds.load("slide001_core004")
    with pytest.raises(ValueError, match="consolidation"):
        open_dataset(root, consolidation="mean")
    with pytest.raises(ValueError, match="code6"):
        open_dataset(root, code6="drop")


def test_gleason_wins_over_generic_layouts(tmp_path):
    root = _gleason(tmp_path, {1: _code_map()})
    _png(root / "images" / "x.png", _rgb())
    _png(root / "masks" / "x.png", np.zeros((H, W), np.uint8))
    _png(root / "instance_masks" / "x.png", np.zeros((H, W), np.uint8))
    assert detect_layout(root) == "gleason2019"


# ------------------------------------------------------------------------------------------ BreastPathQ

XML = """<?xml version="1.0"?>
<session software="PathCore Session Printer" version="0.1.0">
  <image identifier="{name}_crop.tif">
    <overlays>
{graphics}
    </overlays>
  </image>
</session>
"""


def _graphic(description: str, points: list[tuple[float, float]]) -> str:
    pts = "".join(f"<point>{x},{y}</point>" for x, y in points)
    return (f'      <graphic type="point" name="p" description="{description}">'
            f'<pen color="#00ff00" width="2" style="Solid"/><point-list>{pts}</point-list></graphic>')


def _breastpathq(root: Path, graphics: list[str], name: str = "12") -> Path:
    cells = root / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(cells / f"{name}_crop.tif", _rgb())
    (cells / f"{name}_key.xml").write_text(XML.format(name=name, graphics="\n".join(graphics)))
    return root


def test_breastpathq_classes_points_and_circles(tmp_path):
    root = _breastpathq(tmp_path, [
        _graphic("TIL-S", [(5, 10)]),            # x=5 (col), y=10 (row)
        _graphic("DCIS 2", [(20, 20), (30, 5)]),
        _graphic("normal", [(35, 28)]),
        _graphic("MC - M", [(12, 25)]),
        _graphic("Stroma", [(1, 1), (2, 2)]),   # not a cell type of the task: skipped
    ])
    assert detect_layout(root) == "breastpathq" and detect_layout(root / "cells") == "breastpathq"
    ds = open_dataset(root, points=PointsConfig(radius=3))
    assert ds.kind == "points" and ds.ids == ["12"]
    assert ds.class_names == ("background", "lymphocyte", "malignant_epithelial", "normal_epithelial")
    s = ds.load("12")
    np.testing.assert_array_equal(s.points, [[10, 5], [20, 20], [5, 30], [28, 35], [25, 12]])
    assert s.point_classes.tolist() == [1, 2, 2, 3, 2]
    assert s.meta["skipped"] == {"Stroma": 2}
    assert s.semantic[10, 5] == 1 and s.semantic[13, 5] == 1 and s.semantic[14, 5] == 0  # radius 3, bg = 0
    assert s.semantic[28, 35] == 3 and s.instances[28, 35] == 4
    assert s.instances.max() == 5 and s.mpp == 0.5


def test_breastpathq_radius_config_and_background(tmp_path):
    root = _breastpathq(tmp_path, [_graphic("TIL-E", [(20, 16)])])
    s = open_dataset(root, points=PointsConfig(radius=2.0, radius_unit="um")).load("12")  # 2 µm / 0.5 = 4 px
    assert s.semantic[16, 24] == 1 and s.semantic[16, 25] == 0
    assert s.meta["radius_px"] == 4.0
    default = open_dataset(root).load("12")  # PointsConfig default: 12 px as in the paper
    assert default.semantic[16, 20 + 12] == 1 and default.semantic[16, 20 + 13] == 0
    unknown = open_dataset(root, background="unknown").load("12")
    assert unknown.semantic[0, 0] == IGNORE
    margin = open_dataset(root, points=PointsConfig(radius=3, background_margin_px=2), margin=True).load("12")
    assert margin.semantic[16, 24] == IGNORE and margin.semantic[16, 26] == 0


def test_breastpathq_description_normalisation(tmp_path):
    root = _breastpathq(tmp_path, [_graphic("mc-e", [(1, 1)]), _graphic(" Muc  C ", [(2, 2)]),
                                   _graphic("til-e", [(3, 3)]), _graphic("UDH", [(4, 4)])])
    pts, cls, skipped = read_breastpathq_xml(root / "cells" / "12_key.xml")
    assert cls.tolist() == [2, 2, 1, 3] and not skipped


def test_breastpathq_errors_name_the_file(tmp_path):
    root = _breastpathq(tmp_path, [_graphic("TIL-E", [(40, 3)])])  # x = 40 is outside the 40-wide image
    with pytest.raises(ValueError, match=r"12_key\.xml: points outside the 32x40 image"):
        open_dataset(root).load("12")
    key = root / "cells" / "12_key.xml"
    key.write_text(XML.format(name="12", graphics='<graphic description="TIL-E"><point>3;4</point></graphic>'))
    with pytest.raises(ValueError, match=r"12_key\.xml: point '3;4'"):
        open_dataset(root).load("12")
    key.write_text("<session><graphic>")
    with pytest.raises(ValueError, match=r"12_key\.xml: not a valid XML"):
        open_dataset(root).load("12")
    (root / "cells" / "12_crop.tif").write_bytes(b"")
    with pytest.raises(ValueError, match=r"12_crop\.tif: file is empty"):
        open_dataset(root).load("12")


def test_breastpathq_natural_order_and_unpaired(tmp_path):
    for name in ("10", "2", "1"):
        _breastpathq(tmp_path, [_graphic("TIL-E", [(3, 3)])], name=name)
    tifffile.imwrite(tmp_path / "cells" / "7_crop.tif", _rgb())  # no key file: not listed
    assert open_dataset(tmp_path).ids == ["1", "2", "10"]


# ------------------------------------------------------------------------------------------ DigestPath


def _digestpath(root: Path) -> Path:
    pos, neg = root / "tissue-train-pos-v1", root / "tissue-train-neg"
    _png(pos / "18-0001_1.jpg", _rgb())
    mask = np.zeros((H, W), np.uint8)
    mask[:, : W // 2] = 255
    _png(pos / "18-0001_1_mask.jpg", mask)
    _png(neg / "D201800101.jpg", _rgb(2))
    return root


def test_digestpath_positive_and_negative(tmp_path):
    root = _digestpath(tmp_path)
    assert detect_layout(root) == "digestpath"
    ds = open_dataset(root)
    assert sorted(ds.ids) == ["18-0001_1", "D201800101"] and ds.class_names == ("background", "lesion")
    pos = ds.load("18-0001_1")
    assert pos.semantic.dtype == np.uint8 and set(np.unique(pos.semantic)) == {0, 1}
    assert (pos.semantic[:, : W // 2 - 3] == 1).all() and (pos.semantic[:, W // 2 + 3 :] == 0).all()
    assert pos.meta["split"] == "pos" and pos.mpp is None
    neg = ds.load("D201800101")
    assert neg.meta["split"] == "neg" and not neg.semantic.any()
    assert open_dataset(root, include_negative=False).ids == ["18-0001_1"]
    assert open_dataset(root, mpp=0.475).load("18-0001_1").mpp == 0.475


def test_digestpath_mask_threshold_at_128(tmp_path):
    pos = tmp_path / "tissue-train-pos-v1"
    _png(pos / "a.jpg", _rgb())
    mask = np.zeros((H, W), np.uint8)
    mask[:, 20:] = 127
    mask[:, :20] = 128
    _png(pos / "a_mask.png", mask)  # lossless stand-in to check the exact threshold
    (pos / "a_mask.png").rename(pos / "a_mask.jpg")  # decoders go by content, not by extension
    s = open_dataset(tmp_path).load("a")
    assert (s.semantic[:, :20] == 1).all() and (s.semantic[:, 20:] == 0).all()


def test_digestpath_errors_name_the_file(tmp_path):
    root = _digestpath(tmp_path)
    pos = root / "tissue-train-pos-v1"
    _png(pos / "18-0001_1_mask.jpg", np.zeros((H + 2, W), np.uint8))
    with pytest.raises(ValueError, match=r"18-0001_1_mask\.jpg: mask shape \(34, 40\) does not match"):
        open_dataset(root).load("18-0001_1")
    (pos / "18-0001_1_mask.jpg").unlink()
    with pytest.raises(ValueError, match=r"18-0001_1_mask.*missing file"):
        open_dataset(root).load("18-0001_1")
    _png(pos / "orphan_mask.jpg", np.zeros((H, W), np.uint8))  # a mask without its image
    with pytest.raises(ValueError, match=r"'orphan'.*missing file"):
        open_dataset(root).load("orphan")
    _png(root / "tissue-train-neg" / "18-0001_1.jpg", _rgb())
    with pytest.raises(ValueError, match="both the positive and the negative folder"):
        open_dataset(root)


def test_digestpath_wins_over_generic_layouts(tmp_path):
    root = _digestpath(tmp_path)
    _png(root / "images" / "x.png", _rgb())
    _png(root / "instance_masks" / "x.png", np.zeros((H, W), np.uint8))
    assert detect_layout(root) == "digestpath"
