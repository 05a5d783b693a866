"""Lazy large-image reading: only the needed tiles are decoded, mpp from metadata, the conversion rules, errors."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

from napari_metahistoseg import slide
from napari_metahistoseg.data.io import to_rgb_uint8
from napari_metahistoseg.slide import LazyImage, create_outputs, open_image


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


@pytest.fixture
def tiled_tiff(tmp_path):
    a = rgb(640, 576)
    path = tmp_path / "tiled.tif"
    tifffile.imwrite(path, a, tile=(64, 64), photometric="rgb", compression="zlib")
    return path, a


@pytest.fixture
def chunk_reads(monkeypatch):
    """Chunk keys the TIFF zarr store decodes (metadata keys excluded)."""
    from tifffile.zarr import ZarrTiffStore

    keys: list[str] = []
    orig = ZarrTiffStore.get

    async def counting(self, key, *args, **kwargs):
        if not key.endswith((".zarray", ".zattrs", ".zgroup", "zarr.json")):
            keys.append(key)
        return await orig(self, key, *args, **kwargs)

    monkeypatch.setattr(ZarrTiffStore, "get", counting)
    return keys


def test_tiled_tiff_region_reads_only_the_needed_tiles(tiled_tiff, chunk_reads):
    path, a = tiled_tiff
    with open_image(path) as img:
        assert img.shape == (640, 576, 3) and img.dtype == np.uint8
        chunk_reads.clear()
        region = img[100:180, 200:300]  # rows 64..191 (2 tile rows) x cols 192..319 (2 tile columns)
        np.testing.assert_array_equal(region, a[100:180, 200:300])
        assert len(set(chunk_reads)) == 4, chunk_reads
        chunk_reads.clear()
        np.testing.assert_array_equal(img.read(0, 0, 64, 64), a[:64, :64])
        assert len(set(chunk_reads)) == 1


def test_lazy_image_indexing(tiled_tiff):
    path, a = tiled_tiff
    img = open_image(path)
    np.testing.assert_array_equal(img[5], a[5])
    np.testing.assert_array_equal(img[:, 7], a[:, 7])
    np.testing.assert_array_equal(img[-10:, -20:-5, 1], a[-10:, -20:-5, 1])
    np.testing.assert_array_equal(img[10:50:3, 0:40:4], a[10:50:3, 0:40:4])
    assert img[600:700, 570:600].shape == (40, 6, 3)  # clipped like numpy
    assert img[100:50, :].shape[0] == 0
    with pytest.raises(IndexError):
        img[700]
    img.close()


@pytest.mark.parametrize("kwargs,expected", [
    ({"resolution": (1 / 0.25e-4, 1 / 0.25e-4), "resolutionunit": "CENTIMETER"}, 0.25),
    ({"resolution": (25400 / 0.5, 25400 / 0.5), "resolutionunit": "INCH"}, 0.5),
    ({"resolution": (72, 72), "resolutionunit": "INCH"}, None),  # a 72 dpi default is not a microscope's mpp
    ({"description": "Aperio Image Library v12.0.5\n512x512 [0,0 512x512] |AppMag = 40|MPP = 0.2527|"}, 0.2527),
    ({}, None),
])
def test_mpp_from_tiff_metadata(tmp_path, kwargs, expected):
    path = tmp_path / "m.tif"
    tifffile.imwrite(path, rgb(32, 32), photometric="rgb", **kwargs)
    assert open_image(path).mpp == (pytest.approx(expected) if expected else None)


@pytest.mark.parametrize("size,unit,expected", [(0.5, "µm", 0.5), (250.0, "nm", 0.25)])
def test_mpp_from_ome_tiff(tmp_path, size, unit, expected):
    path = tmp_path / "m.ome.tif"
    tifffile.imwrite(path, rgb(64, 64), tile=(32, 32), photometric="rgb",
                     metadata={"axes": "YXS", "PhysicalSizeX": size, "PhysicalSizeXUnit": unit})
    assert open_image(path).mpp == pytest.approx(expected)
    assert open_image(path, mpp=0.3).mpp == 0.3  # an explicit mpp wins


def test_pyramidal_tiff_reads_level_zero(tmp_path):
    a = rgb(256, 320)
    path = tmp_path / "pyr.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(a, tile=(64, 64), photometric="rgb", subifds=1)
        tw.write(a[::2, ::2], tile=(64, 64), photometric="rgb", subfiletype=1)
    img = open_image(path)
    assert img.shape == (256, 320, 3)
    np.testing.assert_array_equal(img[30:90, 100:200], a[30:90, 100:200])


def test_planar_uint16_tiff_follows_the_conversion_rule(tmp_path):
    b = (np.random.default_rng(1).random((3, 100, 120)) * 4000).astype(np.uint16)
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, b, planarconfig="separate", photometric="rgb", tile=(32, 32))
    img = open_image(path)
    np.testing.assert_array_equal(np.asarray(img), to_rgb_uint8(b))
    np.testing.assert_array_equal(img[10:20, 30:70], to_rgb_uint8(b)[10:20, 30:70])


@pytest.mark.parametrize("make", [
    lambda: (np.random.default_rng(2).random((70, 90)) * 255).astype(np.uint8),  # greyscale
    lambda: rgb(70, 90, 3).repeat(1, 0)[..., [0, 1, 2, 0]],  # RGBA: composited onto white
    lambda: np.random.default_rng(4).random((70, 90, 3)).astype(np.float32),  # floats in [0, 1]
    lambda: (np.random.default_rng(5).random((70, 90, 3)) * 300 - 100).astype(np.int16),  # negative ints
])
def test_arrays_follow_to_rgb_uint8(make):
    a = make()
    img = open_image(a)
    np.testing.assert_array_equal(np.asarray(img), to_rgb_uint8(a))
    np.testing.assert_array_equal(img[5:40, 11:60], to_rgb_uint8(a)[5:40, 11:60])


def test_large_image_value_range_is_decided_once(monkeypatch):
    """Above SMALL_IMAGE_PX the range comes from sampled windows; every tile is then scaled the same way."""
    monkeypatch.setattr(slide, "SMALL_IMAGE_PX", 100)
    a = np.full((200, 200, 3), 100, np.uint16)
    a[:40, :40] = 60000  # values above 255 in one corner only: the whole image is scaled by 65535
    img = LazyImage(a, layout="yxc", name="big")
    assert img[150:160, 150:160].max() == round(100 / 65535 * 255)


def test_zarr_array_and_group(tmp_path):
    a = rgb(150, 130)
    z = zarr.open_array(str(tmp_path / "a.zarr"), mode="w", shape=a.shape, chunks=(64, 64, 3), dtype="uint8")
    z[:] = a
    z.attrs["mpp"] = 0.5
    img = open_image(tmp_path / "a.zarr")
    assert img.mpp == 0.5
    np.testing.assert_array_equal(img[20:100, 3:77], a[20:100, 3:77])
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    g.create_array("0", shape=(3, 150, 130), chunks=(3, 64, 64), dtype="uint8")[:] = np.moveaxis(a, -1, 0)
    g.attrs["multiscales"] = [{"axes": [{"name": "c"}, {"name": "y", "unit": "micrometer"},
                                        {"name": "x", "unit": "micrometer"}],
                               "datasets": [{"path": "0", "coordinateTransformations": [
                                   {"type": "scale", "scale": [1, 0.25, 0.25]}]}]}]
    img = open_image(tmp_path / "g.zarr")
    assert img.mpp == 0.25 and img.shape == (150, 130, 3)
    np.testing.assert_array_equal(img[:, :], a)


def test_png_is_read_fully(tmp_path):
    import imageio.v3 as iio

    a = rgb(40, 50)
    iio.imwrite(tmp_path / "x.png", a)
    img = open_image(tmp_path / "x.png")
    assert img.mpp is None
    np.testing.assert_array_equal(img[:, :], a)


# ------------------------------------------------------------------------------------------ bad input


def test_missing_empty_and_garbage_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        open_image(tmp_path / "nope.tif")
    (tmp_path / "empty.tif").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.tif: file is empty"):
        open_image(tmp_path / "empty.tif")
    (tmp_path / "garbage.tif").write_bytes(b"not a tiff at all" * 10)
    with pytest.raises(ValueError, match=r"garbage.tif: cannot read TIFF"):
        open_image(tmp_path / "garbage.tif")


def test_truncated_tiff_is_reported_at_open(tiled_tiff):
    path, _ = tiled_tiff
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"tiled.tif: TIFF is truncated"):
        open_image(path)


def test_corrupt_tile_is_reported_when_read(tiled_tiff):
    path, _ = tiled_tiff
    with tifffile.TiffFile(path) as tf:
        off = int(tf.pages[0].dataoffsets[5])
    data = bytearray(path.read_bytes())
    data[off:off + 64] = b"\xff" * 64  # break one zlib tile
    path.write_bytes(bytes(data))
    img = open_image(path)
    np.asarray(img[:64, :64])  # other tiles still read
    with pytest.raises(ValueError, match=r"tiled.tif: cannot read region .* corrupt or truncated"):
        img[:64, 5 * 64:6 * 64]


def test_wrong_channels_and_zero_size(tmp_path):
    tifffile.imwrite(tmp_path / "five.tif", np.zeros((40, 40, 5), np.uint8), photometric="minisblack",
                     planarconfig="contig")
    with pytest.raises(ValueError, match=r"five.tif: expected a greyscale, RGB or RGBA image"):
        open_image(tmp_path / "five.tif")
    with pytest.raises(ValueError, match="empty"):
        open_image(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="expected a 2-D greyscale"):
        open_image(np.zeros((4, 5, 6, 7), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        open_image(np.full((8, 8), np.nan, np.float32))[:, :]


def test_create_outputs(tmp_path):
    root = create_outputs(tmp_path / "o.zarr", (100, 70), {"semantic": ((), "uint8"), "hv": ((2,), "int8")},
                          chunk_px=32, attrs={"mpp": 0.5})
    assert root["semantic"].shape == (100, 70) and root["semantic"].chunks == (32, 32)
    assert root["hv"].shape == (2, 100, 70) and root["hv"].chunks == (2, 32, 32)
    assert root.attrs["complete"] is False and root.attrs["mpp"] == 0.5


@pytest.mark.parametrize("shape", [(301, 517), (64, 64), (40, 300)])
def test_label_pyramid_keeps_every_other_pixel(tmp_path, shape):
    root = create_outputs(tmp_path / "o.zarr", shape, {"lab": ((), "uint32")}, chunk_px=48)
    lab = np.random.default_rng(0).integers(0, 1000, shape).astype(np.uint32)
    root["lab"][:] = lab
    levels = slide.write_pyramid(root, "lab", min_side_px=50, strip_mb=0.001)  # strips of a few rows
    side = max(shape)
    assert len(levels) == max(0, int(np.ceil(np.log2(side / 50))))  # halve until the longer side is <= 50
    for k, lvl in enumerate(levels, start=1):
        assert np.array_equal(lvl[:], lab[:: 2**k, :: 2**k]) and lvl.dtype == np.uint32
    assert max(slide.pyramid(root, "lab")[-1].shape) <= 50 and slide.pyramid(root, "lab")[0] is not None
    again = slide.write_pyramid(root, "lab", min_side_px=0)  # replaced: none left
    assert again == [] and len(slide.pyramid(root, "lab")) == 1


def test_label_pyramid_of_a_region_equals_the_whole(tmp_path):
    shape = (301, 517)
    root = create_outputs(tmp_path / "o.zarr", shape, {"lab": ((), "uint8")}, chunk_px=48)
    lab = np.zeros(shape, np.uint8)
    lab[37:201, 101:333] = np.random.default_rng(1).integers(1, 9, (164, 232))  # labels in an odd-placed region
    root["lab"][:] = lab
    part = [lv[:] for lv in slide.write_pyramid(root, "lab", min_side_px=20, strip_mb=0.002,
                                                 region=(37, 101, 201, 333))]
    whole = [lv[:] for lv in slide.write_pyramid(root, "lab", min_side_px=20)]
    assert len(part) == len(whole) == 5 and all(np.array_equal(a, b) for a, b in zip(part, whole, strict=True))
