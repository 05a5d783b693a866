"""The paper's two samplers over in-memory tasks.

* :func:`episode_loader` — task-level: draw a task from a user-given probability distribution, then
  instances of it, split into support and query; a batch is several episodes, each from one task.
* :func:`batch_loader` — instance-level (transfer-learning baseline): pool all tasks, truncate each to the
  same size (re-drawn every epoch), shuffle, and yield mixed batches, each item tagged with its task.

Both yield :class:`Batch` objects of augmented random crops and are reproducible for a seed.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ..config import AugmentConfig, EpisodeConfig
from .augment import augment_crop
from .task import IGNORE, Sample


@dataclass
class Batch:
    """Stacked crops: ``images (N,S,S,3) uint8``, ``semantic (N,S,S) uint8`` (IGNORE = unknown),
    ``instances (N,S,S) uint32`` (zeros where a task has none), ``has_instances (N,) bool``, ``tasks`` names."""

    images: np.ndarray
    semantic: np.ndarray
    instances: np.ndarray
    has_instances: np.ndarray
    tasks: list[str]

    def __len__(self) -> int:
        return len(self.tasks)


@dataclass
class Episode:
    task: str
    support: Batch
    query: Batch


def rescale_sample(sample: Sample, target_mpp: float | None) -> Sample:
    """Resample a sample to ``target_mpp`` µm/px (no-op if either mpp is unknown or they match within 2 %)."""
    from skimage.transform import resize

    if target_mpp is None or sample.mpp is None or abs(sample.mpp / target_mpp - 1) < 0.02:
        return sample
    f = sample.mpp / target_mpp
    h, w = sample.shape
    shape = (max(1, round(h * f)), max(1, round(w * f)))
    img = (resize(sample.image, shape, order=1, anti_aliasing=f < 1, preserve_range=True) + 0.5).astype(np.uint8)

    def lab(x, dt):
        return None if x is None else resize(x, shape, order=0, preserve_range=True, anti_aliasing=False).astype(dt)

    pts = None if sample.points is None else sample.points * f
    return sample.with_(image=img, semantic=lab(sample.semantic, np.uint8), instances=lab(sample.instances, np.uint32),
                        points=pts, mpp=target_mpp)


def _stack(crops, tasks: list[str]) -> Batch:
    s = crops[0].image.shape[0]
    inst = np.stack([c.instances if c.instances is not None else np.zeros((s, s), np.uint32) for c in crops])
    return Batch(
        images=np.stack([c.image for c in crops]),
        semantic=np.stack([c.semantic for c in crops]),
        instances=inst,
        has_instances=np.array([c.instances is not None for c in crops]),
        tasks=list(tasks),
    )


def _labelled_centre(sample: Sample, rng: np.random.Generator) -> tuple[float, float] | None:
    """A crop centre on a labelled pixel (half of the time on a foreground pixel) so crops are never empty."""
    if sample.semantic is None:
        return None
    sem = sample.semantic
    want_fg = rng.random() < 0.5
    cand = np.flatnonzero((sem != IGNORE) & ((sem > 0) if want_fg else True))
    if cand.size == 0:
        cand = np.flatnonzero(sem != IGNORE)
    if cand.size == 0:
        return None
    i = cand[rng.integers(cand.size)]
    return float(i // sem.shape[1]), float(i % sem.shape[1])


def random_crops(samples: list[Sample], n: int, rng: np.random.Generator, aug: AugmentConfig) -> list:
    idx = rng.choice(len(samples), size=n, replace=len(samples) < n)
    return [augment_crop(samples[i], rng, aug, centre=_labelled_centre(samples[i], rng)) for i in idx]


def _split_pool(n: int, n_support: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Disjoint support/query image indices when the task has enough images, else shared images."""
    perm = rng.permutation(n).tolist()
    if n >= 2:
        k = max(1, min(n - 1, round(n * n_support / (n_support + n_support))))
        return perm[:k], perm[k:]
    return perm, perm


