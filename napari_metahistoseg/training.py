"""Backbone training: multi-task supervised warm-up (the transfer-learning baseline, over ``batch_loader``),
then meta-training (MAML over ``episode_loader``; the inner loop adapts the ``generic`` head on cached support
features, second-order through the head, so the backbone learns features that adapt fast).

Every step routes each sample to its own task head; nuclear tasks also train the HoVer head (NP + HV, and
NC on CoNSeP types). Resumable from the last checkpoint (safetensors, no pickle), seeded, loss curves in
``log.jsonl``. Scales out with ``torch.distributed`` (torchrun, gloo or nccl): each rank draws its own
episodes and the gradients are all-reduced (averaged) before every outer update.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import math
import os
import time
import zlib
from collections.abc import Generator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.func import functional_call

from .checkpoints import flatten_optimizer, load_model, restore_optimizer, save_model, stem_paths
from .config import TrainConfig, channels_last_on, load_json, save_json
from .data.readers import open_dataset
from .data.samplers import Batch, Episode, batch_loader, episode_loader, prefetched, rescale_sample
from .data.task import IGNORE, Sample
from .devices import get_device
from .losses import hover_loss, seg_loss
from .maml import adapt_head_on_pixels, pixel_support, relay, run
from .models import MetaHistoSegNet, to_tensor_image

log = logging.getLogger(__name__)

NUCLEI_TASKS = ("monuseg", "cpm15", "consep")
GENERIC = "generic"  # the meta-learned head every new task starts from


# ------------------------------------------------------------------------------------------ data


def consep_mosaics(samples: list[Sample]) -> list[Sample]:
    """Group CoNSeP tiles of the same parent image into 2x2 mosaics (tiles shrink at the model mpp)."""
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.sample_id.rsplit("_", 1)[0], []).append(s)
    out = []
    for parent, tiles in sorted(groups.items()):
        for k in range(0, len(tiles) - 3, 4):
            quad = tiles[k:k + 4]
            if len({t.shape for t in quad}) != 1:
                continue
            img = np.concatenate([np.concatenate([q.image for q in quad[:2]], 1),
                                  np.concatenate([q.image for q in quad[2:]], 1)], 0)
            sem = np.block([[quad[0].semantic, quad[1].semantic], [quad[2].semantic, quad[3].semantic]])
            offs = np.cumsum([0] + [int(q.instances.max()) for q in quad[:3]])
            shifted = [np.where(q.instances > 0, q.instances + o, 0) for q, o in zip(quad, offs, strict=True)]
            inst = np.block([shifted[:2], shifted[2:]])
            out.append(quad[0].with_(image=img, semantic=sem, instances=inst.astype(np.uint32),
                                     sample_id=f"{parent}_m{k // 4}"))
    return out


def load_training_tasks(data: dict[str, str], mpp: float, holdout: tuple[str, ...] = ()) -> dict[str, list[Sample]]:
    """Open every task folder, drop held-out tasks, rescale to the model mpp, keep in memory."""
    return load_task_splits(data, mpp, holdout)[0]


def source_image(sample_id: str, layout: str) -> str:
    """The source image a sample comes from: a CoNSeP tile's parent image, otherwise the sample itself."""
    return sample_id.rsplit("_", 1)[0] if layout == "consep_tiles" else sample_id


def split_validation(samples: list[Sample], layout: str, fraction: float,
                     rng: np.random.Generator) -> tuple[list[Sample], list[Sample]]:
    """``(train, held apart)``: a share ``fraction`` of the source images (at least one, never all of them; tiles go
    with their source image), drawn with ``rng``. A task of a single source image is not split (warned)."""
    if fraction <= 0:
        return samples, []
    sources = sorted({source_image(s.sample_id, layout) for s in samples})
    if len(sources) < 2:
        log.warning("validation: a task of %d source image(s) cannot spare one; it is not validated", len(sources))
        return samples, []
    n = min(len(sources) - 1, max(1, round(fraction * len(sources))))
    apart = {str(x) for x in rng.permutation(sources)[:n]}
    return ([s for s in samples if source_image(s.sample_id, layout) not in apart],
            [s for s in samples if source_image(s.sample_id, layout) in apart])


