"""Faults: a process killed mid-save never corrupts the previous save; out-of-memory falls back or says so.

Crash safety is shown twice: in-process, by snapshotting the folder at every ``os.replace`` of a save (every
moment a kill could leave behind) and loading each snapshot; and for real, by SIGKILLing subprocesses that save
repeatedly (at a random moment, and at the most delicate moment: right after a checkpoint's JSON was committed).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_metahistoseg.checkpoints import export_head, import_head, load_model, save_model
from napari_metahistoseg.config import ModelConfig, TilingConfig
from napari_metahistoseg.data import Sample, open_dataset, save_unified
from napari_metahistoseg.models import MetaHistoSegNet
from napari_metahistoseg.resilience import (
    OOMFallbackConfig,
    is_out_of_memory,
    oom_fallback_gen,
    smaller_tiling,
    with_oom_fallback,
)
from napari_metahistoseg.tiling import predict_tiled

REPO = Path(__file__).resolve().parents[2]
CLASSES = {"generic": ["background", "foreground"]}


def _net(value: float) -> MetaHistoSegNet:
    net = MetaHistoSegNet(ModelConfig(base_channels=4, depth=2, groups=2, head_hidden=0), {"generic": 2})
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(value)
    return net


def _head_state(value: float) -> dict[str, torch.Tensor]:
    return {"net.0.weight": torch.full((2, 4, 1, 1), value), "net.0.bias": torch.full((2,), value)}


def _samples(value: int) -> list[Sample]:
    sem = np.full((6, 7), 255, np.uint8)
    sem[:2], sem[4:] = 0, 1
    return [Sample(np.full((6, 7, 3), value + i, np.uint8), "t", f"s{i}", semantic=sem,
                   instances=(sem == 1).astype(np.uint32), points=np.array([[1.0, float(value % 7)]]))
            for i in range(2)]


def _model_version(stem: Path) -> float:
    model, desc, _ = load_model(stem)
    values = {float(v) for p in model.parameters() for v in p.detach().unique()}
    assert len(values) == 1, "weights mix two saves"
    return values.pop()


def _head_version(stem: Path) -> float:
    state, _ = import_head(stem)
    values = {float(v) for t in state.values() for v in t.unique()}
    assert len(values) == 1, "head mixes two saves"
    return values.pop()


def _unified_version(folder: Path) -> set[int]:
    ds = open_dataset(folder)
    versions = set()
    for s in ds:
        versions.add(int(s.image[0, 0, 0]) - int(s.sample_id[1:]))
        assert s.semantic is not None and s.instances is not None and s.points is not None
    return versions


def _snapshots_during(save, folder: Path, snap_root: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Run ``save()`` and copy ``folder`` before and after every ``os.replace`` it makes."""
    real_replace = os.replace
    snaps: list[Path] = []

    def snap() -> None:
        dst = snap_root / f"snap{len(snaps):02d}"
        shutil.copytree(folder, dst)
        snaps.append(dst)

    def replace(src, dst, *a, **k):
        snap()
        real_replace(src, dst, *a, **k)
        snap()

    monkeypatch.setattr(os, "replace", replace)
    try:
        save()
    finally:
        monkeypatch.setattr(os, "replace", real_replace)
    return snaps


def test_every_crash_point_leaves_a_loadable_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    save_model(_net(1.0), work / "bb", head_classes=CLASSES)
    export_head(work / "h", _head_state(1.0), backbone_sha="a" * 64, classes=["a", "b"], provenance={})
    save_unified(_samples(10), work / "u")

    cases = [
        (lambda: save_model(_net(2.0), work / "bb", head_classes=CLASSES), lambda d: _model_version(d / "bb")),
        (lambda: export_head(work / "h", _head_state(2.0), backbone_sha="a" * 64, classes=["a", "b"], provenance={}),
         lambda d: _head_version(d / "h")),
        (lambda: save_unified(_samples(20), work / "u"), lambda d: _unified_version(d / "u")),
    ]
    for k, (save, version) in enumerate(cases):
        snaps = _snapshots_during(save, work, tmp_path / f"case{k}", monkeypatch)
        assert len(snaps) >= 6
        seen = [version(s) for s in snaps]
        old, new = (1.0, 2.0) if k < 2 else ({10}, {20})
        assert seen[0] == old and seen[-1] == new and version(work) == new
        for v in seen:  # every intermediate state loads, as one of the two saves (or per sample, for folders)
            assert v in (old, new) if k < 2 else v <= {10, 20}, seen


