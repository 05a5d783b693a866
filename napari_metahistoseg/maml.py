"""MAML on torch.func: inner loops as pure functions over parameter dicts.

Nothing here mutates a model or a caller's dict: parameters go in as ``dict[str, Tensor]`` and adapted
("fast") weights come out as a new dict. Models are evaluated with ``torch.func.functional_call`` and
differentiated with ``torch.func.grad_and_value``.

* :func:`inner_loop` — generic SGD / Meta-SGD inner loop over the named parameters, optionally split across
  a device set (each device holds a replica of the fast weights and a shard of the support; gradients are
  summed on the first device). A generator: yields ``{"step", "steps", "loss"}``, returns the fast weights.
* :func:`pixel_support` — labelled pixels of cached support features, stratified per class.
* :func:`head_pixel_loss` — class-balanced cross-entropy of a pixel head on such pixels (decomposable over
  shards, so sharded gradients add up exactly to the single-device gradient).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value

from .data.task import IGNORE
from .devices import with_intra_op_threads

Params = dict[str, Tensor]
LossFn = Callable[[Params], Tensor]


def sgd_update(params: Params, grads: Params, lr: float, lrs: Params | None = None) -> Params:
    """``p - lr_p * g`` for every name in ``grads`` (``lrs[name]`` overrides ``lr``; Meta-SGD); new dict."""
    out = dict(params)
    for name, g in grads.items():
        step = lrs[name] if lrs is not None and name in lrs else lr
        out[name] = params[name] - step * g
    return out


def inner_loop(
    loss_fns: Sequence[LossFn],
    params: Params,
    names: Sequence[str],
    *,
    steps: int,
    lr: float,
    first_order: bool = True,
    lrs: Params | None = None,
    devices: Sequence[torch.device | str] | None = None,
    concurrent: bool = False,
    shard_threads: int | None = None,
) -> Generator[dict, None, Params]:
    """Run ``steps`` SGD steps on the parameters ``names``.

    ``loss_fns[d]`` computes the (sum-normalised) loss of shard ``d`` from a full parameter dict living on
    ``devices[d]``; the total loss is the sum over shards. With ``first_order`` the gradients are detached
    (FOMAML); otherwise the graph is kept for a second-order outer update. Yields progress per step and
    returns the fast-weight dict on ``devices[0]`` (the input ``params`` is left untouched). ``concurrent=True``
    computes the shards in one thread each (torch releases the GIL; each ``loss_fns[d]`` must use its own module
    replica); the gradients are still summed in shard order, so the result does not depend on it.
    ``shard_threads``: torch intra-op threads of each concurrent shard (e.g. 1 for CPU shards side by side; None =
    inherited).
    """
    if not loss_fns:
        raise ValueError("inner_loop needs at least one loss function (support shard)")
    devs = [torch.device(d) for d in (devices or [next(iter(params.values())).device])]
    if len(devs) != len(loss_fns):
        raise ValueError(f"{len(loss_fns)} support shards for {len(devs)} devices")
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"parameters to adapt not found: {missing[:3]}")
    # the fast weights (and per-tensor step sizes) live on the first device, where the shards' gradients are summed;
    # .to() is differentiable (second order) and a no-op for tensors already there
    fast = {k: v.to(devs[0]) for k, v in params.items()}
    if lrs is not None:
        lrs = {k: v.to(devs[0]) if isinstance(v, Tensor) else v for k, v in lrs.items()}
    pool = ThreadPoolExecutor(len(devs), thread_name_prefix="inner-shard") if concurrent and len(devs) > 1 else None
    try:
        for step in range(steps):
            grads, total_loss = _shard_grads(fast, names, loss_fns, devs, pool, shard_threads)
            if first_order:
                grads = {n: g.detach() for n, g in grads.items()}
            fast = sgd_update(fast, grads, lr, lrs)
            yield {"step": step + 1, "steps": steps, "loss": total_loss}
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    return fast


def _shard_grads(fast: Params, names: Sequence[str], loss_fns: Sequence[LossFn], devs: list[torch.device],
                 pool: ThreadPoolExecutor | None, shard_threads: int | None = None) -> tuple[Params, float]:
    """Gradients of the summed shard losses w.r.t. ``names`` (on ``devs[0]``) and the total loss."""

    def one(dev: torch.device, fn: LossFn) -> tuple[Params, Tensor]:
        rest = {k: v.to(dev) for k, v in fast.items() if k not in names}

        def shard_loss(sub: Params) -> Tensor:
            return fn({**rest, **sub})

        return grad_and_value(shard_loss)({n: fast[n].to(dev) for n in names})

    if pool is None:
        results = [one(dev, fn) for dev, fn in zip(devs, loss_fns, strict=True)]
    else:
        futures = [pool.submit(one, dev, fn) if shard_threads is None else
                   pool.submit(with_intra_op_threads, shard_threads, one, dev, fn)
                   for dev, fn in zip(devs, loss_fns, strict=True)]
        results = [f.result() for f in futures]
    total_loss = 0.0
    grads: Params = {}
    for g, loss in results:
        total_loss += float(loss.detach())
        for n in names:
            gn = g[n].to(devs[0])
            grads[n] = gn if n not in grads else grads[n] + gn
    return grads, total_loss


def run(gen: Generator, each: Callable[[dict], object] | None = None) -> object:
    """Drive a progress generator to completion and return its result; ``each(event)`` sees every progress event
    (a command line printing progress)."""
    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            return stop.value
        if each is not None:
            each(p)


def relay(gen: Generator, fn: Callable[[dict], dict]) -> Generator[dict, None, object]:
    """Yield ``fn(event)`` for every progress event of ``gen`` and return its result (``yield from`` with a
    mapping). Closing the relay (a cancelled job) closes ``gen`` at once."""
    try:
        while True:
            try:
                p = next(gen)
            except StopIteration as stop:
                return stop.value
            yield fn(p)
    finally:
        gen.close()


def pixel_support(
    features: Tensor, labels: Tensor, n_classes: int, *, max_pixels: int, seed: int = 0, stratified: bool = True,
) -> tuple[Tensor, Tensor]:
    """Labelled pixels of ``features (N,F,H,W)`` with ``labels (N,H,W)`` (IGNORE skipped): ``stratified``, at most
    ``max_pixels // n_present`` per class; otherwise a uniform sample of ``max_pixels`` labelled pixels (keeps the
    support's class frequencies). Returns ``X (P,F)`` and ``y (P,) int64``."""
    lab = labels.reshape(-1).long()
    feats = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    valid = lab != IGNORE
    if valid.sum() == 0:
        raise ValueError("the support has no labelled pixels (everything is 'unknown'): paint some labels")
    if (lab[valid] >= n_classes).any():
        raise ValueError(f"support labels contain class ids >= {n_classes} (the head's class count)")
    gen = np.random.default_rng(seed)
    if not stratified:
        idx = torch.nonzero(valid).flatten().cpu().numpy()
        if idx.size > max_pixels:
            idx = np.sort(gen.choice(idx, max_pixels, replace=False))
        sel = torch.from_numpy(idx).to(lab.device)
        return feats[sel], lab[sel]
    present = torch.unique(lab[valid]).tolist()
    cap = max(1, max_pixels // len(present))
    picks = []
    for c in present:
        idx = torch.nonzero(lab == c).flatten().cpu().numpy()
        if idx.size > cap:
            idx = gen.choice(idx, cap, replace=False)
        picks.append(torch.from_numpy(np.sort(idx)))
    sel = torch.cat(picks).to(lab.device)
    return feats[sel], lab[sel]


def balanced_weights(y: Tensor, n_classes: int, balance: bool) -> Tensor:
    """Per-class CE weights: inverse frequency over ``y`` (absent classes 0) or ones."""
    counts = torch.bincount(y, minlength=n_classes).float()
    if not balance:
        return torch.ones(n_classes, device=y.device)
    return torch.where(counts > 0, counts.sum() / counts.clamp(min=1), torch.zeros_like(counts))


def head_pixel_logits(head: nn.Module, params: Params, x: Tensor) -> Tensor:
    """Logits ``(P, C)`` of a 1x1-conv head on pixel vectors ``x (P, F)``."""
    out = functional_call(head, params, (x.t().reshape(1, x.shape[1], x.shape[0], 1),))
    logits = out["seg"] if isinstance(out, dict) else out
    return logits.reshape(logits.shape[1], -1).t()


def head_pixel_loss(head: nn.Module, params: Params, x: Tensor, y: Tensor, w: Tensor, norm: float) -> Tensor:
    """Sum of class-weighted CE over ``x, y`` divided by ``norm`` (the total weight over all shards)."""
    logits = head_pixel_logits(head, params, x)
    return F.cross_entropy(logits, y, weight=w, reduction="sum") / norm


def shard_pixels(x: Tensor, y: Tensor, devices: Sequence[torch.device | str]) -> list[tuple[Tensor, Tensor]]:
    """Split pixel support into one contiguous shard per device (moved to it)."""
    parts = torch.tensor_split(torch.arange(len(y)), len(devices))
    return [(x[p].to(d), y[p].to(d)) for p, d in zip(parts, devices, strict=True)]


def head_params(head: nn.Module) -> Params:
    """Detached copies of a head's parameters (leaf tensors that require grad)."""
    return {k: v.detach().clone().requires_grad_(True) for k, v in head.named_parameters()}


def adapt_head_on_pixels(
    head: nn.Module,
    init: Params,
    x: Tensor,
    y: Tensor,
    *,
    n_classes: int,
    steps: int,
    lr: float,
    first_order: bool = True,
    balance: bool = True,
    lrs: Params | None = None,
    devices: Sequence[torch.device | str] = ("cpu",),
) -> Generator[dict, None, Params]:
    """Inner loop of a pixel head on cached support pixels, sharded over ``devices``."""
    w = balanced_weights(y, n_classes, balance)
    norm = float((w[y]).sum().clamp(min=1e-8))
    shards = shard_pixels(x, y, devices)
    # ``head`` is only a stateless template for functional_call (no buffers): the fast weights themselves
    # are replicated per device inside inner_loop.
    fns = [
        (lambda p, xs=xs, ys=ys, ws=ws: head_pixel_loss(head, p, xs, ys, ws, norm))
        for xs, ys, ws in ((xs, ys, w.to(xs.device)) for xs, ys in shards)
    ]
    return (yield from inner_loop(fns, init, list(init), steps=steps, lr=lr, first_order=first_order, lrs=lrs,
                                  devices=list(devices)))
