"""The image reader (File → Open): µm per pixel from TIFF/OME/zarr metadata, slides lazy and multiscale, files it
does not handle left to other readers; and the Adapt widget's warning when an image's µm per pixel is unknown."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tifffile

from napari_metahistoseg._qt import jobs
from napari_metahistoseg._qt.layers import image_mpp, image_shape, image_source
from napari_metahistoseg._qt.reader import get_reader, read_image
from napari_metahistoseg.config import TilingConfig
from napari_metahistoseg.slide import label_window

from ._helpers import PLUGIN, small_demo

UM_PER_CM = 1e4


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_pyramid(path, img: np.ndarray, mpp: float, levels: int = 2, tile: int = 256) -> None:
    """A tiled pyramidal TIFF: level 0 with ``levels`` sub-IFDs, each half the previous, resolution in cm."""
    opts = {"tile": (tile, tile), "photometric": "rgb", "compression": "zlib"}
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, subifds=levels, resolution=(UM_PER_CM / mpp, UM_PER_CM / mpp), resolutionunit="CENTIMETER",
                 **opts)
        for k in range(1, levels + 1):
            tw.write(img[:: 2**k, :: 2**k], subfiletype=1, **opts)


def test_plain_rgb_tiff_opens_with_its_mpp(viewer, tmp_path):
    img = rgb(60, 80)
    path = tmp_path / "he.tif"
    tifffile.imwrite(path, img, photometric="rgb", resolution=(UM_PER_CM / 0.25, UM_PER_CM / 0.25),
                     resolutionunit="CENTIMETER")
    [layer] = viewer.open(path, plugin=PLUGIN)
    assert layer.name == "he" and layer.rgb and not layer.multiscale
    assert image_mpp(layer) == pytest.approx(0.25)
    assert isinstance(layer.data, np.ndarray)  # small: in memory, as the plugin processes it
    np.testing.assert_array_equal(layer.data, img)


def test_ome_tiff_mpp_from_physical_size(tmp_path):
    path = tmp_path / "he.ome.tif"
    tifffile.imwrite(path, rgb(40, 50), photometric="rgb",
                     metadata={"axes": "YXS", "PhysicalSizeX": 500.0, "PhysicalSizeXUnit": "nm"})
    [(_, kwargs, _)] = get_reader(str(path))(str(path))
    assert kwargs["name"] == "he" and kwargs["metadata"] == {"mpp": pytest.approx(0.5)}


@pytest.mark.parametrize("resolution", [None, (72, 72)])  # no tags; a 72 dpi default (352 µm/px: implausible)
def test_tiff_without_resolution_has_no_mpp(tmp_path, resolution):
    path = tmp_path / "nores.ome.tiff"
    kwargs = {"resolution": resolution, "resolutionunit": "INCH"} if resolution else {}
    tifffile.imwrite(path, rgb(40, 50), photometric="rgb", **kwargs)
    [(data, kwargs, kind)] = get_reader(str(path))(str(path))
    assert kind == "image" and kwargs["name"] == "nores" and "mpp" not in kwargs["metadata"]
    assert data.shape == (40, 50, 3) and data.dtype == np.uint8


def test_pyramid_opens_lazy_and_multiscale(tmp_path):
    img = rgb(512, 384)
    path = tmp_path / "slide.tif"
    write_pyramid(path, img, mpp=0.5, tile=64)
    [(data, kwargs, _)] = read_image(str(path), in_memory_max_mp=0.1)  # above the limit: lazy
    assert kwargs["multiscale"] and kwargs["rgb"] and kwargs["metadata"] == {"mpp": pytest.approx(0.5)}
    assert [d.shape for d in data] == [(512, 384, 3), (256, 192, 3), (128, 96, 3)]
    assert not isinstance(data[0], np.ndarray)
    np.testing.assert_array_equal(data[0][100:140, 30:90], img[100:140, 30:90])
    np.testing.assert_array_equal(data[2][10:20, 5:9], img[::4, ::4][10:20, 5:9])
    # at most the limit: read whole, single scale
    [(small, kwargs, _)] = read_image(str(path), in_memory_max_mp=1.0)
    assert isinstance(small, np.ndarray) and not kwargs["multiscale"]
    np.testing.assert_array_equal(small, img)


def test_svs_like_file_opens_with_its_levels_and_aperio_mpp(tmp_path):
    """Aperio's layout: tiled baseline with ``MPP = ...`` in its description, a stripped thumbnail, tiled levels."""
    img = rgb(512, 384, seed=2)
    path = tmp_path / "slide.svs"
    tiled = {"tile": (64, 64), "photometric": "rgb", "compression": "zlib", "metadata": None}
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, description="Aperio Image Library v12.0.0\n512x384 [0,0 512x384] (64x64) |AppMag = 40"
                                  "|MPP = 0.2527", **tiled)
        tw.write(img[::8, ::8], photometric="rgb", metadata=None)  # the thumbnail
        tw.write(img[::2, ::2], **tiled)
        tw.write(img[::4, ::4], **tiled)
    [(data, kwargs, _)] = get_reader(str(path))(str(path), in_memory_max_mp=0.1)
    assert kwargs["multiscale"] and kwargs["metadata"] == {"mpp": pytest.approx(0.2527)}
    assert [d.shape for d in data] == [(512, 384, 3), (256, 192, 3), (128, 96, 3)]
    np.testing.assert_array_equal(data[1][40:80, 0:50], img[::2, ::2][40:80, 0:50])