_CHILD_MODULE = textwrap.dedent('''
    """Saves repeatedly (mode "loop") or kills itself right after a checkpoint JSON commit (mode "commit")."""
    import os, signal, sys
    from pathlib import Path
    import numpy as np, torch
    from napari_metahistoseg.checkpoints import export_head, save_model
    from napari_metahistoseg.config import ModelConfig
    from napari_metahistoseg.data import Sample, save_unified
    from napari_metahistoseg.models import MetaHistoSegNet

    def net(v):
        n = MetaHistoSegNet(ModelConfig(base_channels=4, depth=2, groups=2, head_hidden=0), {"generic": 2})
        with torch.no_grad():
            for p in n.parameters():
                p.fill_(v)
        return n

    def samples(v):
        sem = np.full((6, 7), 255, np.uint8); sem[:2] = 0; sem[4:] = 1
        return [Sample(np.full((6, 7, 3), v + i, np.uint8), "t", f"s{i}", semantic=sem,
                       instances=(sem == 1).astype(np.uint32), points=np.array([[1.0, float(v % 7)]]))
                for i in range(2)]

    def save_all(work, v):
        save_model(net(float(v)), work / "bb", head_classes={"generic": ["background", "foreground"]})
        export_head(work / "h", {"net.0.weight": torch.full((2, 4, 1, 1), float(v)),
                                 "net.0.bias": torch.full((2,), float(v))},
                    backbone_sha="a" * 64, classes=["a", "b"], provenance={})
        save_unified(samples(10 + v), work / "u")

    def run(work, mode):
        work = Path(work)
        save_all(work, 1)
        print("READY", flush=True)
        if mode == "commit":
            real = os.replace
            def replace(src, dst):
                real(src, dst)
                if str(dst).endswith("bb.json"):
                    os.kill(os.getpid(), signal.SIGKILL)  # the new JSON is committed, its weights still pending
            os.replace = replace
            save_all(work, 2)
            return
        v = 2
        while True:
            save_all(work, v)
            print(f"SAVED {v}", flush=True)
            v += 1

    if __name__ == "__main__":
        run(sys.argv[1], sys.argv[2])
''')


def _start_child(tmp_path: Path, mode: str) -> subprocess.Popen:
    script = tmp_path / "faults_child.py"
    script.write_text(_CHILD_MODULE)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(work), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def _check_loads(work: Path) -> tuple[float, float, set[int]]:
    m, h, u = _model_version(work / "bb"), _head_version(work / "h"), _unified_version(work / "u")
    assert m >= 1 and h >= 1 and u and min(u) >= 11
    return m, h, u


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL is POSIX only")
def test_sigkill_during_repeated_saves(tmp_path: Path) -> None:
    proc = _start_child(tmp_path, "loop")
    try:
        saved = 0
        while saved < 2:  # let a couple of complete rounds happen, then kill mid-round
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            if line.startswith("SAVED"):
                saved += 1
        time.sleep(float(np.random.default_rng().uniform(0.0, 0.05)))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    _check_loads(tmp_path / "work")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL is POSIX only")
def test_sigkill_right_after_json_commit(tmp_path: Path) -> None:
    proc = _start_child(tmp_path, "commit")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    work = tmp_path / "work"
    assert (work / "bb.safetensors.pending").exists()  # killed between the JSON commit and the last rename
    assert json.loads((work / "bb.json").read_text())["weights_sha256"] != ""
    m, h, _ = _check_loads(work)
    assert m == 2.0 and h == 1.0  # the committed new model (read from the pending file); the head untouched
    save_model(_net(3.0), work / "bb", head_classes=CLASSES)  # the next save completes normally
    assert _model_version(work / "bb") == 3.0 and not (work / "bb.safetensors.pending").exists()


