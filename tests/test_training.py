"""Training loop: smoke run on synthetic tasks, resume, and gloo all-reduce == single-process update."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from napari_metahistoseg.checkpoints import flatten_optimizer, restore_optimizer
from napari_metahistoseg.config import (
    AugmentConfig,
    EpisodeConfig,
    MAMLConfig,
    ModelConfig,
    TrainConfig,
    channels_last_on,
)
from napari_metahistoseg.data.samplers import batch_loader, episode_loader
from napari_metahistoseg.data.synthetic import synthetic_tile
from napari_metahistoseg.data.task import save_unified
from napari_metahistoseg.maml import run
from napari_metahistoseg.training import (
    _allreduce_grads,
    _is_nhwc,
    _set_layout,
    build_model,
    consep_mosaics,
    init_weights,
    load_train_config,
    load_training_tasks,
    meta_loss,
    supervised_loss,
    train,
    training_device,
)


@pytest.fixture
def task_dirs(tmp_path):
    dirs = {}
    for k, name in enumerate(("monuseg", "glas")):
        samples = [synthetic_tile((96, 96), seed=10 * k + i).with_(task=name, sample_id=f"s{i}") for i in range(3)]
        dirs[name] = str(save_unified(samples, tmp_path / name))
    return dirs


def _cfg(task_dirs, out, sup=2, meta=2):
    return TrainConfig(model=ModelConfig(base_channels=8, depth=3), data=task_dirs,
                       maml=MAMLConfig(steps=2, inner_lr=0.1, learn_inner_lr=True, first_order=False,
                                       max_support_pixels=500),
                       augment=AugmentConfig(crop_px=64), episodes=EpisodeConfig(n_support=2, n_query=2,
                                                                                  episodes_per_batch=1),
                       supervised_steps=sup, meta_steps=meta, batch_size=2, checkpoint_every=2,
                       out_dir=str(out), seed=3)


def test_train_smoke_and_resume(task_dirs, tmp_path):
    cfg = _cfg(task_dirs, tmp_path / "run")
    path = run(train(cfg))
    assert path.exists() and (tmp_path / "run" / "transfer.safetensors").exists()
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == ["supervised"] * 2 + ["meta"] * 2
    assert all(np.isfinite(r["total"]) for r in log)
    assert {r["device"] for r in log} == {"cuda:0" if torch.cuda.is_available() else "cpu"}  # device "auto"
    # channels_last="cpu": NHWC in the supervised phase on a CPU, NCHW in the meta phase and on a GPU
    cpu = not torch.cuda.is_available()
    assert [r["layout"] for r in log] == ["nhwc" if cpu else "nchw"] * 2 + ["nchw"] * 2
    desc = json.loads((tmp_path / "run" / "last.json").read_text())
    assert desc["training"]["steps_done"] == 4 and len(desc["backbone_sha256"]) == 64
    # resume: extend the run by two meta steps, starting from step 4
    cfg2 = dataclasses.replace(cfg, meta_steps=4)
    steps = []
    gen = train(cfg2)
    for p in gen:
        steps.append(p["step"])
    assert steps == [5, 6]


def test_channels_last_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert channels_last_on("cpu", cpu) and not channels_last_on("cpu", cuda)
    assert channels_last_on("all", cuda) and not channels_last_on("none", cpu)
    with pytest.raises(ValueError, match="channels_last"):
        TrainConfig(channels_last="yes")


def test_channels_last_losses_and_gradients_match_nchw(task_dirs, tmp_path):
    """The NHWC training layout computes the same losses and gradients as NCHW (it is only a memory layout), and an
    optimizer restored from a resume file keeps the parameters' layout."""
    cfg = dataclasses.replace(_cfg(task_dirs, tmp_path / "run"), model=ModelConfig(base_channels=16, depth=3))
    tasks = load_training_tasks(cfg.data, cfg.model.mpp)
    torch.manual_seed(0)
    ref, _ = build_model(cfg, tasks)
    cl, _ = build_model(cfg, tasks)
    cl.load_state_dict(ref.state_dict())
    before = [id(p) for p in cl.parameters()]
    _set_layout(cl, True)
    assert [id(p) for p in cl.parameters()] == before  # in place: an optimizer built before keeps its parameters
    conv = next(p for p in cl.backbone.parameters() if p.dim() == 4)
    assert _is_nhwc(cl) and conv.is_contiguous(memory_format=torch.channels_last) and not _is_nhwc(ref)
    batch = next(batch_loader(tasks, 4, cfg.augment, seed=1))
    episodes = next(episode_loader(tasks, cfg.episodes, cfg.augment, seed=2))
    dev = torch.device("cpu")
    lrs = {k: torch.tensor(0.1) for k, _ in ref.heads["generic"].named_parameters()}
    losses = []
    for model in (ref, cl):
        model.zero_grad()
        sup = supervised_loss(model, batch, dev, 2.0)["total"]
        meta = meta_loss(model, episodes, cfg, lrs, np.random.default_rng(5), dev)["total"]
        (sup + meta).backward()
        losses.append((sup.detach(), meta.detach()))
    torch.testing.assert_close(losses[1], losses[0], atol=1e-4, rtol=1e-4)
    for (name, a), b in zip(ref.named_parameters(), cl.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is None:  # a head this batch does not use
            continue
        # PyTorch's channels-last GroupNorm backward on the CPU is less exact than its NCHW one (~1e-4 relative
        # against 1e-7, measured against float64): far below the noise of a training step, far above rounding
        err = float((b.grad - a.grad).abs().max()) / max(float(a.grad.abs().max()), 1e-12)
        assert err < 2e-3, (name, err)
    opt = torch.optim.Adam(cl.parameters(), lr=1e-3)
    opt.step()
    names = {id(p): n for n, p in cl.named_parameters()}
    flat = {k: v.contiguous() for k, v in flatten_optimizer(opt, names).items()}  # as read back from safetensors
    opt2 = torch.optim.Adam(cl.parameters(), lr=1e-3)
    restore_optimizer(opt2, names, flat)
    state = opt2.state[conv]
    assert state["exp_avg"].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(state["exp_avg"], opt.state[conv]["exp_avg"])
    _set_layout(cl, False)
    assert not _is_nhwc(cl) and conv.is_contiguous() and [id(p) for p in cl.parameters()] == before


def test_load_train_config_resolves_data_folders_and_overrides(task_dirs, tmp_path):
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    (cfg_dir / "data").symlink_to(tmp_path)  # data/<task> next to the config
    path = cfg_dir / "c.json"
    path.write_text(json.dumps({"data": {"monuseg": "data/monuseg", "glas": str(tmp_path / "glas")},
                                "supervised_steps": 7}))
    cfg = load_train_config(path)
    assert cfg.data == {"monuseg": str((cfg_dir / "data" / "monuseg").resolve()), "glas": str(tmp_path / "glas")}
    cfg = load_train_config(path, data_root=tmp_path / "elsewhere", out_dir="o", supervised_steps=None, meta_steps=3)
    assert cfg.data["monuseg"] == str(tmp_path / "elsewhere" / "data" / "monuseg")
    assert (cfg.out_dir, cfg.supervised_steps, cfg.meta_steps) == ("o", 7, 3)  # None keeps the config's value
    with pytest.raises(ValueError, match="config file not found"):
        load_train_config(tmp_path / "nope.json")


def test_meta_train_command(task_dirs, tmp_path, capsys):
    from napari_metahistoseg.cli import main

    cfg = dataclasses.asdict(_cfg(task_dirs, tmp_path / "unused", sup=1, meta=1))
    cfg["data"] = {k: os.path.relpath(v, tmp_path) for k, v in cfg["data"].items()}  # relative to the config
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    assert main(["meta-train", "--config", str(path), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert out.out.strip().endswith("last.safetensors") and (tmp_path / "run" / "last.json").exists()
    assert "[meta] step 2/2" in out.err


def test_init_from_copies_backbone_and_matching_heads(task_dirs, tmp_path):
    from napari_metahistoseg.checkpoints import load_model, save_model
    from napari_metahistoseg.models import MetaHistoSegNet

    cfg = _cfg(task_dirs, tmp_path / "run")
    torch.manual_seed(7)
    src = MetaHistoSegNet(cfg.model, {"monuseg": 2, "generic": 2, "other": 3}, hover_types=5)
    save_model(src, tmp_path / "src", head_classes={"monuseg": ["b", "n"], "generic": ["b", "f"],
                                                   "other": ["a", "b", "c"], "hover": ["x"] * 5})
    tasks = load_training_tasks(cfg.data, cfg.model.mpp)
    torch.manual_seed(0)
    model, _ = build_model(cfg, tasks)  # heads monuseg, glas (new), generic, hover
    glas_before = {k: v.clone() for k, v in model.heads["glas"].state_dict().items()}
    info = init_weights(model, str(tmp_path / "src"))
    assert sorted(info["heads"]) == ["generic", "hover", "monuseg"] and info["new_heads"] == ["glas"]
    assert info["backbone_sha256"] == json.loads((tmp_path / "src.json").read_text())["backbone_sha256"]
    for k, v in src.state_dict().items():
        if not k.startswith("heads.other"):
            torch.testing.assert_close(model.state_dict()[k], v, msg=k)
    for k, v in model.heads["glas"].state_dict().items():
        torch.testing.assert_close(v, glas_before[k])  # a new task keeps its fresh head
    # a run started from it records where it started; a different architecture is refused, naming the file
    tuned = dataclasses.replace(cfg, init_from=str(tmp_path / "src"), supervised_steps=1, meta_steps=0)
    path = run(train(tuned))
    record = json.loads(path.with_suffix(".json").read_text())["training"]["init"]
    assert record["init_from"] == str(tmp_path / "src")
    # resuming needs only the run's own checkpoint (the start may be gone), and keeps the record of the start
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in tmp_path.glob("src.*"):
        f.rename(moved / f.name)
    path = run(train(dataclasses.replace(tuned, supervised_steps=2)))
    assert json.loads(path.with_suffix(".json").read_text())["training"]["init"] == record
    for f in moved.iterdir():
        f.rename(tmp_path / f.name)
    big = dataclasses.replace(cfg.model, base_channels=16)
    with pytest.raises(ValueError, match=r"src.*another architecture: base_channels 8 \(config: 16\)"):
        init_weights(MetaHistoSegNet(big, {"generic": 2}), str(tmp_path / "src"))
    assert load_model(tmp_path / "src")[1]["backbone_sha256"] == info["backbone_sha256"]
    # "default" is the bundled backbone
    from napari_metahistoseg.pipeline import WEIGHTS

    bundled, desc, _ = load_model(WEIGHTS / "backbone")
    fresh = MetaHistoSegNet(bundled.cfg, {"generic": 2, "mine": 4}, hover_types=5)
    info = init_weights(fresh, "default")
    assert info["backbone_sha256"] == desc["backbone_sha256"] and info["new_heads"] == ["mine"]


def test_training_device(monkeypatch):
    assert training_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "1")
    if not torch.cuda.is_available():
        assert training_device("auto") == torch.device("cpu")  # torchrun without GPUs: gloo on CPUs
        with pytest.raises(ValueError, match="CUDA is not available"):
            training_device("cuda:0")
    else:
        assert training_device("auto") == torch.device("cuda", 1) and training_device("cpu").type == "cpu"


def test_samplers_reproducible_and_shapes():
    tasks = {"a": [synthetic_tile((80, 80), seed=i) for i in range(3)],
             "b": [synthetic_tile((80, 80), seed=9)]}
    aug = AugmentConfig(crop_px=48)
    b1 = next(batch_loader(tasks, 4, aug, seed=1))
    b2 = next(batch_loader(tasks, 4, aug, seed=1))
    assert np.array_equal(b1.images, b2.images) and b1.images.shape == (4, 48, 48, 3)
    assert set(b1.tasks) <= {"a", "b"}
    eps = next(episode_loader(tasks, EpisodeConfig(n_support=2, n_query=3, episodes_per_batch=2,
                                                   task_weights={"a": 1.0}), aug, seed=0))
    assert len(eps) == 2 and all(e.task == "a" for e in eps)
    assert len(eps[0].support) == 2 and len(eps[0].query) == 3
    with pytest.raises(ValueError):
        next(episode_loader(tasks, EpisodeConfig(task_weights={"zz": 1.0}), aug))


def test_consep_mosaics_keep_instances_distinct():
    tiles = [synthetic_tile((32, 32), seed=i).with_(sample_id=f"train_1_{i:03d}") for i in range(4)]
    (m,) = consep_mosaics(tiles)
    assert m.image.shape == (64, 64, 3)
    n = sum(len(np.unique(t.instances)) - 1 for t in tiles)
    assert len(np.unique(m.instances)) - 1 == n


def _worker(rank, world, init_file, shards, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    x, y = shards[rank]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    _allreduce_grads(model, [])
    opt.step()
    if rank == 0:
        torch.save({k: v for k, v in model.state_dict().items()}, result_file)
    # both ranks leave together: a rank that tears its connections down while the other still uses them can make
    # gloo abort the other ("terminate called without an active exception", seen once in CI on a loaded machine)
    dist.barrier()
    dist.destroy_process_group()


def test_gloo_allreduce_two_processes_equals_one(tmp_path):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)
    shards = [(x[:4], y[:4]), (x[4:], y[4:])]
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), shards, str(tmp_path / "res.pt")), nprocs=2, join=True)
    dist_state = torch.load(tmp_path / "res.pt", weights_only=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    loss = 0.5 * sum(torch.nn.functional.cross_entropy(model(a), b) for a, b in shards)
    loss.backward()
    opt.step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, dist_state[k], atol=1e-6, rtol=1e-5)
    assert os.path.exists(tmp_path / "res.pt")


