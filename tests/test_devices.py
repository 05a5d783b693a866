"""Device resolution and the CPU allocator setting."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from napari_metahistoseg import devices
from napari_metahistoseg.config import TilingConfig
from napari_metahistoseg.devices import get_device, resolve_devices, tune_cpu_allocator


def test_resolve_cpu_sets_and_refuse_missing_gpus():
    assert resolve_devices("cpu") == [torch.device("cpu")]
    assert get_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError):
            get_device("cuda:0")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_cpu_allocator_tuning_is_applied_once_per_value(monkeypatch):
    calls = []
    real = devices._mallopt()
    if real is None:
        pytest.skip("no glibc mallopt here (musl?)")

    def spy():
        def fn(param, value):
            calls.append((param, value))
            return real(param, value)
        return fn

    monkeypatch.setattr(devices, "_mallopt", spy)
    monkeypatch.setattr(devices, "_malloc_keep", None)
    assert tune_cpu_allocator(128.0) is True
    assert calls == [(-3, 32 * 2**20), (-1, 128 * 2**20)]
    assert tune_cpu_allocator(128.0) is True and len(calls) == 2  # already in effect
    assert tune_cpu_allocator(0) is False and len(calls) == 2  # 0 leaves malloc alone
    # a CPU tile runner applies the configured value
    from napari_metahistoseg.tiling import TileRunner

    TileRunner([lambda x: {"seg": x}], [torch.device("cpu")], TilingConfig(malloc_keep_mb=64.0), {"seg": 3})
    assert calls[-1] == (-1, 64 * 2**20)
    out = TileRunner([lambda x: {"seg": x}], [torch.device("cpu")], TilingConfig(malloc_keep_mb=0), {"seg": 3})(
        np.zeros((1, 8, 8, 3), np.uint8))
    assert out["seg"].shape == (1, 3, 8, 8) and len(calls) == 4
    with pytest.raises(ValueError, match="malloc_keep_mb"):
        TilingConfig(malloc_keep_mb=-1)
