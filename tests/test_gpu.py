"""The CUDA paths, against the CPU: prediction (fp32 and bf16, tiles blended on the GPU), streamed slides, head and
decoder adaptation on device sets mixing GPUs and the CPU, mitosis patches, and a training run resumed on another
device. Marked ``gpu``: skipped where ``torch.cuda.is_available()`` is False (CI); run on a lent GPU with
``pytest -m gpu tests/test_gpu.py`` (``scripts/gpu_check.sh`` does it with the GPU benchmarks)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from napari_metahistoseg import tiling as tiling_mod
from napari_metahistoseg.config import MAMLConfig, MitosisConfig, TilingConfig
from napari_metahistoseg.data.synthetic import synthetic_tile
from napari_metahistoseg.inference import predict, predict_large
from napari_metahistoseg.maml import adapt_head_on_pixels
from napari_metahistoseg.models import PixelHead
from napari_metahistoseg.pipeline import AdaptedHead, adapt, initial_head, load_backbone

pytestmark = pytest.mark.gpu
TILING = TilingConfig(tile_px=256, halo_px=32, batch_size=4)


@pytest.fixture(autouse=True)
def exact_fp32():
    """Full fp32 convolutions and matrix products on the GPU (no TF32), so CUDA and CPU can be compared closely."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


@pytest.fixture(scope="module")
def bundled():
    return load_backbone("default")


@pytest.fixture(scope="module")
def tile():
    return synthetic_tile((600, 520), seed=5, mpp=0.5)


@pytest.fixture(scope="module")
def head(bundled):
    return AdaptedHead(["background", "nucleus"], initial_head(bundled, 2), bundled.sha256, MAMLConfig(),
                       bundled.mpp)


def _run(gen):
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


def test_prediction_on_the_gpu_equals_the_cpu(bundled, head, tile, monkeypatch):
    cpu = _run(predict(bundled, head, tile.image, devices="cpu", tiling=TILING))
    seen = []
    real = tiling_mod.blend_device
    monkeypatch.setattr(tiling_mod, "blend_device", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    gpu = _run(predict(bundled, head, tile.image, devices="cuda:0", tiling=TILING))
    monkeypatch.undo()
    assert seen == [torch.device("cuda", 0)]  # blended on the GPU
    np.testing.assert_allclose(gpu.probs, cpu.probs, atol=2e-3)
    assert (gpu.semantic == cpu.semantic).mean() > 0.999
    host = _run(predict(bundled, head, tile.image, devices="cuda:0",
                        tiling=dataclasses.replace(TILING, device_blend_max_mb=0)))
    np.testing.assert_allclose(host.probs, gpu.probs, atol=1e-5)


def test_bf16_prediction_agrees_with_fp32(bundled, head, tile):
    fp32 = _run(predict(bundled, head, tile.image, devices="cuda:0", tiling=TILING))
    bf16 = _run(predict(bundled, head, tile.image, devices="cuda:0",
                        tiling=dataclasses.replace(TILING, autocast_bf16=True)))
    assert bf16.probs.dtype == np.float32
    assert (bf16.semantic == fp32.semantic).mean() > 0.98
    assert np.abs(bf16.probs - fp32.probs).mean() < 0.02


def test_instances_and_streamed_slides_on_the_gpu(bundled, head, tile, tmp_path):
    import zarr

    mem = _run(predict(bundled, head, tile.image, devices="cuda:0", tiling=TILING, instances=True))
    cpu = _run(predict(bundled, head, tile.image, devices="cpu", tiling=TILING, instances=True))
    assert mem.instances.max() > 0 and abs(int(mem.instances.max()) - int(cpu.instances.max())) <= 2
    res = _run(predict_large(bundled, head, tile.image, out_dir=tmp_path / "s.zarr", mpp=0.5, devices="cuda:0",
                             tiling=TILING))
    sem = zarr.open_group(str(res.store), mode="r")["semantic"][:]
    assert (sem == mem.semantic).mean() > 0.999


def test_head_adaptation_on_gpu_and_mixed_device_sets_equals_cpu(bundled, tile):
    lab = tile.semantic.copy()
    cfg = MAMLConfig(steps=5, colour_check=False)
    heads = {d: _run(adapt(bundled, [tile.image], [lab], ["background", "nucleus"], devices=d, cfg=cfg))
             for d in ("cpu", "cuda:0", "cuda:0,cpu", "cuda:0,cuda:0")}
    for d, h in heads.items():
        assert h.provenance["devices"] == d.split(",")
        for k, v in heads["cpu"].state.items():
            assert h.state[k].device.type == "cpu"  # heads come back on the CPU, to save and share
            torch.testing.assert_close(h.state[k], v, atol=2e-3, rtol=2e-3, msg=f"{d}: {k}")


def test_pixel_inner_loop_sharded_over_gpu_and_cpu_equals_one_device():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3000, 16, generator=g), torch.randint(0, 3, (3000,), generator=g)
    head = PixelHead(16, 3, 32)
    init = {k: v.detach().clone() for k, v in head.named_parameters()}
    one = _run(adapt_head_on_pixels(head, init, x, y, n_classes=3, steps=4, lr=0.3, devices=["cpu"]))
    for devs in (["cuda:0"], ["cuda:0", "cpu"], ["cuda:0", "cuda:0"]):
        got = _run(adapt_head_on_pixels(head, init, x, y, n_classes=3, steps=4, lr=0.3, devices=devs))
        for k in one:
            torch.testing.assert_close(got[k].cpu(), one[k], atol=1e-4, rtol=1e-4)