def _counting(start: int, w: int):
    i = start + 100 * w
    while True:
        yield i
        i += 1


def test_prefetched_interleaves_worker_streams_in_a_fixed_order():
    import functools

    from napari_metahistoseg.data.samplers import prefetched

    it = prefetched(functools.partial(_counting, 0), 3)
    got = [next(it) for _ in range(7)]
    it.close()
    assert got == [0, 100, 200, 1, 101, 201, 2]
    with pytest.raises(ValueError, match="at least one worker"):
        next(prefetched(functools.partial(_counting, 0), 0))


def _failing(w: int):
    yield w
    raise OSError("disk gone")


def test_prefetched_reports_a_failing_worker():
    from napari_metahistoseg.data.samplers import prefetched

    it = prefetched(_failing, 1)
    assert next(it) == 0
    with pytest.raises(RuntimeError, match="loader process 0 failed: OSError: disk gone"):
        next(it)


def test_training_with_loader_workers(task_dirs, tmp_path):
    cfg = dataclasses.replace(_cfg(task_dirs, tmp_path / "w"), loader_workers=2)
    path = run(train(cfg))
    log = [json.loads(x) for x in (tmp_path / "w" / "log.jsonl").read_text().splitlines()]
    assert path.exists() and [r["phase"] for r in log] == ["supervised"] * 2 + ["meta"] * 2
    assert all(np.isfinite(r["total"]) for r in log)
    again = dataclasses.replace(cfg, out_dir=str(tmp_path / "w2"))
    run(train(again))  # reproducible for a given worker count
    log2 = [json.loads(x) for x in (tmp_path / "w2" / "log.jsonl").read_text().splitlines()]
    assert [r["total"] for r in log2] == [r["total"] for r in log]
    with pytest.raises(ValueError, match="loader_workers"):
        dataclasses.replace(cfg, loader_workers=-1)


