"""Shared pytest configuration: the dev-data fixture, GPU auto-skip, Qt marking, hypothesis settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ENV = "METAHISTOSEG_DATA"


def shared_data_dir() -> Path:
    """Folder of the shared development data: ``$METAHISTOSEG_DATA`` if set, else ``<repo>/../shared/data``.

    A plain function (not only a fixture) so that ``parametrize`` lists can be built from it at collection time.
    """
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser().resolve() if env else (REPO_ROOT / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of the shared development data; the test is skipped only if that folder does not exist."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared development data not found at {path} (set {DATA_ENV} to its folder)")
    return path


@pytest.fixture(scope="module")
def small_backbone(tmp_path_factory):
    """A tiny random backbone (base 8, depth 3, the generic head, no HoVer types) saved and loaded as a checkpoint."""
    import torch

    from napari_metahistoseg.checkpoints import save_model
    from napari_metahistoseg.config import ModelConfig
    from napari_metahistoseg.models import MetaHistoSegNet
    from napari_metahistoseg.pipeline import load_backbone

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bb") / "bb"
    save_model(MetaHistoSegNet(ModelConfig(base_channels=8, depth=3), {"generic": 2}, hover_types=0), path,
               head_classes={"generic": ["background", "foreground"]})
    return load_backbone(str(path))


try:  # no deadlines: the test machines are small and shared, so timing-based failures would be noise
    from hypothesis import settings

    settings.register_profile("metahistoseg", deadline=None, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "metahistoseg"))
except ImportError:  # hypothesis is a testing extra
    pass


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests under tests/_qt as ``qt``; skip ``gpu`` tests when CUDA is not available."""
    qt_dir = REPO_ROOT / "tests" / "_qt"
    for item in items:
        if qt_dir in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.qt)
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch  # only imported when a gpu test was collected

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
        for item in gpu_items:
            item.add_marker(skip)
