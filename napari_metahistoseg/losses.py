"""Losses that accept sparse labels: pixels equal to IGNORE are skipped, never treated as background.

* :func:`seg_loss` — cross-entropy (optionally class-balanced) + soft Dice over labelled pixels.
* :func:`hover_loss` — HoVer-Net: NP = CE + Dice; HV = MSE + MSE of the maps' gradients inside nuclei.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data.task import IGNORE


def class_weights(target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights over the labelled pixels of ``target`` (absent classes get weight 0)."""
    t = target[target != IGNORE]
    counts = torch.bincount(t.flatten().long(), minlength=n_classes)[:n_classes].float()
    w = torch.where(counts > 0, counts.sum() / (counts.clamp(min=1) * (counts > 0).sum()), torch.zeros_like(counts))
    return w


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, *, eps: float = 1.0) -> torch.Tensor:
    """1 − mean soft Dice over the classes present in the labelled pixels. ``logits (B,C,H,W)``,
    ``target (B,H,W)`` int with IGNORE."""
    c = logits.shape[1]
    valid = target != IGNORE
    if not valid.any():
        return logits.sum() * 0.0
    prob = logits.softmax(1).permute(0, 2, 3, 1)[valid]  # (N, C)
    onehot = F.one_hot(target[valid].long(), c).float()
    inter = (prob * onehot).sum(0)
    denom = prob.sum(0) + onehot.sum(0)
    present = onehot.sum(0) > 0
    dice = (2 * inter + eps) / (denom + eps)
    return 1.0 - dice[present].mean()


def seg_loss(
    logits: torch.Tensor, target: torch.Tensor, *, balance: bool = False, dice_weight: float = 0.5
) -> torch.Tensor:
    """CE (+ inverse-frequency class weights when ``balance``) + ``dice_weight`` × soft Dice; IGNORE skipped.
    Returns 0 (with a graph) when nothing is labelled."""
    target = target.long()
    if not (target != IGNORE).any():
        return logits.sum() * 0.0
    w = class_weights(target, logits.shape[1]).to(logits.dtype) if balance else None
    ce = F.cross_entropy(logits, target, weight=w, ignore_index=IGNORE)
    if dice_weight:
        ce = ce + dice_weight * soft_dice_loss(logits, target)
    return ce


def _sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical 5x5 Sobel gradients of ``(B,1,H,W)`` maps (as in HoVer-Net's loss)."""
    k = torch.arange(-2, 3, dtype=x.dtype, device=x.device)
    smooth = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=x.dtype, device=x.device)
    deriv = k / (k * k).clamp(min=1)
    kh = (smooth[:, None] * deriv[None, :])
    kh = kh / kh.abs().sum()
    gx = F.conv2d(x, kh.view(1, 1, 5, 5), padding=2)
    gy = F.conv2d(x, kh.t().contiguous().view(1, 1, 5, 5), padding=2)
    return gx, gy


def hover_loss(
    out: dict[str, torch.Tensor],
    np_target: torch.Tensor,
    hv_target: torch.Tensor,
    *,
    nc_target: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """HoVer-Net losses. ``np_target (B,H,W)`` 0/1/IGNORE, ``hv_target (B,2,H,W)`` in [-1, 1],
    ``valid (B,)`` bool: samples whose HV targets exist (instance truth). Returns the terms and ``total``."""
    terms = {"np": seg_loss(out["np"], np_target, dice_weight=1.0)}
    hv = out["hv"]
    if valid is None:
        valid = torch.ones(hv.shape[0], dtype=torch.bool, device=hv.device)
    if valid.any():
        hv_v, tgt_v = hv[valid], hv_target[valid]
        labelled = (np_target[valid] != IGNORE).unsqueeze(1).to(hv.dtype)
        nuc = (np_target[valid] == 1).unsqueeze(1).to(hv.dtype)
        terms["hv_mse"] = ((hv_v - tgt_v) ** 2 * labelled).sum() / (labelled.sum() * 2).clamp(min=1)
        msge = hv.new_zeros(())
        for ch in range(2):
            gp = _sobel(hv_v[:, ch:ch + 1])[ch]
            gt = _sobel(tgt_v[:, ch:ch + 1])[ch]
            msge = msge + ((gp - gt) ** 2 * nuc).sum() / nuc.sum().clamp(min=1)
        terms["hv_msge"] = msge
    if nc_target is not None and "nc" in out:
        terms["nc"] = seg_loss(out["nc"], nc_target, dice_weight=1.0)
    terms["total"] = sum(v for k, v in terms.items())
    return terms
