"""Fixtures for the widget tests: a tiny random backbone, sessions under tmp_path, fast predict settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from napari_metahistoseg.session import SESSIONS_ENV

from ._helpers import make_backbone


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
