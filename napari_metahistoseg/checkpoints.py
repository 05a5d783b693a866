"""Checkpoints: safetensors weights + JSON description. No pickle is ever loaded.

* A **model checkpoint** ``<stem>.safetensors`` + ``<stem>.json``: architecture (ModelConfig), heads and their
  classes, learned inner learning rates, training data/recipe, commit, and the SHA-256 of the backbone
  weights (:func:`backbone_sha256`).
* An **exported head** ``<stem>.mhshead.safetensors`` + ``<stem>.mhshead.json``: one task head with its
  provenance (backbone hash, classes, colours, mpp, inner-loop settings, support summary) and the SHA-256 of
  the weights file; refused with a clear error for another backbone or a tampered file.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelConfig, from_dict, to_dict
from .models import MetaHistoSegNet, PixelHead

CHECKPOINT_FORMAT = "metahistoseg-model"
HEAD_FORMAT = "metahistoseg-head"
FORMAT_VERSION = 1


def git_commit() -> str | None:
    """Commit of the source tree (None when not in a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def backbone_sha256(model: MetaHistoSegNet) -> str:
    """SHA-256 over the backbone's parameters (sorted names, float32 little-endian bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.backbone.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes())
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
    os.replace(tmp, path)


def _atomic_write_json(obj: dict, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise ValueError(f"{path}: weights file not found")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: not a valid safetensors file, truncated or corrupt ({e})") from None


def _read_json(path: Path, fmt: str) -> dict:
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: description file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or d.get("format") != fmt:
        raise ValueError(f"{path}: 'format' must be {fmt!r}")
    return d


def stem_paths(path: str | os.PathLike, suffix: str = "") -> tuple[Path, Path]:
    """``(weights, json)`` paths for a checkpoint given either file or the common stem."""
    p = Path(path)
    name = p.name
    for ext in (".safetensors", ".json"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    if suffix and name.endswith(suffix):
        name = name[: -len(suffix)]
    base = p.with_name(name + suffix)
    return base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json")


# ------------------------------------------------------------------------------------------ models


def save_model(
    model: MetaHistoSegNet,
    path: str | os.PathLike,
    *,
    head_classes: dict[str, list[str]],
    inner_lrs: dict[str, torch.Tensor] | None = None,
    extra: dict | None = None,
    half: bool = False,
) -> Path:
    """Save a model (all heads) as safetensors + JSON; ``half`` stores float16 weights (loaded as float32)."""
    wpath, jpath = stem_paths(path)
    tensors = {k: (v.half() if half and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    for k, v in (inner_lrs or {}).items():
        tensors[f"inner_lr::{k}"] = v.detach().reshape(())
    _atomic_save_tensors(tensors, wpath)
    hover = model.heads["hover"] if "hover" in model.heads else None
    desc = {
        "format": CHECKPOINT_FORMAT,
        "version": FORMAT_VERSION,
        "model": to_dict(model.cfg),
        "heads": {k: {"classes": list(v)} for k, v in head_classes.items()},
        "hover_types": (hover.nc[-1].out_channels if hover is not None and hover.nc is not None else
                        (0 if hover is not None else None)),
        "backbone_sha256": backbone_sha256(model),
        "weights_sha256": file_sha256(wpath),
        "commit": git_commit(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    _atomic_write_json(desc, jpath)
    return wpath


def load_model(path: str | os.PathLike) -> tuple[MetaHistoSegNet, dict, dict[str, torch.Tensor]]:
    """Load ``(model, description, inner_lrs)`` on CPU, strictly. Raises ValueError naming the file."""
    wpath, jpath = stem_paths(path)
    desc = _read_json(jpath, CHECKPOINT_FORMAT)
    cfg = from_dict(ModelConfig, desc.get("model", {}), source=f"{jpath}: model")
    heads = desc.get("heads")
    if not isinstance(heads, dict):
        raise ValueError(f"{jpath}: field 'heads' missing or not an object")
    tensors = _load_tensors(wpath)
    if desc.get("weights_sha256") and file_sha256(wpath) != desc["weights_sha256"]:
        raise ValueError(f"{wpath}: SHA-256 does not match {jpath.name} (file modified or corrupt)")
    lrs = {k.split("::", 1)[1]: v.float() for k, v in tensors.items() if k.startswith("inner_lr::")}
    state = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items() if "::" not in k}
    model = MetaHistoSegNet(cfg, {k: len(v["classes"]) for k, v in heads.items() if k != "hover"},
                            hover_types=desc.get("hover_types"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{wpath}: weights do not match the architecture in {jpath.name} ({e})") from None
    model.eval()
    return model, desc, lrs


# ------------------------------------------------------------------------------------------ heads


def export_head(
    path: str | os.PathLike,
    head_state: dict[str, torch.Tensor],
    *,
    backbone_sha: str,
    classes: list[str],
    provenance: dict,
    colours: list[str] | None = None,
) -> tuple[Path, Path]:
    """Write an adapted head (``head_state`` keys relative to the head module) with provenance."""
    wpath, jpath = stem_paths(path, ".mhshead")
    _atomic_save_tensors(head_state, wpath)
    desc = {
        "format": HEAD_FORMAT,
        "version": FORMAT_VERSION,
        "backbone_sha256": backbone_sha,
        "classes": list(classes),
        "colours": colours,
        "weights_sha256": file_sha256(wpath),
        "commit": git_commit(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "provenance": provenance,
    }
    _atomic_write_json(desc, jpath)
    return wpath, jpath


def import_head(path: str | os.PathLike, *, backbone_sha: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an exported head, check its SHA-256 and (if given) that it was made for ``backbone_sha``."""
    wpath, jpath = stem_paths(path, ".mhshead")
    desc = _read_json(jpath, HEAD_FORMAT)
    for key in ("backbone_sha256", "classes", "weights_sha256"):
        if key not in desc:
            raise ValueError(f"{jpath}: field {key!r} missing")
    if not isinstance(desc["classes"], list) or len(desc["classes"]) < 2:
        raise ValueError(f"{jpath}: 'classes' must list at least 2 class names")
    if not wpath.exists():
        raise ValueError(f"{wpath}: weights file not found")
    if file_sha256(wpath) != desc["weights_sha256"]:
        raise ValueError(f"{wpath}: SHA-256 does not match {jpath.name} (file modified, tampered or truncated)")
    if backbone_sha is not None and desc["backbone_sha256"] != backbone_sha:
        raise ValueError(
            f"{jpath}: this head was adapted on backbone {desc['backbone_sha256'][:12]}…, not on the loaded "
            f"backbone {backbone_sha[:12]}…; load the matching backbone or adapt a new head"
        )
    return _load_tensors(wpath), desc


def head_from_state(state: dict[str, torch.Tensor], in_channels: int, n_classes: int, hidden: int) -> PixelHead:
    """Build a :class:`PixelHead` and load ``state`` strictly (clear error on mismatch)."""
    head = PixelHead(in_channels, n_classes, hidden)
    try:
        head.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise ValueError(f"head weights do not fit a {in_channels}->{n_classes} head: {e}") from None
    return head


def flatten_optimizer(opt: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    """Adam state as flat tensors ``opt::<param>::<key>`` (for safetensors resume files)."""
    out = {}
    for p, st in opt.state.items():
        n = names[id(p)]
        for k, v in st.items():
            out[f"opt::{n}::{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def restore_optimizer(opt: torch.optim.Optimizer, names: dict[int, str], flat: dict[str, torch.Tensor]) -> None:
    by_name = {names[id(p)]: p for g in opt.param_groups for p in g["params"]}
    for key, v in flat.items():
        _, n, k = key.split("::")
        if n in by_name:
            opt.state[by_name[n]][k] = v

