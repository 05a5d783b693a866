"""Reader for exported heads (``*.mhshead.json``): dropping one on napari loads it into the plugin.

The head is checked against the backbone chosen in the plugin (a head made for another backbone is refused
with a clear notification) and its provenance is shown. No layer is added (napari's ``[(None,)]`` sentinel).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from napari.utils.notifications import show_error, show_info

from ..pipeline import AdaptedHead
from .state import state_for
from .workers import error_text

HEAD_SUFFIX = ".mhshead.json"


def head_summary(head: AdaptedHead) -> str:
    """A few lines describing a head and where it came from."""
    prov = head.provenance or {}
    sup = prov.get("support") or []
    px = sum(int(s.get("labelled_px", 0)) for s in sup)
    lines = [f"classes: {', '.join(head.classes)}",
             f"backbone: {head.backbone_sha256[:12]}… ({prov.get('backbone', '?')})",
             f"mode: {head.maml.adapt}, {head.maml.steps} steps, inner lr {head.maml.inner_lr:g}",
             f"mpp: {head.mpp:g} µm/px", f"support: {len(sup)} image(s), {px} labelled pixels"]
    return "\n".join(lines)


def load_head_into(viewer: Any, path: str | Path) -> AdaptedHead | None:
    """Load the head at ``path`` for ``viewer``'s backbone; notify and return None when refused."""
    state = state_for(viewer)
    try:
        head = AdaptedHead.load(path, state.backbone())
    except ValueError as e:
        show_error(error_text(f"Loading head {Path(path).name}", e))
        return None
    state.set_head(head, str(path))
    show_info(f"Head loaded from {Path(path).name}\n{head_summary(head)}")
    return head


def _read_head(path: str | list[str]) -> list[tuple]:
    import napari

    path = path[0] if isinstance(path, list) else path
    viewer = napari.current_viewer()
    if viewer is None:
        try:
            desc = json.loads(Path(path).read_text())
            show_info(f"{Path(path).name}: head for classes {desc.get('classes')} (open a viewer to use it)")
        except (OSError, ValueError) as e:
            show_error(f"{path}: cannot read head description ({e})")
    else:
        load_head_into(viewer, path)
    return [(None,)]


def get_reader(path: str | list[str]) -> Any:
    """napari reader hook: a reader for one ``*.mhshead.json`` file, else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    return _read_head if str(path).endswith(HEAD_SUFFIX) else None
