"""Fixtures for the widget tests: a tiny random backbone, sessions under tmp_path, fast predict settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_metahistoseg.session import SESSIONS_ENV

PLUGIN = "napari-metahistoseg"
HOVER_NAMES = ["other", "inflammatory", "epithelial", "spindle", "necrosis"]


def make_backbone(path: Path, seed: int = 0) -> str:
    import torch

    from napari_metahistoseg.checkpoints import save_model
    from napari_metahistoseg.config import ModelConfig
    from napari_metahistoseg.models import MetaHistoSegNet

    torch.manual_seed(seed)
    model = MetaHistoSegNet(ModelConfig(base_channels=8, depth=3), {"generic": 2}, hover_types=5)
    save_model(model, path, head_classes={"generic": ["background", "foreground"], "hover": HOVER_NAMES})
    return str(path)


@pytest.fixture(scope="session")
def backbone_path(tmp_path_factory) -> str:
    return make_backbone(tmp_path_factory.mktemp("bb") / "tiny")


@pytest.fixture(scope="session")
def other_backbone_path(tmp_path_factory) -> str:
    return make_backbone(tmp_path_factory.mktemp("bb2") / "other", seed=1)


@pytest.fixture(autouse=True)
def _sessions_in_tmp(monkeypatch, tmp_path) -> Path:
    root = tmp_path / "sessions"
    monkeypatch.setenv(SESSIONS_ENV, str(root))
    return root


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


@pytest.fixture
def errors() -> list[str]:
    """Messages of the error notifications shown while the test runs."""
    from napari.utils.notifications import NotificationSeverity, notification_manager

    shown: list[str] = []

    def keep(event) -> None:
        if event.severity == NotificationSeverity.ERROR:
            shown.append(event.message)

    notification_manager.notification_ready.connect(keep)
    yield shown
    notification_manager.notification_ready.disconnect(keep)


def small_demo(viewer, seed: int = 0, size: int = 128):
    """A 128x128 synthetic tile with demo strokes, added the way the sample does (layer tuples)."""
    from napari_metahistoseg import sample_data as sd
    from napari_metahistoseg.data.synthetic import synthetic_tile

    tile = synthetic_tile((size, size), seed=seed, mpp=0.5)
    support = sd.demo_strokes(tile.semantic, tile.instances, seed=seed)
    assert {0, 1} <= set(np.unique(support))
    img = viewer.add_image(tile.image, name="tile", rgb=True, metadata={"mpp": 0.5, "seed": seed})
    colours = sd.class_colours(2)
    meta = {sd.META: {"kind": "support", "classes": ["background", "nucleus"], "colours": colours,
                      "group": "g0", "image": "tile"}}
    sup = viewer.add_labels(sd.support_to_layer(support), name="support", metadata=meta,
                            colormap=sd.labels_colormap(colours, offset=1))
    truth = viewer.add_labels(tile.semantic, name="truth", metadata={sd.META: {"kind": "truth"}})
    return img, sup, truth, tile