def episode_loader(
    tasks: dict[str, list[Sample]],
    cfg: EpisodeConfig,
    aug: AugmentConfig,
    *,
    seed: int = 0,
) -> Iterator[list[Episode]]:
    """Endless batches of ``cfg.episodes_per_batch`` episodes. Task probabilities: ``cfg.task_weights``
    (normalised; tasks missing from it get weight 0 when it is non-empty, uniform when it is empty)."""
    names = sorted(tasks)
    if not names:
        raise ValueError("episode_loader needs at least one task")
    w = np.array([cfg.task_weights.get(t, 0.0) if cfg.task_weights else 1.0 for t in names], np.float64)
    if w.sum() <= 0 or (w < 0).any():
        raise ValueError(f"task weights must be >= 0 with a positive sum, got {dict(zip(names, w, strict=True))}")
    p = w / w.sum()
    rng = np.random.default_rng(seed)
    while True:
        batch = []
        for _ in range(cfg.episodes_per_batch):
            t = names[rng.choice(len(names), p=p)]
            pool = tasks[t]
            sup_i, qry_i = _split_pool(len(pool), cfg.n_support, rng)
            sup = random_crops([pool[i] for i in sup_i], cfg.n_support, rng, aug)
            qry = random_crops([pool[i] for i in qry_i], cfg.n_query, rng, aug)
            batch.append(Episode(t, _stack(sup, [t] * len(sup)), _stack(qry, [t] * len(qry))))
        yield batch


def batch_loader(
    tasks: dict[str, list[Sample]],
    batch_size: int,
    aug: AugmentConfig,
    *,
    seed: int = 0,
    per_task: int | None = None,
) -> Iterator[Batch]:
    """Endless mixed batches over pooled tasks. Every epoch each task is randomly truncated to the same
    number of instances (``per_task``, default: the smallest task's size) and the pool is reshuffled."""
    names = sorted(tasks)
    if not names or any(len(tasks[t]) == 0 for t in names):
        raise ValueError("batch_loader needs at least one task, each with at least one sample")
    rng = np.random.default_rng(seed)
    k = per_task or min(len(tasks[t]) for t in names)
    while True:
        pool = [(t, int(i)) for t in names for i in rng.permutation(len(tasks[t]))[:k]]
        order = rng.permutation(len(pool))
        if len(order) < batch_size:  # tiny pools: one batch drawn with replacement per epoch
            order = rng.choice(len(pool), size=batch_size, replace=True)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            items = [pool[j] for j in order[start:start + batch_size]]
            crops = [augment_crop(tasks[t][i], rng, aug, centre=_labelled_centre(tasks[t][i], rng)) for t, i in items]
            yield _stack(crops, [t for t, _ in items])


# ------------------------------------------------------------------------------------------ worker processes


def prefetched(make: Callable[[int], Iterator], workers: int, *, depth: int = 2) -> Iterator:
    """Items of ``workers`` independent iterators ``make(0)``, ..., ``make(workers - 1)``, interleaved round-robin
    (item ``i`` comes from iterator ``i % workers``), each run in its own process up to ``depth`` items ahead.

    For a GPU, whose training steps outrun one process's cropping and augmentation. The sequence depends on
    ``workers`` (each iterator has its own seed) but not on timing: a run is reproducible for a given count.
    Processes are forked where the platform can (no data is copied), else spawned (``make`` must then be
    picklable, e.g. a :func:`functools.partial` of a module-level function). They stop when the iterator is closed
    or garbage-collected, and die with the parent."""
    if workers < 1:
        raise ValueError(f"prefetched needs at least one worker, got {workers}")
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    queues = [ctx.Queue(maxsize=max(1, depth)) for _ in range(workers)]
    procs = [ctx.Process(target=_produce, args=(make, w, q), daemon=True, name=f"loader-{w}")
             for w, q in enumerate(queues)]
    for p in procs:
        p.start()
    try:
        i = 0
        while True:
            w = i % workers
            while True:
                try:
                    kind, item = queues[w].get(timeout=5.0)
                    break
                except queue.Empty:
                    if not procs[w].is_alive():
                        raise RuntimeError(f"data loader process {w} died (exit code {procs[w].exitcode})") from None
            if kind == "error":
                raise RuntimeError(f"data loader process {w} failed: {item}")
            yield item
            i += 1
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(timeout=5)


def _produce(make: Callable[[int], Iterator], w: int, q) -> None:
    import torch

    torch.set_num_threads(1)  # as torch's DataLoader workers: no OpenMP pool shared with (forked from) the parent
    try:
        for item in make(w):
            q.put(("item", item))
    except Exception as e:  # noqa: BLE001 - reported to the consumer, which raises it with the worker's number
        q.put(("error", f"{type(e).__name__}: {e}"))
