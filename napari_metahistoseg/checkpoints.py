"""Checkpoints: safetensors weights + JSON description. No pickle is ever loaded.

* A **model checkpoint** ``<stem>.safetensors`` + ``<stem>.json``: architecture (ModelConfig), heads and their
  classes, learned inner learning rates, training data/recipe, commit, and the SHA-256 of the backbone
  weights (:func:`backbone_sha256`).
* An **exported head** ``<stem>.mhshead.safetensors`` + ``<stem>.mhshead.json``: one task head with its
  provenance (backbone hash, classes, colours, mpp, inner-loop settings, support summary) and the SHA-256 of
  the weights file; refused with a clear error for another backbone or a tampered file.

Every reader raises ``ValueError`` naming the file and the problem (missing, truncated, not safetensors, SHA-256
mismatch, a description with missing or ill-typed fields, weights that do not fit the described network or
hold NaN/inf). Saving is crash-safe: the weights go to ``<weights>.pending`` first, the JSON (naming the pending
file's SHA-256) then replaces the old JSON atomically, and only then is the pending file renamed over the old
weights. A process killed at any point leaves a pair that loads: the old one, or the new JSON whose weights the
readers find in the ``.pending`` file when the last rename did not happen.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
import subprocess
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelConfig, from_dict, to_dict
from .models import MetaHistoSegNet, PixelHead

FILE_MODE = 0o644  # mkstemp creates 0600 files; saved weights are meant to be shared
CHECKPOINT_FORMAT = "metahistoseg-model"
HEAD_FORMAT = "metahistoseg-head"
FORMAT_VERSION = 1
_LIST_AT_MOST = 3  # mismatching tensor names listed in an error message

log = logging.getLogger(__name__)


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
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_json(obj: dict, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pending_path(wpath: Path) -> Path:
    return wpath.with_name(wpath.name + ".pending")


def _save_pair(tensors: dict[str, torch.Tensor], wpath: Path, jpath: Path, desc: dict) -> None:
    """Write weights + JSON crash-safely (module docstring); ``desc`` gets the weights' ``weights_sha256``."""
    pending = _pending_path(wpath)
    _atomic_save_tensors(tensors, pending)
    desc["weights_sha256"] = file_sha256(pending)
    _atomic_write_json(desc, jpath)  # the commit point
    os.replace(pending, wpath)


def _verified_weights(wpath: Path, jpath: Path, expected: object) -> Path:
    """The weights file whose SHA-256 is ``expected`` (``wpath``, or its ``.pending`` file after an interrupted
    save); ``wpath`` unchecked when ``expected`` is None; else ValueError."""
    if expected is not None and not isinstance(expected, str):
        raise ValueError(f"{jpath}: 'weights_sha256' must be a string, got {type(expected).__name__}")
    pending = _pending_path(wpath)
    if not wpath.exists() and not (expected and pending.exists()):
        raise ValueError(f"{wpath}: weights file not found")
    if not expected or (wpath.exists() and file_sha256(wpath) == expected):
        return wpath
    if pending.exists() and file_sha256(pending) == expected:
        log.warning("%s: the last save was interrupted; reading its complete weights from %s", wpath, pending.name)
        return pending
    raise ValueError(f"{wpath}: SHA-256 does not match {jpath.name} (file modified, tampered or truncated)")