def test_slide_opens_through_napari_as_a_lazy_multiscale_layer(viewer, tmp_path):
    """A slide above TilingConfig.stream_above_mp: a multiscale layer whose level 0 is read region by region, and
    which the plugin's slide paths (streamed prediction, support windows) take as it is."""
    side = 4096  # 16.8 MP, just above the 16 MP limit
    img = np.zeros((side, side, 3), np.uint8)
    img[1000:1100, 2000:2300] = (200, 60, 120)
    path = tmp_path / "big.tiff"
    write_pyramid(path, img, mpp=0.25, levels=3)
    [layer] = viewer.open(path, plugin=PLUGIN)
    assert layer.multiscale and layer.rgb and image_mpp(layer) == pytest.approx(0.25)
    assert [tuple(d.shape) for d in layer.data] == [(side >> k, side >> k, 3) for k in range(4)]
    src = image_source(layer)
    assert not isinstance(src, np.ndarray) and hasattr(src, "read")  # streamed prediction reads it as it is
    assert image_shape(layer) == (side, side) and jobs.is_large(src, TilingConfig())
    labels = np.full((200, 400), 255, np.uint8)
    labels[50:60, 50:60] = 1
    win, win_labels = label_window(src, labels, 20, origin=(1000, 2000))
    assert win.shape == (50, 50, 3) and win_labels.shape == (50, 50)
    np.testing.assert_array_equal(win, img[1030:1080, 2030:2080])


def test_files_it_cannot_handle_get_none(tmp_path):
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"this is not a TIFF at all" * 10)
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((5, 32, 32), np.uint8))  # a z-stack
    fluo = tmp_path / "fluo.tif"
    tifffile.imwrite(fluo, np.zeros((6, 32, 32), np.uint16), photometric="minisblack", metadata={"axes": "CYX"})
    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG")
    empty_zarr = tmp_path / "empty.zarr"
    empty_zarr.mkdir()
    for p in (garbage, stack, fluo, png, empty_zarr, tmp_path / "missing.tif"):
        assert get_reader(str(p)) is None, p
    assert get_reader([str(garbage), str(stack)]) is None


def test_damaged_tiff_error_names_the_file(viewer, tmp_path):
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, rgb(256, 256), photometric="rgb", tile=(64, 64))
    path.write_bytes(path.read_bytes()[:5000])  # a cut download: the header is fine, the tiles are not there
    reader = get_reader(str(path))
    assert reader is not None  # a TIFF: this reader says what is wrong with it
    with pytest.raises(ValueError, match="cut.tif.*truncated"):
        reader(str(path))
    with pytest.raises(Exception, match="cut.tif"):
        viewer.open(path, plugin=PLUGIN)


