"""Per-viewer plugin state shared by the dock widgets: backbone choice, the adapted head, the session store."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from psygnal import Signal

from ..pipeline import WEIGHTS, AdaptedHead, Backbone, load_backbone
from ..session import SessionStore

if TYPE_CHECKING:
    import napari

_STATES: dict[int, PluginState] = {}


def bundled_backbone_available() -> bool:
    return (WEIGHTS / "backbone.safetensors").exists() and (WEIGHTS / "backbone.json").exists()


def default_backbone_spec() -> str:
    """``"default"`` when the bundled backbone is installed, else ``""`` (the user must choose a file)."""
    return "default" if bundled_backbone_available() else ""


class PluginState:
    """What the widgets of one viewer share. ``head_changed`` fires with the new head (or None)."""

    head_changed = Signal(object)
    backbone_changed = Signal(str)

    def __init__(self) -> None:
        self._backbone_spec = default_backbone_spec()
        self.head: AdaptedHead | None = None
        self.head_source = ""  # "adapted", "session" or the file a head was imported from
        self.store = SessionStore()
        self._autosaver = None

    @property
    def autosaver(self):  # -> _qt.session.Autosaver (created on first use: it is a QObject)
        if self._autosaver is None:
            from .session import Autosaver

            self._autosaver = Autosaver(lambda: self.store)
        return self._autosaver

    @property
    def backbone_spec(self) -> str:
        return self._backbone_spec

    @backbone_spec.setter
    def backbone_spec(self, spec: str) -> None:
        spec = str(spec).strip()
        if spec != self._backbone_spec:
            self._backbone_spec = spec
            self.backbone_changed.emit(spec)

    def backbone(self) -> Backbone:
        """Load (cached by the pipeline) the chosen backbone; ValueError with a clear message otherwise."""
        spec = self._backbone_spec
        if not spec:
            raise ValueError("no backbone chosen and no bundled backbone installed "
                             f"({WEIGHTS / 'backbone.safetensors'} is missing): choose a backbone file")
        return load_backbone(spec)

    def set_head(self, head: AdaptedHead | None, source: str) -> None:
        self.head = head
        self.head_source = source
        self.head_changed.emit(head)


def state_for(viewer: napari.Viewer) -> PluginState:
    """The state of ``viewer`` (created on first use, dropped when the viewer is garbage collected). napari hands
    plugins a proxy of the viewer (a new one per widget): the state is keyed by the viewer behind it."""
    while hasattr(viewer, "__wrapped__"):
        viewer = viewer.__wrapped__
    key = id(viewer)
    if key not in _STATES:
        _STATES[key] = PluginState()
        weakref.finalize(viewer, _STATES.pop, key, None)
        _STATES[key].autosaver.attach(viewer)  # any plugin widget open: every support annotation is autosaved
    return _STATES[key]