def _load_tensors(path: Path, *, name: Path | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file on CPU (never pickle); ``name`` is the path shown in errors."""
    name = name or path
    if not path.exists():
        raise ValueError(f"{name}: weights file not found")
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as e:
        raise ValueError(f"{name}: not a valid safetensors file, truncated or corrupt ({e})") from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{name}: weights contain NaN or inf ({_some(bad)})")
    return tensors


def _some(names: list[str] | set[str]) -> str:
    names = sorted(names)
    more = f" and {len(names) - _LIST_AT_MOST} more" if len(names) > _LIST_AT_MOST else ""
    return ", ".join(names[:_LIST_AT_MOST]) + more


def _read_json(path: Path, fmt: str) -> dict:
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: description file not found") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a folder, not a description file") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or d.get("format") != fmt:
        raise ValueError(f"{path}: 'format' must be {fmt!r}")
    return d


def _is_names(v: object, at_least: int) -> bool:
    return isinstance(v, list) and len(v) >= at_least and all(isinstance(c, str) for c in v)


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
    hover = model.heads["hover"] if "hover" in model.heads else None
    desc = {
        "format": CHECKPOINT_FORMAT,
        "version": FORMAT_VERSION,
        "model": to_dict(model.cfg),
        "heads": {k: {"classes": list(v)} for k, v in head_classes.items()},
        "hover_types": (hover.nc[-1].out_channels if hover is not None and hover.nc is not None else
                        (0 if hover is not None else None)),
        "backbone_sha256": backbone_sha256(model),
        "weights_sha256": None,  # set by _save_pair
        "commit": git_commit(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    _save_pair(tensors, wpath, jpath, desc)
    return wpath


def load_model(path: str | os.PathLike) -> tuple[MetaHistoSegNet, dict, dict[str, torch.Tensor]]:
    """Load ``(model, description, inner_lrs)`` on CPU, strictly. Raises ValueError naming the file."""
    wpath, jpath = stem_paths(path)
    desc = _read_json(jpath, CHECKPOINT_FORMAT)
    cfg = from_dict(ModelConfig, desc.get("model", {}), source=f"{jpath}: model")
    heads = desc.get("heads")
    if not isinstance(heads, dict) or not all(
        isinstance(v, dict) and _is_names(v.get("classes"), 0 if k == "hover" else 2) for k, v in heads.items()
    ):
        raise ValueError(f"{jpath}: field 'heads' must map each head name to {{\"classes\": [at least 2 names]}}")
    hover = desc.get("hover_types")
    if hover is not None and (not isinstance(hover, int) or isinstance(hover, bool) or hover < 0):
        raise ValueError(f"{jpath}: field 'hover_types' must be null or an integer >= 0, got {hover!r}")
    if not isinstance(desc.get("backbone_sha256"), str):
        raise ValueError(f"{jpath}: field 'backbone_sha256' missing or not a string")
    source = _verified_weights(wpath, jpath, desc.get("weights_sha256"))
    tensors = _load_tensors(source, name=wpath)
    lrs = {k.split("::", 1)[1]: v.float() for k, v in tensors.items() if k.startswith("inner_lr::")}
    state = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items() if "::" not in k}
    n_classes = {k: len(v["classes"]) for k, v in heads.items() if k != "hover"}
    levels = {k.split(".")[2] for k in state if k.startswith("backbone.encoders.") and k.count(".") >= 3}
    if cfg.depth != len(levels):  # checked first: the network's size grows exponentially with its depth
        raise ValueError(f"{jpath}: describes a network of depth {cfg.depth} but {wpath.name} holds "
                         f"{len(levels)} encoder levels")
    try:  # build on the meta device first: a tampered description cannot allocate a huge network
        with torch.device("meta"):
            skeleton = MetaHistoSegNet(cfg, n_classes, hover_types=hover)
    except (RuntimeError, TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"{jpath}: cannot build the network it describes ({e})") from None
    _check_fits(skeleton.state_dict(), state, f"{wpath}: weights do not match the network described in {jpath.name}")
    try:
        model = MetaHistoSegNet(cfg, n_classes, hover_types=hover)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"{jpath}: cannot build the network it describes ({e})") from None
    model.eval()
    return model, desc, lrs


def _check_fits(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], what: str) -> None:
    """ValueError ``what`` listing missing, unexpected and wrongly shaped tensors (if any)."""
    missing, unexpected = set(expected) - set(got), set(got) - set(expected)
    shapes = {k for k in set(expected) & set(got) if tuple(expected[k].shape) != tuple(got[k].shape)}
    parts = [f"{label} {_some(names)}" for label, names in
             (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if names]
    if parts:
        raise ValueError(f"{what} ({'; '.join(parts)})")


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
    desc = {
        "format": HEAD_FORMAT,
        "version": FORMAT_VERSION,
        "backbone_sha256": backbone_sha,
        "classes": list(classes),
        "colours": colours,
        "weights_sha256": None,  # set by _save_pair
        "commit": git_commit(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "provenance": provenance,
    }
    _save_pair(head_state, wpath, jpath, desc)
    return wpath, jpath


def import_head(path: str | os.PathLike, *, backbone_sha: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an exported head, check its SHA-256 and (if given) that it was made for ``backbone_sha``."""
    wpath, jpath = stem_paths(path, ".mhshead")
    desc = _read_json(jpath, HEAD_FORMAT)
    for key in ("backbone_sha256", "classes", "weights_sha256"):
        if key not in desc:
            raise ValueError(f"{jpath}: field {key!r} missing")
    if not _is_names(desc["classes"], 2):
        raise ValueError(f"{jpath}: 'classes' must list at least 2 class names")
    _check_head_fields(desc, jpath)
    source = _verified_weights(wpath, jpath, desc["weights_sha256"])
    if backbone_sha is not None and desc["backbone_sha256"] != backbone_sha:
        raise ValueError(
            f"{jpath}: this head was adapted on backbone {desc['backbone_sha256'][:12]}…, not on the loaded "
            f"backbone {backbone_sha[:12]}…; load the matching backbone or adapt a new head"
        )
    return _load_tensors(source, name=wpath), desc


def _check_head_fields(desc: dict, jpath: Path) -> None:
    """ValueError naming ``jpath`` for ill-typed fields of an exported head's description."""
    for key in ("backbone_sha256", "weights_sha256"):
        if not isinstance(desc[key], str):
            raise ValueError(f"{jpath}: field {key!r} must be a string, got {type(desc[key]).__name__}")
    if desc.get("colours") is not None and not _is_names(desc["colours"], 0):
        raise ValueError(f"{jpath}: 'colours' must be null or a list of colour strings")
    prov = desc.get("provenance")
    if prov is None:
        return
    if not isinstance(prov, dict):
        raise ValueError(f"{jpath}: 'provenance' must be an object, got {type(prov).__name__}")
    mpp = prov.get("mpp")
    if "mpp" in prov and (isinstance(mpp, bool) or not isinstance(mpp, (int, float)) or not math.isfinite(mpp)
                            or mpp <= 0):
        raise ValueError(f"{jpath}: 'provenance.mpp' must be a number > 0 (µm per pixel), got {mpp!r}")
    if "maml" in prov and not isinstance(prov["maml"], dict):
        raise ValueError(f"{jpath}: 'provenance.maml' must be an object, got {type(prov['maml']).__name__}")
    sig = prov.get("colour_sigmas_um")
    if sig is not None and not (isinstance(sig, list) and sig and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in sig)):
        raise ValueError(f"{jpath}: 'provenance.colour_sigmas_um' must be null or a list of sigmas >= 0 (µm) of the "
                         f"head's colour inputs, got {sig!r}")


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
        if n in by_name:  # moments next to their parameter (a run resumed on another device); Adam's step stays
            p = by_name[n]
            if k == "step":
                opt.state[p][k] = v
            elif v.shape == p.shape:  # a moment: the parameter's device and memory layout (a channels-last run)
                opt.state[p][k] = torch.empty_like(p).copy_(v)
            else:
                opt.state[p][k] = v.to(p.device)