def write_ngff(path, img_cyx: np.ndarray, mpp: float, levels: int = 2) -> None:
    """An OME-Zarr (NGFF 0.5) image of axes t, c, z, y, x with ``levels`` levels, scale in micrometres."""
    import zarr

    root = zarr.open_group(str(path), mode="w")
    datasets = []
    for k in range(levels):
        a = img_cyx[None, :, None, :: 2**k, :: 2**k]
        root.create_array(str(k), shape=a.shape, dtype=a.dtype, chunks=(1, 3, 1, 32, 32))[:] = a
        datasets.append({"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 1.0, 1.0, mpp * 2**k, mpp * 2**k]}]})
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}] + [
        {"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": datasets}]}


def test_ome_zarr_opens_with_its_mpp(viewer, tmp_path):
    img = rgb(96, 64, seed=1)
    path = tmp_path / "slide.ome.zarr"
    write_ngff(path, np.moveaxis(img, -1, 0), mpp=0.2527)
    assert get_reader(str(path)) is not None  # a directory
    [(data, kwargs, _)] = read_image(str(path), in_memory_max_mp=0.001)
    assert kwargs["multiscale"] and kwargs["metadata"]["mpp"] == pytest.approx(0.2527) and kwargs["name"] == "slide"
    assert [d.shape for d in data] == [(96, 64, 3), (48, 32, 3)]
    np.testing.assert_array_equal(data[1][:, :], img[::2, ::2])
    [layer] = viewer.open(path, plugin=PLUGIN)  # small: in memory
    assert image_mpp(layer) == pytest.approx(0.2527) and isinstance(layer.data, np.ndarray)
    np.testing.assert_array_equal(layer.data, img)


def test_plain_zarr_array_with_mpp_attribute(tmp_path):
    import zarr

    img = rgb(40, 30)
    path = tmp_path / "tile.zarr"
    zarr.open_array(str(path), mode="w", shape=img.shape, dtype=img.dtype, chunks=(16, 16, 3))[:] = img
    zarr.open_array(str(path), mode="r+").attrs["mpp"] = 0.5
    [(data, kwargs, _)] = get_reader(str(path))(str(path))
    assert kwargs["metadata"] == {"mpp": 0.5}
    np.testing.assert_array_equal(data, img)


@pytest.fixture
def adapt(viewer, backbone_path):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Adapt & predict")
    widget.settings.backbone_edit.setText(backbone_path)
    widget.settings.steps.setValue(1)
    widget.settings.instances.setChecked(False)
    widget.settings.tiling = TilingConfig(tile_px=128, halo_px=16)
    return widget


def run(qtbot, worker, widget) -> None:
    assert worker is not None
    qtbot.waitUntil(lambda: widget.runner.worker is not worker, timeout=60_000)


def _warnings_shown() -> tuple[list[str], Any]:
    from napari.utils.notifications import NotificationSeverity, notification_manager

    shown: list[str] = []

    def keep(event) -> None:
        if event.severity == NotificationSeverity.WARNING:
            shown.append(event.message)

    notification_manager.notification_ready.connect(keep)
    return shown, lambda: notification_manager.notification_ready.disconnect(keep)


def test_adapt_warns_when_the_mpp_is_unknown(viewer, qtbot, adapt, errors):
    img, *_ = small_demo(viewer)
    shown, stop = _warnings_shown()
    try:
        run(qtbot, adapt.run_adapt(predict=False), adapt)
        assert [m for m in shown if "µm per pixel" in m] == []  # the image says its mpp: nothing to warn about
        img.metadata = {k: v for k, v in img.metadata.items() if k != "mpp"}
        run(qtbot, adapt.run_adapt(), adapt)  # adapt, then predict: told once
        run(qtbot, adapt.run_predict(), adapt)  # predict alone: already told for this image (and live re-adapting
        # after every stroke would repeat it)
        img.name = "renamed tile"
        run(qtbot, adapt.run_predict(), adapt)  # another image: told
    finally:
        stop()
    assert errors == []
    told = [m for m in shown if "µm per pixel" in m]
    assert len(told) == 2 and told[1].startswith("renamed tile: ")
    assert told[0].startswith("tile: µm per pixel unknown — assuming 0.5 µm/px") and "Annotate support" in told[0]