# ------------------------------------------------------------------------------------------------ out of memory


def _oom(cuda: bool = True) -> Exception:
    if cuda and hasattr(torch, "OutOfMemoryError"):
        return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return RuntimeError("[enforce fail at alloc_cpu.cpp:114] DefaultCPUAllocator: can't allocate memory: you tried "
                        "to allocate 1 bytes. Error code 12 (Cannot allocate memory) out of memory")


def test_is_out_of_memory() -> None:
    assert is_out_of_memory(_oom(True)) and is_out_of_memory(_oom(False))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_fallback_halves_batch_then_tile() -> None:
    tried: list[tuple[int, int, int]] = []

    def fn(cfg: TilingConfig) -> str:
        tried.append((cfg.tile_px, cfg.batch_size, cfg.halo_px))
        if cfg.tile_px * cfg.batch_size > 128:
            raise _oom(len(tried) % 2 == 0)  # both kinds of OOM error are handled
        return "ok"

    assert with_oom_fallback(fn, TilingConfig(tile_px=512, halo_px=32, batch_size=4)) == "ok"
    assert tried == [(512, 4, 32), (512, 2, 32), (512, 1, 32), (256, 1, 32), (128, 1, 32)]


def test_fallback_gives_up_clearly_at_the_floor() -> None:
    calls = []

    def fn(cfg: TilingConfig):
        calls.append(cfg)
        raise _oom()

    with pytest.raises(ValueError, match=r"out of memory even at the smallest tiling \(tile_px=64, batch_size=1; "
                                         r"started at tile_px=256, batch_size=2\)"):
        with_oom_fallback(fn, TilingConfig(tile_px=256, halo_px=40, batch_size=2))
    assert [(c.tile_px, c.batch_size) for c in calls] == [(256, 2), (256, 1), (128, 1), (64, 1)]
    assert calls[-1].halo_px == 31  # shrunk with the tile: 2 * halo < tile
    with pytest.raises(ValueError, match="tile_px=100, batch_size=3"):
        with_oom_fallback(fn, TilingConfig(tile_px=100, halo_px=8, batch_size=3),
                          fallback=OOMFallbackConfig(min_tile_px=100, min_batch_size=3))


def test_other_errors_are_not_retried() -> None:
    calls = []

    def fn(cfg: TilingConfig):
        calls.append(cfg)
        raise RuntimeError("Expected 4-dimensional input")

    with pytest.raises(RuntimeError, match="4-dimensional"):
        with_oom_fallback(fn, TilingConfig())
    assert len(calls) == 1
    assert smaller_tiling(TilingConfig(tile_px=64, halo_px=8, batch_size=1)) is None


def test_generator_fallback_with_predict_tiled() -> None:
    """A forward that runs out of memory above 16x16 px per batch: the result equals a direct run at 16 px."""
    image = np.random.default_rng(0).integers(0, 256, (40, 37, 3), dtype=np.uint8)
    seen = []

    def forward(x: torch.Tensor) -> dict[str, torch.Tensor]:
        seen.append(tuple(x.shape))
        if x.shape[0] * x.shape[-1] * x.shape[-2] > 16 * 16:
            raise _oom()
        return {"img": x}

    def run(cfg: TilingConfig):
        return predict_tiled(forward, image, cfg=cfg, devices=[torch.device("cpu")], channels={"img": 3})

    gen = oom_fallback_gen(run, TilingConfig(tile_px=32, halo_px=4, batch_size=2),
                           fallback=OOMFallbackConfig(min_tile_px=16))
    progress = []
    while True:
        try:
            progress.append(next(gen))
        except StopIteration as stop:
            out = stop.value
            break
    assert progress and progress[-1]["done"] == progress[-1]["total"]
    assert max(h * w * b for b, _, h, w in seen[-3:]) <= 16 * 16
    assert np.array_equal(np.rint(np.moveaxis(out["img"], 0, -1) * 255).astype(np.uint8), image)