def load_task_splits(data: dict[str, str], mpp: float, holdout: tuple[str, ...] = (), val_fraction: float = 0.0,
                     seed: int = 0) -> tuple[dict[str, list[Sample]], dict[str, list[Sample]]]:
    """The training samples and the held-apart validation samples (``TrainConfig.val_fraction``; the same draw for
    a given seed, so a resumed run keeps it) of every task that is not held out, at the model mpp."""
    tasks, val = {}, {}
    for name, folder in data.items():
        if name in holdout:
            continue
        ds = open_dataset(folder)
        fit, apart = split_validation(list(ds), ds.layout, val_fraction,
                                      np.random.default_rng([seed, zlib.crc32(name.encode())]))
        if ds.layout == "consep_tiles":
            fit, apart = consep_mosaics(fit), consep_mosaics(apart) or apart
        tasks[name] = [rescale_sample(s, mpp) for s in fit]
        if apart:
            val[name] = [rescale_sample(s, mpp) for s in apart]
        log.info("task %s: %d training samples, %d held apart for validation, from %s", name, len(fit), len(apart),
                 folder)
    if not tasks:
        raise ValueError("no training tasks left (all held out?)")
    return tasks, val


def load_train_config(path: str | os.PathLike, *, data_root: str | os.PathLike | None = None,
                      **overrides) -> TrainConfig:
    """A :class:`TrainConfig` from JSON (a clear error naming the file when it is not one), its relative data
    folders resolved against ``data_root`` if given, else against the config file's own folder (as
    ``configs/backbone.json`` expects); ``overrides`` (e.g. ``out_dir``, ``device``, ``loader_workers``,
    ``supervised_steps``) replace fields where not None. What ``meta-train`` and the GUI's Train panel run."""
    cfg = load_json(TrainConfig, path)
    base = Path(data_root) if data_root is not None else Path(path).resolve().parent
    data = {k: str(Path(v) if Path(v).is_absolute() else (base / v).resolve()) for k, v in cfg.data.items()}
    return dataclasses.replace(cfg, data=data, **{k: v for k, v in overrides.items() if v is not None})