def test_decoder_adaptation_on_the_gpu(bundled, tile):
    cfg = MAMLConfig(adapt="decoder", steps=2, first_order=True, colour_features=False)
    h = _run(adapt(bundled, [tile.image], [tile.semantic], ["background", "nucleus"], devices="cuda:0", cfg=cfg))
    assert all(v.device.type == "cpu" and torch.isfinite(v).all() for v in h.state.values())
    assert any(k.startswith("backbone.") for k in h.state)  # decoder tensors adapted too
    pred = _run(predict(bundled, h, tile.image, devices="cuda:0", tiling=TILING))
    assert pred.semantic.shape == tile.semantic.shape


def test_mitosis_classification_on_the_gpu_equals_the_cpu():
    from napari_metahistoseg.mitosis import classify, load_mitosis_model

    model, _ = load_mitosis_model()
    side = MitosisConfig().patch_px
    patches = (np.random.default_rng(0).random((12, side, side, 3)) * 255).astype(np.uint8)
    np.testing.assert_allclose(classify(model, patches, device="cuda:0"), classify(model, patches), atol=1e-3)
    assert next(model.parameters()).device.type == "cpu"  # the caller's model is never moved


def test_training_resumed_on_the_gpu(tmp_path):
    import json

    from napari_metahistoseg.config import AugmentConfig, EpisodeConfig, ModelConfig, TrainConfig
    from napari_metahistoseg.data.task import save_unified
    from napari_metahistoseg.training import train

    dirs = {name: str(save_unified([synthetic_tile((96, 96), seed=10 * k + i).with_(task=name, sample_id=f"s{i}")
                                    for i in range(3)], tmp_path / name))
            for k, name in enumerate(("monuseg", "glas"))}
    cfg = TrainConfig(model=ModelConfig(base_channels=8, depth=3), data=dirs,
                      maml=MAMLConfig(steps=2, inner_lr=0.1, learn_inner_lr=True, max_support_pixels=500),
                      augment=AugmentConfig(crop_px=64),
                      episodes=EpisodeConfig(n_support=2, n_query=2, episodes_per_batch=1),
                      supervised_steps=2, meta_steps=2, batch_size=2, checkpoint_every=1,
                      out_dir=str(tmp_path / "run"), seed=3, device="cpu")
    gen = train(cfg)
    for p in gen:
        if p["step"] == 3:
            break
    gen.close()
    _run(train(dataclasses.replace(cfg, device="cuda:0", meta_steps=3)))
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["device"] for r in log] == ["cpu"] * 3 + ["cuda:0"] * 2
    assert all(np.isfinite(r["total"]) for r in log)


def test_colour_heads_and_40x_images_on_the_gpu(bundled, tile):
    from napari_metahistoseg.pipeline import colour_head

    head = colour_head(bundled, ["background", "nucleus"], noise=0.05)
    for mpp in (0.5, 0.25):
        cpu = _run(predict(bundled, head, tile.image, mpp=mpp, devices="cpu", tiling=TILING))
        gpu = _run(predict(bundled, head, tile.image, mpp=mpp, devices="cuda:0", tiling=TILING))
        # 0.25 µm/px: resampled on the GPU with torch's antialiased filter, on the CPU with skimage's
        assert np.abs(gpu.probs - cpu.probs).mean() < (1e-3 if mpp == 0.5 else 0.01)
        assert (gpu.semantic == cpu.semantic).mean() > (0.999 if mpp == 0.5 else 0.98)


def test_prediction_on_a_mixed_device_set(bundled, head, tile):
    """Tiles split over a GPU and the CPU, blended on the GPU (the first device), and over the CPU first (blended on
    the host): the same maps as one GPU."""
    one = _run(predict(bundled, head, tile.image, devices="cuda:0", tiling=TILING))
    for devs in ("cuda:0,cpu", "cpu,cuda:0"):
        mixed = _run(predict(bundled, head, tile.image, devices=devs, tiling=TILING))
        np.testing.assert_allclose(mixed.probs, one.probs, atol=2e-3)


def test_compiled_prediction_equals_eager(bundled, head, tile):
    """TilingConfig.compile (static shapes): the compiled forward gives the eager maps; a second prediction reuses
    the compiled code (one batch shape here: 9 tiles in one batch, to keep the compilations to one)."""
    cfg = dataclasses.replace(TILING, batch_size=9)
    eager = _run(predict(bundled, head, tile.image, devices="cuda:0", tiling=cfg))
    for _ in range(2):
        comp = _run(predict(bundled, head, tile.image, devices="cuda:0", tiling=dataclasses.replace(cfg, compile=True)))
        np.testing.assert_allclose(comp.probs, eager.probs, atol=2e-3)
        assert (comp.semantic == eager.semantic).mean() > 0.999


def test_groupnorm_by_reduction_on_the_gpu_equals_torch(bundled, head, tile):
    """Prediction with GroupNorm's CUDA inference path (the default) against torch's kernel on the same GPU."""
    from napari_metahistoseg.models import GroupNorm

    fast = _run(predict(bundled, head, tile.image, devices="cuda:0", tiling=TILING))
    try:
        GroupNorm.reduce_on_cuda = False
        ref = _run(predict(bundled, head, tile.image, devices="cuda:0", tiling=TILING))
    finally:
        GroupNorm.reduce_on_cuda = True
    np.testing.assert_allclose(fast.probs, ref.probs, atol=1e-4)
    bf16 = _run(predict(bundled, head, tile.image, devices="cuda:0",
                        tiling=dataclasses.replace(TILING, autocast_bf16=True)))  # GroupNorm in bf16 too
    assert (bf16.semantic == ref.semantic).mean() > 0.98 and np.abs(bf16.probs - ref.probs).mean() < 0.02
