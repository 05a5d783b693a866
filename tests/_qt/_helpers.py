"""Helpers for the widget tests: the plugin name, a tiny random backbone, a small demo session."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
