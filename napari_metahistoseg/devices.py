"""One place that resolves devices: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or device sets."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)


def available_devices() -> list[str]:
    """Devices usable here, CPU first: ``["cpu", "cuda:0", ..., "mps"]`` (for the GUI's device checkboxes)."""
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devs.append("mps")
    return devs


def device_label(device: str) -> str:
    """Human label for a device: ``"cuda:0 (NVIDIA H100, 80 GB)"``."""
    d = torch.device(device)
    if d.type == "cuda":
        p = torch.cuda.get_device_properties(d)
        return f"{device} ({p.name}, {p.total_memory / 2**30:.0f} GiB)"
    return device


def get_device(spec: str = "auto") -> torch.device:
    """Resolve one device; a clear ``ValueError`` if it is not available (never a silent CPU fallback)."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device(available_devices()[1] if len(available_devices()) > 1 else "cpu")
    try:
        d = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"unknown device {spec!r}; available: {', '.join(available_devices())}") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available; available: "
                             f"{', '.join(available_devices())}")
        idx = d.index if d.index is not None else 0
        if idx >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", idx)
    if d.type == "mps" and "mps" not in available_devices():
        raise ValueError("device 'mps' requested but MPS is not available")
    if d.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device type {d.type!r}")
    return d


def resolve_devices(spec: str | Sequence[str] | None) -> list[torch.device]:
    """A device set from ``"cpu"``, ``"cuda:0,cuda:1"``, a list, or ``None`` (= ``["auto"]``).
    Duplicates are allowed (``["cpu", "cpu"]`` exercises the multi-device path on one machine)."""
    if spec is None:
        items = ["auto"]
    elif isinstance(spec, str):
        items = [s for s in spec.split(",") if s.strip()]
    else:
        items = [str(s) for s in spec]
    if not items:
        raise ValueError("empty device set")
    devs = [get_device(s) for s in items]
    log.info("using device set %s", [str(d) for d in devs])
    return devs