def binary_variant(sem: np.ndarray, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """A random binary task from a multi-class mask: all foreground, or one class vs the rest."""
    if n_classes <= 2 or rng.random() < 0.5:
        return np.where(sem == IGNORE, IGNORE, (sem > 0).astype(np.uint8)).astype(np.uint8)
    k = int(rng.integers(1, n_classes))
    return np.where(sem == IGNORE, IGNORE, (sem == k).astype(np.uint8)).astype(np.uint8)


def hover_targets(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NP targets (0/1/IGNORE), HV targets and a validity flag per crop (instance truth of nuclear tasks)."""
    from .postprocess import hv_targets

    valid = np.array([h and t in NUCLEI_TASKS for h, t in zip(batch.has_instances, batch.tasks, strict=True)])
    np_t = np.where(batch.semantic == IGNORE, IGNORE, (batch.semantic > 0)).astype(np.int64)
    np_t[~valid] = IGNORE
    hv = np.stack([hv_targets(i) if v else np.zeros((2,) + i.shape, np.float32)
                   for i, v in zip(batch.instances, valid, strict=True)])
    return (torch.from_numpy(np_t).to(device), torch.from_numpy(hv).to(device), torch.from_numpy(valid).to(device))


# ------------------------------------------------------------------------------------------ steps


def supervised_loss(
    model: MetaHistoSegNet, batch: Batch, device: torch.device, hv_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Multi-task loss of one mixed batch: task heads + generic head (binary) + HoVer on nuclear crops."""
    x = _in_model_layout(to_tensor_image(batch.images, device), model)
    feats = model.features(x)
    sem = torch.from_numpy(batch.semantic.astype(np.int64)).to(device)
    terms = {}
    for task in sorted(set(batch.tasks)):
        idx = torch.tensor([i for i, t in enumerate(batch.tasks) if t == task], device=device)
        terms[f"seg/{task}"] = seg_loss(model.heads[task](feats[idx])["seg"], sem[idx], balance=True)
    fg = torch.where(sem == IGNORE, sem, (sem > 0).long())
    terms["seg/generic"] = seg_loss(model.heads[GENERIC](feats)["seg"], fg, balance=True)
    np_t, hv_t, valid = hover_targets(batch, device)
    if valid.any():
        nc_t = None
        if "consep" in batch.tasks:
            is_consep = torch.tensor([t == "consep" for t in batch.tasks], device=device)
            nc_t = torch.where(is_consep[:, None, None], sem, torch.full_like(sem, IGNORE))
        hl = hover_loss(model.heads["hover"](feats), np_t, hv_t, nc_target=nc_t, valid=valid)
        terms.update({f"hover/{k}": v for k, v in hl.items() if k != "total"})
    terms["total"] = sum(v * (hv_weight if k.startswith("hover/hv") else 1.0) for k, v in terms.items())
    return terms


def meta_loss(
    model: MetaHistoSegNet, episodes: list[Episode], cfg: TrainConfig, lrs: dict, rng: np.random.Generator,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """MAML outer loss: adapt the generic head on each episode's support features, score on its query."""
    head = model.heads[GENERIC]
    init = {k: v for k, v in head.named_parameters()}
    total, terms = 0.0, {}
    for ep in episodes:
        n_cls = int(np.max(ep.support.semantic, initial=0, where=ep.support.semantic != IGNORE)) + 1
        sup_y = binary_variant(ep.support.semantic, max(n_cls, 2), rng)
        x = _in_model_layout(to_tensor_image(np.concatenate([ep.support.images, ep.query.images]), device), model)
        feats = model.features(x)
        fs, fq = feats[: len(ep.support)], feats[len(ep.support):]
        px, py = pixel_support(fs, torch.from_numpy(sup_y).to(device), 2, max_pixels=cfg.maml.max_support_pixels,
                               seed=int(rng.integers(1 << 31)))
        gen = adapt_head_on_pixels(head, init, px, py, n_classes=2, steps=cfg.maml.steps, lr=cfg.maml.inner_lr,
                                   first_order=cfg.maml.first_order, lrs=lrs or None, devices=[device])
        fast = run(gen)
        # the query uses the same binarisation rule as the support (same class vs rest)
        qry_y = _same_variant(ep.support.semantic, sup_y, ep.query.semantic)
        logits = functional_call(head, fast, (fq,))["seg"]
        ql = seg_loss(logits, torch.from_numpy(qry_y.astype(np.int64)).to(device), balance=True)
        terms[f"meta/{ep.task}"] = ql.detach()
        total = total + ql / len(episodes)
        np_t, hv_t, valid = hover_targets(ep.query, device)
        if valid.any():
            hl = hover_loss(model.heads["hover"](fq), np_t, hv_t, valid=valid)
            total = total + 0.5 * hl["total"] / len(episodes)
    terms["total"] = total
    return terms


def _is_nhwc(model: MetaHistoSegNet) -> bool:
    """Whether the model's convolution weights are channels-last (see :func:`_set_layout`)."""
    w = next(p for p in model.backbone.parameters() if p.dim() == 4)
    return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


def _in_model_layout(x: torch.Tensor, model: MetaHistoSegNet) -> torch.Tensor:
    """``x (N, C, H, W)`` in the memory layout of the model's convolution weights (channels-last or not)."""
    return x.contiguous(memory_format=torch.channels_last) if _is_nhwc(model) else x


def _set_layout(model: MetaHistoSegNet, nhwc: bool) -> None:
    """Convert the model's weights to channels-last (``nhwc``) or back, in place (the optimizer keeps the same
    parameters; Adam's moments keep their layout, which only costs strided element-wise updates), and log a change."""
    if nhwc != _is_nhwc(model):
        model.to(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        log.info("training layout: %s", "channels-last (NHWC)" if nhwc else "NCHW")


def _same_variant(src_sem: np.ndarray, src_bin: np.ndarray, qry_sem: np.ndarray) -> np.ndarray:
    """Apply to the query the class→{0,1} map that turned ``src_sem`` into ``src_bin``."""
    lut = np.zeros(256, np.uint8)
    lut[IGNORE] = IGNORE
    lab = src_sem != IGNORE
    for c in np.unique(src_sem[lab]):
        lut[c] = np.bincount(src_bin[lab & (src_sem == c)], minlength=2)[:2].argmax()
    unseen = np.setdiff1d(np.unique(qry_sem), np.r_[np.unique(src_sem), IGNORE])
    lut[unseen] = 0
    return lut[qry_sem]


# ------------------------------------------------------------------------------------------ loop


def _allreduce_grads(model: torch.nn.Module, extra: list[torch.Tensor]) -> None:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for p in list(model.parameters()) + extra:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= world


def build_model(cfg: TrainConfig, tasks: dict[str, list[Sample]]) -> tuple[MetaHistoSegNet, dict[str, list[str]]]:
    classes = {t: list(s[0].class_names) for t, s in tasks.items()}
    classes[GENERIC] = ["background", "foreground"]
    model = MetaHistoSegNet(cfg.model, {t: len(c) for t, c in classes.items()}, hover_types=5)
    classes["hover"] = ["background", "other", "inflammatory", "epithelial", "spindle"]
    return model, classes


ARCHITECTURE = ("in_channels", "base_channels", "depth", "groups", "head_hidden")


def init_weights(model: MetaHistoSegNet, spec: str) -> dict:
    """Copy trained weights into a freshly built ``model`` (``TrainConfig.init_from``): the backbone, and every head
    whose name and shapes match; returns the provenance ``{"init_from", "backbone_sha256", "heads", "new_heads"}``.
    ``spec``: ``"default"``, ``"transfer"`` or a checkpoint path. ValueError naming the file when the architectures
    differ."""
    bundled = {"default": "backbone", "transfer": "transfer"}
    path = Path(__file__).parent / "weights" / bundled[spec] if spec in bundled else Path(spec)
    loaded, desc, _ = load_model(path)
    want, have = model.cfg, loaded.cfg
    diff = [f"{k} {getattr(have, k)} (config: {getattr(want, k)})" for k in ARCHITECTURE
            if getattr(have, k) != getattr(want, k)]
    if diff:
        raise ValueError(f"{path}: TrainConfig.init_from has another architecture: {', '.join(diff)}")
    if (have.mpp, have.mean, have.std) != (want.mpp, want.mean, want.std):
        log.warning("init_from %s was trained at %s µm/px with mean %s / std %s; this run uses %s, %s / %s", path,
                    have.mpp, have.mean, have.std, want.mpp, want.mean, want.std)
    src = loaded.state_dict()
    with torch.no_grad():
        model.backbone.load_state_dict(loaded.backbone.state_dict(), strict=True)
        copied, new = [], []
        for name, head in model.heads.items():
            mine = {f"heads.{name}.{k}": v for k, v in head.state_dict().items()}
            if all(k in src and src[k].shape == v.shape for k, v in mine.items()):
                head.load_state_dict({k.split(".", 2)[2]: src[k] for k in mine}, strict=True)
                copied.append(name)
            else:
                new.append(name)
    log.info("initialised from %s (backbone %s…): heads %s copied, %s new", path, desc["backbone_sha256"][:12],
             copied, new)
    return {"init_from": str(path), "backbone_sha256": desc["backbone_sha256"], "heads": copied, "new_heads": new}


def validation_support(tasks: dict[str, list[Sample]], val: dict[str, list[Sample]], n: int,
                       seed: int) -> dict[str, list[Sample]]:
    """The ``n`` training samples (with at least two labelled classes where there are such) whose labels adapt the
    head of each validated task; a fixed seeded draw, so every validation of a run adapts on the same ones."""
    out = {}
    for task in val:
        pool = tasks[task]
        rng = np.random.default_rng([seed, zlib.crc32(task.encode()), 1])
        order = [pool[i] for i in rng.permutation(len(pool))]  # then those with two classes first (a stable sort)
        out[task] = sorted(order, key=lambda s: len(np.setdiff1d(np.unique(s.semantic), [IGNORE])) < 2)[:n]
    return out


def validate(model: MetaHistoSegNet, classes: dict[str, list[str]], inner_lrs: dict[str, torch.Tensor],
             val: dict[str, list[Sample]], support: dict[str, list[Sample]], device: torch.device,
             step: int, seed: int = 0) -> Generator[dict, None, dict]:
    """Score the model as a user would meet it: for each task, the generic head adapted as the GUI's Adapt does
    (``MAMLConfig()``) on the task's ``support`` samples, then the mIoU of its predictions on the held-apart ``val``
    samples (all at the model mpp). ``inner_lrs``: the generic head's learned step sizes (as a checkpoint keeps
    them). Works on a copy (the training model, its layout and the global RNG are left as
    they were); yields ``{"phase": "validation", "done", "total", "task"}`` per task; returns
    ``{"step", "tasks": {task: {"miou", "images", "support"}}, "mean_miou", "seconds"}``."""
    from .checkpoints import backbone_sha256
    from .config import MAMLConfig
    from .inference import predict
    from .metrics import ConfusionAccumulator
    from .pipeline import Backbone, adapt, release_replicas

    t0 = time.time()
    m = copy.deepcopy(model).cpu().eval()
    _set_layout(m, False)
    bb = Backbone(m, {"heads": {k: {"classes": v} for k, v in classes.items()}},
                  {k: v.detach().cpu() for k, v in inner_lrs.items()}, backbone_sha256(m), f"step {step}")
    mpp, devs, res = m.cfg.mpp, [str(device)], {}
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for k, (task, samples) in enumerate(val.items()):
                here = {"phase": "validation", "done": k, "total": len(val), "task": task}
                yield here
                sup = support[task]
                head = yield from relay(adapt(bb, [s.image for s in sup], [s.semantic for s in sup], classes[task],
                                              mpp=mpp, cfg=MAMLConfig(seed=seed), devices=devs), lambda _, h=here: h)
                acc = ConfusionAccumulator(len(classes[task]))
                for s in samples:  # the inner jobs' own progress is not passed on: it is not a training step
                    pred = yield from relay(predict(bb, head, s.image, mpp=mpp, devices=devs), lambda _, h=here: h)
                    acc.update(pred.semantic, s.semantic)
                res[task] = {"miou": round(float(acc.miou()), 4), "images": len(samples),
                             "support": [s.sample_id for s in sup]}
    finally:
        release_replicas(m)
    mean = float(np.mean([r["miou"] for r in res.values()])) if res else float("nan")
    return {"step": step, "tasks": res, "mean_miou": round(mean, 4), "seconds": round(time.time() - t0, 1)}


def validation_summary(res: dict) -> str:
    """One line for a :func:`validate` result: ``mean mIoU 0.632 (monuseg 0.769, glas 0.658; 16 s)``."""
    tasks = ", ".join(f"{t} {r['miou']:.3f}" for t, r in res["tasks"].items())
    return f"mean mIoU {res['mean_miou']:.3f} ({tasks}; {res['seconds']:.0f} s)"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def train(cfg: TrainConfig, *, resume: bool = True) -> Generator[dict, None, Path]:
    """Train (or resume) a backbone; yields progress dicts (``step``, ``steps``, ``loss``, ``phase``, this process's
    ``s_per_step`` and ``eta_s``) and returns the final checkpoint path. With ``cfg.val_fraction``, validations
    yield ``{"phase": "validation", "done", "total", "task"}`` per task and then their result,
    ``{"phase": "validation", "step", "steps", "val"}`` (see :func:`validate`); they have no ``loss``."""
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = training_device(cfg.device)
    log.info("training on %s (rank %d)", device, _rank())
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_json(cfg, out / "train_config.json")
    tasks, val = load_task_splits(cfg.data, cfg.model.mpp, cfg.holdout_tasks, cfg.val_fraction, cfg.seed)
    val_sup = validation_support(tasks, val, cfg.val_support, cfg.seed)
    model, classes = build_model(cfg, tasks)
    lrs = {k: torch.tensor(math.log(cfg.maml.inner_lr)) for k, _ in model.heads[GENERIC].named_parameters()} \
        if cfg.maml.learn_inner_lr else {}
    for v in lrs.values():
        v.requires_grad_(True)
    params = list(model.parameters()) + list(lrs.values())
    opt = torch.optim.Adam(params, lr=cfg.outer_lr, weight_decay=cfg.weight_decay)
    names = {id(p): n for n, p in model.named_parameters()} | {id(v): f"lr.{k}" for k, v in lrs.items()}
    model.to(device)
    nhwc = channels_last_on(cfg.channels_last, device)  # the supervised phase; the meta phase stays NCHW
    step = _maybe_resume(out, model, opt, names, lrs) if resume else 0
    if step:  # a resumed run: its checkpoint wins over init_from, whose record it carries on
        record = json.loads((out / "last.json").read_text()).get("training", {})
        init, last_val = record.get("init"), record.get("validation")
    else:  # in place: the optimizer keeps its parameters
        init = init_weights(model, cfg.init_from) if cfg.init_from else None
        last_val = None
    held_apart = {t: [s.sample_id for s in v] for t, v in val.items()}
    validating, every = bool(val) and _rank() == 0, cfg.val_every or cfg.checkpoint_every
    total_steps = cfg.supervised_steps + (cfg.meta_steps if cfg.method == "maml" else 0)
    seed = cfg.seed + 1000 * _rank() + step
    sup_iter, ep_iter = _loaders(tasks, cfg, seed, step)
    rng = np.random.default_rng(seed)
    logf = open(out / "log.jsonl", "a")
    t0, first = time.time(), step

    def validation(at: int) -> Generator[dict, None, dict]:
        res = yield from validate(model, classes, {k: v.exp() for k, v in lrs.items()}, val, val_sup, device, at,
                                  cfg.seed)
        logf.write(json.dumps({"step": at, "phase": "validation", **res}) + "\n")
        logf.flush()
        log.info("validation at step %d: %s", at, validation_summary(res))
        yield {"phase": "validation", "step": at, "steps": total_steps, "val": res}
        return res

    try:
        if validating and step == 0 and init:  # where fine-tuning starts from (forgetting shows against it)
            last_val = yield from validation(0)
        while step < total_steps:
            phase = "supervised" if step < cfg.supervised_steps else "meta"
            for g in opt.param_groups:
                g["lr"] = cfg.outer_lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            model.train()
            _set_layout(model, nhwc and phase == "supervised")
            if phase == "supervised":
                terms = supervised_loss(model, next(sup_iter), device, cfg.hv_loss_weight)
            else:
                exp_lrs = {k: v.exp() for k, v in lrs.items()}
                terms = meta_loss(model, next(ep_iter), cfg, exp_lrs, rng, device)
            opt.zero_grad(set_to_none=True)
            terms["total"].backward()
            _allreduce_grads(model, list(lrs.values()))
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            step += 1
            rec = {"step": step, "phase": phase, "seconds": round(time.time() - t0, 1), "device": str(device),
                   "layout": "nhwc" if _is_nhwc(model) else "nchw",
                   **{k: round(float(v.detach()), 5) for k, v in terms.items()}}
            pace = (time.time() - t0) / (step - first)  # this process's seconds per step (a resumed run starts late)
            progress = {"step": step, "steps": total_steps, "loss": float(terms["total"].detach()), "phase": phase,
                        "s_per_step": pace, "eta_s": pace * (total_steps - step)}
            if _rank() == 0:
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                if validating and (step % every == 0 or step == total_steps):  # before the checkpoint, which keeps it
                    last_val = yield from validation(step)
                if step % cfg.checkpoint_every == 0 or step == total_steps:
                    record = {"init": init, "held_apart": held_apart, "validation": last_val}
                    _save(out, model, opt, names, lrs, classes, cfg, step, record)
                    if step == cfg.supervised_steps:
                        save_model(model, out / "transfer", head_classes=classes,
                                   extra={"training": _recipe(cfg, step, record)})
            yield progress
    finally:  # also when the caller stops the run (a cancelled job): the log is closed, loader processes stop
        logf.close()
        for it in (sup_iter, ep_iter):
            getattr(it, "close", lambda: None)()
    return stem_paths(out / "last")[0]


def read_log(path: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """A run's ``log.jsonl`` as ``(steps, validations)``: one record per training step (a resumed run rewrites the
    steps after its checkpoint; the last record of a step is kept) and the validation records
    (``TrainConfig.val_fraction``; also the last per step), each in step order."""
    steps, vals = {}, {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            (vals if r.get("phase") == "validation" else steps)[r["step"]] = r
    return [steps[k] for k in sorted(steps)], [vals[k] for k in sorted(vals)]


def _loaders(tasks: dict[str, list[Sample]], cfg: TrainConfig, seed: int, step: int):
    """The supervised batches and the episode batches, in this process or (``cfg.loader_workers``) prefetched by
    worker processes, each worker with its own seed; the episode workers start when the meta phase does."""
    if not cfg.loader_workers:
        return (batch_loader(tasks, cfg.batch_size, cfg.augment, seed=seed),
                episode_loader(tasks, cfg.episodes, cfg.augment, seed=seed))
    n = cfg.loader_workers
    sup = prefetched(functools.partial(_worker_batches, tasks, cfg, seed), n) \
        if step < cfg.supervised_steps else iter(())
    eps = _deferred(lambda: prefetched(functools.partial(_worker_episodes, tasks, cfg, seed), n))
    return sup, eps


def _worker_batches(tasks, cfg: TrainConfig, seed: int, w: int):
    return batch_loader(tasks, cfg.batch_size, cfg.augment, seed=seed + 7919 * (w + 1))


def _worker_episodes(tasks, cfg: TrainConfig, seed: int, w: int):
    return episode_loader(tasks, cfg.episodes, cfg.augment, seed=seed + 7919 * (w + 1))


def _deferred(make):
    """An iterator that calls ``make()`` at its first ``next`` (loader processes only when they are needed)."""
    it = None
    try:
        while True:
            if it is None:
                it = make()
            yield next(it)
    finally:
        if it is not None:
            it.close()


def training_device(spec: str) -> torch.device:
    """The device of a training process: ``spec`` (see ``TrainConfig.device``); ``"auto"`` under torchrun is the
    rank's own GPU (``cuda:LOCAL_RANK``) when CUDA is available."""
    if spec.strip().lower() == "auto" and os.environ.get("LOCAL_RANK") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return get_device(spec)


def _recipe(cfg: TrainConfig, step: int, record: dict | None = None) -> dict:
    """The checkpoint's ``training`` entry: the config, the steps done and, where there are any, the start
    (``init``), the held-apart images (``held_apart``) and the latest validation (``validation``)."""
    from .config import to_dict

    return {"config": to_dict(cfg), "steps_done": step, **{k: v for k, v in (record or {}).items() if v}}


def _save(out: Path, model, opt, names, lrs, classes, cfg: TrainConfig, step: int, record: dict | None) -> None:
    save_model(model, out / "last", head_classes=classes, inner_lrs={k: v.exp() for k, v in lrs.items()},
               extra={"training": _recipe(cfg, step, record)})
    from .checkpoints import _atomic_save_tensors

    state = flatten_optimizer(opt, names) | {f"lr.{k}": v.detach() for k, v in lrs.items()}
    _atomic_save_tensors(state, out / "resume.safetensors", {"step": str(step)})


def _maybe_resume(out: Path, model, opt, names, lrs) -> int:
    from safetensors import safe_open

    rpath = out / "resume.safetensors"
    if not (rpath.exists() and (out / "last.json").exists()):
        return 0
    loaded, _, _ = load_model(out / "last")
    model.load_state_dict(loaded.state_dict(), strict=True)
    with safe_open(str(rpath), framework="pt") as f:
        step = int(f.metadata()["step"])
        flat = {k: f.get_tensor(k) for k in f.keys()}
    restore_optimizer(opt, names, {k: v for k, v in flat.items() if k.startswith("opt::")})
    with torch.no_grad():
        for k, v in lrs.items():
            if f"lr.{k}" in flat:
                v.copy_(flat[f"lr.{k}"])
    log.info("resumed from %s at step %d", rpath, step)
    return step
