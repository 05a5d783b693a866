"""The image conversion rule of io.py, file reading errors, label images and point CSVs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage import io as skio

from napari_metahistoseg.data.io import read_mask, read_points_csv, read_rgb, to_rgb_uint8

RGB = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10

# ------------------------------------------------------------------------------------------ to_rgb_uint8


def test_uint8_rgb_unchanged():
    out = to_rgb_uint8(RGB)
    assert out.dtype == np.uint8 and np.array_equal(out, RGB) and out.flags.c_contiguous


@pytest.mark.parametrize(
    "grey", [np.array([[0, 7], [200, 255]], np.uint8), np.array([[[0], [7]], [[200], [255]]], np.uint8)]
)
def test_greyscale_replicated(grey):
    out = to_rgb_uint8(grey)
    assert out.shape == (2, 2, 3) and (out == np.array([[0, 7], [200, 255]])[..., None]).all()


def test_uint16_scaled_only_when_above_255():
    small = np.array([[0, 100, 255]], np.uint16)
    assert to_rgb_uint8(small)[..., 0].tolist() == [[0, 100, 255]]  # cast, not scaled
    big = np.array([[0, 32768, 65535]], np.uint16)
    assert to_rgb_uint8(big)[..., 0].tolist() == [[0, 128, 255]]  # / 65535 * 255, rounded


def test_signed_integers_shifted_without_overflow():
    out = to_rgb_uint8(np.array([[-128, 0, 127]], np.int8))
    assert out[..., 0].tolist() == [[0, 128, 255]]


def test_float_in_unit_range_scaled():
    out = to_rgb_uint8(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert out[..., 0].tolist() == [[0, 128, 255]]


def test_float_out_of_range_clipped_not_scaled():
    out = to_rgb_uint8(np.array([[-10.0, 100.4, 300.0]]))
    assert out[..., 0].tolist() == [[0, 100, 255]]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_float_nan_inf_rejected(bad):
    with pytest.raises(ValueError, match="NaN or inf"):
        to_rgb_uint8(np.array([[0.2, bad]]), source="x.tif")


def test_bool_is_0_or_255():
    assert to_rgb_uint8(np.array([[True, False]]))[..., 1].tolist() == [[255, 0]]


def test_rgba_composited_on_white():
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [0, 0, 0, 128]]], np.uint8)
    out = to_rgb_uint8(rgba)
    assert out.tolist() == [[[10, 20, 30], [255, 255, 255], [127, 127, 127]]]
    grey_alpha = np.array([[[0, 0], [100, 255]]], np.uint8)
    assert to_rgb_uint8(grey_alpha).tolist() == [[[255] * 3, [100] * 3]]


def test_channel_first_moved_last():
    cf = np.moveaxis(np.random.default_rng(0).integers(0, 255, (5, 6, 3), dtype=np.uint8), -1, 0)
    assert np.array_equal(to_rgb_uint8(cf), np.moveaxis(cf, 0, -1))
    cf4 = np.zeros((4, 5, 6), np.uint8)  # RGBA channel-first, fully transparent
    assert (to_rgb_uint8(cf4) == 255).all()
    ambiguous = np.zeros((3, 5, 3), np.uint8)  # last axis is 3: already channel-last, kept
    assert to_rgb_uint8(ambiguous).shape == (3, 5, 3)


@pytest.mark.parametrize(
    ("arr", "match"),
    [
        (np.zeros((2, 4, 4, 3), np.uint8), "multi-page"),
        (np.zeros((6, 4, 5), np.uint8), "expected a 2-D"),  # (4, 4, 5) would be channel-first RGBA
        (np.zeros((0, 4), np.uint8), "empty|not an image"),
        (np.zeros((2, 2), np.complex64), "unsupported dtype"),
        (np.array([[object()]]), "not an image"),
    ],
)
def test_unsupported_arrays(arr, match):
    with pytest.raises(ValueError, match=match):
        to_rgb_uint8(arr, source="thing.png")


# ------------------------------------------------------------------------------------------ read_rgb


def _save(path: Path, arr: np.ndarray) -> Path:
    if path.suffix in (".tif", ".tiff"):
        tifffile.imwrite(path, arr)
    else:
        skio.imsave(path, arr, check_contrast=False)
    return path


@pytest.mark.parametrize("ext", [".png", ".tif", ".bmp"])
def test_read_rgb_lossless_formats(tmp_path, ext):
    img = np.random.default_rng(1).integers(0, 255, (6, 7, 3), dtype=np.uint8)
    assert np.array_equal(read_rgb(_save(tmp_path / f"a{ext}", img)), img)


def test_read_rgb_uint16_grey_tiff(tmp_path):
    arr = np.array([[0, 65535], [1000, 32768]], np.uint16)
    out = read_rgb(_save(tmp_path / "g.tif", arr))
    assert out.shape == (2, 2, 3) and out[..., 0].tolist() == [[0, 255], [4, 128]]


def test_read_rgb_cmyk_tiff(tmp_path):
    cmyk = np.zeros((2, 2, 4), np.uint8)
    cmyk[0, 0] = (255, 0, 0, 0)  # cyan
    cmyk[1, 1, 3] = 255  # black
    tifffile.imwrite(tmp_path / "c.tif", cmyk, photometric="separated")
    out = read_rgb(tmp_path / "c.tif")
    assert out[0, 0].tolist() == [0, 255, 255] and out[1, 1].tolist() == [0, 0, 0] and out[0, 1].tolist() == [255] * 3


def test_read_rgb_multipage_tiff_reads_first_page(tmp_path):
    pages = np.stack([np.full((3, 3, 3), 10, np.uint8), np.full((3, 3, 3), 200, np.uint8)])
    with tifffile.TiffWriter(tmp_path / "m.tif") as tw:
        for p in pages:
            tw.write(p, photometric="rgb")
    assert (read_rgb(tmp_path / "m.tif") == 10).all()


@pytest.mark.parametrize("ext", [".png", ".tif", ".jpg"])
def test_truncated_file_names_the_file(tmp_path, ext):
    img = np.random.default_rng(2).integers(0, 255, (32, 40, 3), dtype=np.uint8)
    path = _save(tmp_path / f"cut{ext}", img)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"cut\{ext}: cannot read image"):
        read_rgb(path)


def test_empty_missing_and_junk_files(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"zero\.png: file is empty \(0 bytes\)"):
        read_rgb(tmp_path / "zero.png")
    with pytest.raises(ValueError, match=r"nothere\.png: file not found"):
        read_rgb(tmp_path / "nothere.png")
    (tmp_path / "junk.png").write_bytes(b"this is not an image at all")
    with pytest.raises(ValueError, match=r"junk\.png: cannot read image"):
        read_rgb(tmp_path / "junk.png")
    with pytest.raises(ValueError, match=r"zero\.png: file is empty"):
        read_mask(tmp_path / "zero.png")


# ------------------------------------------------------------------------------------------ read_mask


def test_read_mask_values_dtype_and_shape(tmp_path):
    m = np.array([[0, 1], [2, 300]], np.uint16)
    path = _save(tmp_path / "m.png", m)
    out = read_mask(path, shape=(2, 2))
    assert out.dtype == np.uint32 and out.tolist() == m.tolist()
    with pytest.raises(ValueError, match=r"m\.png: label image shape \(2, 2\) does not match the image shape \(2, 3\)"):
        read_mask(path, shape=(2, 3))
    with pytest.raises(ValueError, match=r"m\.png: label value 300 does not fit uint8"):
        read_mask(path, dtype=np.uint8)


def test_read_mask_rgb_labels(tmp_path):
    equal = np.repeat(np.array([[0, 3], [3, 0]], np.uint8)[..., None], 3, axis=2)
    assert read_mask(_save(tmp_path / "eq.png", equal)).tolist() == [[0, 3], [3, 0]]
    colour = equal.copy()
    colour[0, 0] = (255, 0, 0)
    with pytest.raises(ValueError, match=r"col\.png: label image has colour channels that differ"):
        read_mask(_save(tmp_path / "col.png", colour))


def test_read_mask_float_and_stack(tmp_path):
    assert read_mask(_save(tmp_path / "f.tif", np.array([[0.0, 2.0]], np.float32))).tolist() == [[0, 2]]
    with pytest.raises(ValueError, match=r"g\.tif: label image must hold integers"):
        read_mask(_save(tmp_path / "g.tif", np.array([[0.5, 2.0]], np.float32)))
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((3, 3, 5), np.uint8), photometric="minisblack", planarconfig="contig")
    with pytest.raises(ValueError, match=r"s\.tif: label image must be 2-D"):
        read_mask(tmp_path / "s.tif")


# ------------------------------------------------------------------------------------------ read_points_csv


def _csv(tmp_path: Path, text: str, name: str = "p.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text",
    [
        "row,col,class\n1.5,2,1\n3,4,2\n",
        "y,x,class\n1.5,2,1\n3,4,2\n",
        "x,y,label\n2,1.5,1\n4,3,2\n",  # x = column, whatever the column order
        "Col , Row,type\n2,1.5,1\n\n4,3,2\n",  # case, spaces and blank lines
    ],
)
def test_points_csv_headers(tmp_path, text):
    pts, cls = read_points_csv(_csv(tmp_path, text), shape=(10, 10))
    assert pts.dtype == np.float64 and pts.tolist() == [[1.5, 2.0], [3.0, 4.0]] and cls.tolist() == [1, 2]


def test_points_csv_napari_axes_and_default_class(tmp_path):
    pts, cls = read_points_csv(_csv(tmp_path, "index,axis-0,axis-1\n0,5,7\n1,6,8\n"))
    assert pts.tolist() == [[5.0, 7.0], [6.0, 8.0]] and cls.tolist() == [1, 1] and cls.dtype == np.int64
    pts, cls = read_points_csv(_csv(tmp_path, "row,col\n", name="empty.csv"))
    assert pts.shape == (0, 2) and cls.shape == (0,)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("row,col\n1,1\n10,2\n", r"line 3: point \(row=10.0, col=2.0\) lies outside the image of 10x10"),
        ("x,y\n1,1\n2,-1\n", r"line 3: point \(row=-1.0, col=2.0\) lies outside"),
        ("row,col\nnan,1\n", r"line 2: point has NaN/inf coordinates"),
        ("row,col\n1,inf\n", r"line 2: point has NaN/inf"),
        ("row,col\n1,1\n2,abc\n", r"line 3: cannot parse"),
        ("row,col,class\n1,1,-2\n", r"line 2: negative class -2"),
        ("a,b\n1,2\n", r"header must name row,col or x,y"),
        ("", r"empty points file"),
    ],
)
def test_points_csv_errors_name_file_and_line(tmp_path, text, match):
    with pytest.raises(ValueError, match=r"p\.csv: " + match):
        read_points_csv(_csv(tmp_path, text), shape=(10, 10))


def test_points_csv_missing_and_binary(tmp_path):
    with pytest.raises(ValueError, match=r"none\.csv: file not found"):
        read_points_csv(tmp_path / "none.csv")
    (tmp_path / "b.csv").write_bytes(b"\xff\xfe\x00\x81\x00row")
    with pytest.raises(ValueError, match=r"b\.csv: not a text CSV"):
        read_points_csv(tmp_path / "b.csv")
