"""Fixtures of the hardening tests: a tiny saved backbone, an adapted head, small valid image files."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

HOVER_CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle"]


def run_gen(gen: Generator[Any, Any, Any]) -> Any:
    """Run a progress generator to completion and return its value."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def save_tiny_backbone(path: Path, *, seed: int = 0, base_channels: int = 8) -> Path:
    """Save a tiny random backbone (base 8, depth 3, generic + HoVer heads) at ``path``; returns the stem."""
    import torch

    from napari_metahistoseg.checkpoints import save_model
    from napari_metahistoseg.config import ModelConfig
    from napari_metahistoseg.models import MetaHistoSegNet

    torch.manual_seed(seed)
    net = MetaHistoSegNet(ModelConfig(base_channels=base_channels, depth=3), {"generic": 2}, hover_types=5)
    save_model(net, path, head_classes={"generic": ["background", "foreground"], "hover": HOVER_CLASSES})
    return path


def support(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A small seeded support image ``(size, size, 3) uint8`` and labels (two painted squares, rest unknown)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    labels = np.full((size, size), 255, np.uint8)
    labels[2:8, 2:8] = 0
    labels[16:24, 16:24] = 1
    return image, labels


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_backbone(tmp_path_factory.mktemp("bb") / "bb")


@pytest.fixture(scope="session")
def other_backbone_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_backbone(tmp_path_factory.mktemp("bb_other") / "bb", seed=1)


@pytest.fixture(scope="session")
def tiny_backbone(tiny_backbone_dir: Path):
    from napari_metahistoseg import pipeline

    return pipeline.load_backbone(str(tiny_backbone_dir))


@pytest.fixture(scope="session")
def tiny_head(tiny_backbone):
    from napari_metahistoseg import pipeline
    from napari_metahistoseg.config import MAMLConfig

    image, labels = support()
    return run_gen(pipeline.adapt(tiny_backbone, [image], [labels], ["background", "cell"], cfg=MAMLConfig(steps=2)))


@pytest.fixture(scope="session")
def head_dir(tmp_path_factory: pytest.TempPathFactory, tiny_head) -> Path:
    path = tmp_path_factory.mktemp("head") / "h"
    tiny_head.save(path)
    return path


@pytest.fixture(scope="session")
def valid_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small valid files: RGB PNG, 16-bit greyscale TIFF (zlib), RGB TIFF (uncompressed), RGB JPEG."""
    import tifffile
    from PIL import Image

    d = tmp_path_factory.mktemp("valid_images")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    files = {"png": d / "rgb.png", "tif16": d / "grey16.tif", "tif": d / "rgb.tif", "jpg": d / "rgb.jpg"}
    Image.fromarray(rgb).save(files["png"])
    tifffile.imwrite(files["tif16"], rng.integers(0, 65536, (12, 10), dtype=np.uint16), compression="zlib")
    tifffile.imwrite(files["tif"], rgb, photometric="rgb")
    Image.fromarray(rgb).save(files["jpg"], quality=90)
    return files