def _sample(sid: str, seed: int):
    return synthetic_tile((32, 32), seed=seed).with_(sample_id=sid)


def test_split_validation_holds_apart_whole_source_images():
    from napari_metahistoseg.training import source_image, split_validation

    tiles = [_sample(f"train_{p}_{t:03d}", 4 * p + t) for p in range(1, 6) for t in range(4)]
    fit, apart = split_validation(tiles, "consep_tiles", 0.4, np.random.default_rng(0))
    src = {source_image(s.sample_id, "consep_tiles") for s in apart}
    assert len(src) == 2 and len(apart) == 8 and len(fit) == 12  # 2 of 5 source images, with all their tiles
    assert not src & {source_image(s.sample_id, "consep_tiles") for s in fit}
    again, _ = split_validation(tiles, "consep_tiles", 0.4, np.random.default_rng(0))
    assert [s.sample_id for s in again] == [s.sample_id for s in fit]  # seeded: a resumed run keeps its split
    # other layouts: every image is its own source (GlaS ids such as testA_11 are not tiles of "testA")
    images = [_sample(f"testA_{i}", i) for i in range(4)]
    assert len(split_validation(images, "unified", 0.5, np.random.default_rng(0))[1]) == 2
    # at least one held apart, never all; a single image is not split; 0 = no validation
    assert len(split_validation(images, "unified", 0.01, np.random.default_rng(0))[1]) == 1
    assert len(split_validation(images, "unified", 0.99, np.random.default_rng(0))[0]) == 1
    assert split_validation(images[:1], "unified", 0.5, np.random.default_rng(0)) == (images[:1], [])
    assert split_validation(images, "unified", 0.0, np.random.default_rng(0)) == (images, [])
    with pytest.raises(ValueError, match="val_fraction"):
        TrainConfig(val_fraction=1.0)
    with pytest.raises(ValueError, match="val_every"):
        TrainConfig(val_every=-1)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_training_validates_on_held_apart_images(task_dirs, tmp_path):
    """Validation adapts the generic head on a training image and scores the held-apart ones; it is logged, kept in
    the checkpoint, yielded without a loss, and does not change the training (same weights validating at every step
    or only at the end)."""
    from napari_metahistoseg.training import load_task_splits

    cfg = dataclasses.replace(_cfg(task_dirs, tmp_path / "run"), val_fraction=0.34, val_every=1)
    tasks, val = load_task_splits(cfg.data, cfg.model.mpp, (), cfg.val_fraction, cfg.seed)
    assert {t: len(v) for t, v in val.items()} == {"monuseg": 1, "glas": 1}
    assert all(not {s.sample_id for s in val[t]} & {s.sample_id for s in tasks[t]} for t in val)
    events = list(train(cfg))
    results = [p["val"] for p in events if "val" in p]
    assert [v["step"] for v in results] == [1, 2, 3, 4]
    assert all("loss" not in p for p in events if p["phase"] == "validation")
    assert [p["step"] for p in events if p["phase"] != "validation"] == [1, 2, 3, 4]
    for v in results:
        assert set(v["tasks"]) == {"monuseg", "glas"} and 0 <= v["mean_miou"] <= 1
        assert all(r["images"] == 1 and len(r["support"]) == 1 and 0 <= r["miou"] <= 1 for r in v["tasks"].values())
        assert v["mean_miou"] == pytest.approx(np.mean([r["miou"] for r in v["tasks"].values()]), abs=1e-4)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == ["supervised", "validation"] * 2 + ["meta", "validation"] * 2
    rec = json.loads((tmp_path / "run" / "last.json").read_text())["training"]
    assert rec["validation"] == results[-1]
    assert rec["held_apart"] == {t: [s.sample_id for s in v] for t, v in val.items()}
    # validating at every step leaves the training exactly as validating once at the end
    once = dataclasses.replace(cfg, val_every=100, out_dir=str(tmp_path / "once"))
    assert [p["val"]["step"] for p in train(once) if "val" in p] == [4]
    a, b = _weights(tmp_path / "run" / "last.safetensors"), _weights(tmp_path / "once" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fine_tuning_validates_its_start_and_resume_keeps_the_last_validation(task_dirs, tmp_path):
    first = _cfg(task_dirs, tmp_path / "first", sup=2, meta=0)
    run(train(first))
    cfg = dataclasses.replace(_cfg(task_dirs, tmp_path / "ft", sup=2, meta=0), val_fraction=0.34,
                              init_from=str(tmp_path / "first" / "last"))
    assert [p["val"]["step"] for p in train(cfg) if "val" in p] == [0, 2]  # the start, then every checkpoint
    log = [json.loads(x) for x in (tmp_path / "ft" / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["phase"]) for r in log if r["phase"] == "validation"] == [(0, "validation"),
                                                                                     (2, "validation")]
    more = dataclasses.replace(cfg, supervised_steps=3, checkpoint_every=100)  # resumed: no new start validation
    assert [p["val"]["step"] for p in train(more) if "val" in p] == [3]
    rec = json.loads((tmp_path / "ft" / "last.json").read_text())["training"]
    assert rec["validation"]["step"] == 3 and rec["init"]["init_from"].endswith("last")


def test_meta_train_command_prints_validation(task_dirs, tmp_path, capsys):
    from napari_metahistoseg.cli import main

    cfg = dataclasses.asdict(_cfg(task_dirs, tmp_path / "run", sup=2, meta=0))
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    assert main(["meta-train", "--config", str(path), "--device", "cpu", "--val-fraction", "0.34"]) == 0
    err = capsys.readouterr().err
    assert "[validation] step 2: mean mIoU" in err and "monuseg" in err and "glas" in err
