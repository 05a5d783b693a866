"""One place that resolves devices: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or device sets."""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
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


def with_intra_op_threads(n: int, fn, *args):
    """``fn(*args)`` with ``n`` torch intra-op threads in the calling thread (the OpenMP thread count is per thread,
    so a worker thread that runs one CPU shard or tile of several side by side sets its own)."""
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return fn(*args)


# ------------------------------------------------------------------------------------------------ CPU allocator

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc refuses larger values on 64-bit
_malloc_keep: float | None = None
_malloc_lock = threading.Lock()


def tune_cpu_allocator(keep_mb: float) -> bool:
    """glibc only: serve allocations up to 32 MB from the heap and keep up to ``keep_mb`` MB of freed memory
    there instead of handing it back to the OS (``mallopt`` ``M_MMAP_THRESHOLD`` / ``M_TRIM_THRESHOLD``).

    Tiled CPU inference allocates and frees the same tens of MB of activations for every tile; by default glibc
    maps and unmaps them each time, and every first touch of the fresh pages is a page fault. Keeping them made
    1024² prediction 35 % faster on the 2-core dev VM at the same peak RSS (BENCHMARKS.md). Process-wide; applied
    once per value; ``keep_mb <= 0`` leaves malloc alone. Returns whether the setting is in effect (False on
    platforms without glibc's ``mallopt``).
    """
    global _malloc_keep
    if keep_mb <= 0:
        return False
    with _malloc_lock:
        if _malloc_keep == keep_mb:
            return True
        mallopt = _mallopt()
        if mallopt is None:
            return False
        ok = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and \
            bool(mallopt(_M_TRIM_THRESHOLD, int(min(keep_mb, 2**31 / 2**20 - 1) * 2**20)))
        if ok:
            _malloc_keep = keep_mb
            log.debug("malloc: allocations <= 32 MB from the heap, up to %.0f MB of freed memory kept", keep_mb)
        return ok


def _mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).mallopt  # the C library this process already uses (absent on musl)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn
