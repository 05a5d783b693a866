"""Export / import head: round trip with provenance, refusal for another backbone, the *.mhshead.json reader."""

from __future__ import annotations

import json

import pytest

from napari_metahistoseg._qt.io import get_reader
from napari_metahistoseg.config import MAMLConfig

from ._helpers import PLUGIN


@pytest.fixture
def adapted(backbone_path):
    """An adapted head on the tiny backbone (core generator run synchronously)."""
    import numpy as np

    from napari_metahistoseg.data.synthetic import synthetic_tile
    from napari_metahistoseg.pipeline import adapt, load_backbone

    tile = synthetic_tile((64, 64), seed=2)
    labels = np.where(tile.semantic > 0, 1, 0).astype(np.uint8)
    gen = adapt(load_backbone(backbone_path), [tile.image], [labels], ["background", "nucleus"],
                cfg=MAMLConfig(steps=1), devices="cpu")
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            head = stop.value
            head.colours = ["#000000", "#ff0000"]
            return head


@pytest.fixture
def heads(viewer, backbone_path):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Export / import head")
    widget.state.backbone_spec = backbone_path
    return widget


def test_export_then_import(heads, adapted, tmp_path, errors):
    heads.state.set_head(adapted, "adapted")
    assert "background, nucleus" in heads.info.text()
    jpath = heads.export_head(tmp_path / "mine")
    assert jpath.name == "mine.mhshead.json" and jpath.exists()
    desc = json.loads(jpath.read_text())
    assert desc["backbone_sha256"] == adapted.backbone_sha256 and desc["colours"] == ["#000000", "#ff0000"]
    assert desc["provenance"]["maml"]["steps"] == 1 and "support" in desc["provenance"]
    heads.state.set_head(None, "")
    loaded = heads.import_head(jpath)
    assert errors == [] and loaded.classes == ["background", "nucleus"] and loaded.colours == adapted.colours
    assert heads.state.head is loaded and heads.state.head_source == str(jpath)


def test_head_for_another_backbone_is_refused(heads, adapted, tmp_path, errors, other_backbone_path):
    jpath = adapted.save(tmp_path / "h")[1]
    heads.backbone_edit.setText(other_backbone_path)
    assert heads.import_head(jpath) is None
    assert "adapted on backbone" in errors[-1] and heads.state.head is None


def test_tampered_and_missing_files(heads, adapted, tmp_path, errors):
    wpath, jpath = adapted.save(tmp_path / "h")
    wpath.write_bytes(wpath.read_bytes()[:-8])
    assert heads.import_head(jpath) is None and "SHA-256" in errors[-1]
    assert heads.import_head(tmp_path / "nothing.mhshead.json") is None and "not found" in errors[-1]
    assert heads.export_head(tmp_path / "x") is None and "no adapted head" in errors[-1]


def test_reader_loads_head_into_plugin(viewer, heads, adapted, tmp_path):
    jpath = adapted.save(tmp_path / "r")[1]
    assert get_reader(str(tmp_path / "r.tif")) is None and get_reader([str(jpath), str(jpath)]) is None
    reader = get_reader(str(jpath))
    assert reader(str(jpath)) == [(None,)]
    assert heads.state.head is not None and heads.state.head.backbone_sha256 == adapted.backbone_sha256


def test_open_head_file_in_napari(viewer, heads, adapted, tmp_path):
    jpath = adapted.save(tmp_path / "o")[1]
    viewer.open(str(jpath), plugin=PLUGIN)
    assert len(viewer.layers) == 0 and heads.state.head is not None
