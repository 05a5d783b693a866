"""GroupNorm U-Net backbone, task heads keyed by task in an ``nn.ModuleDict``, HoVer branches.

``MetaHistoSegNet(x, task)`` returns a dict of raw logits: ``{"seg": (B,C,H,W)}`` for a semantic head,
``{"np": (B,2,H,W), "hv": (B,2,H,W)[, "nc": (B,T,H,W)]}`` for a HoVer head. Activations and scaling happen
outside forward. Inputs are ``(B,3,H,W) float32`` RGB in [0, 1]; normalisation with the config's mean/std is
part of the backbone so callers never need to know it. H and W are padded to a multiple of
``2**(depth-1)`` internally and the output cropped back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state dict) whose inference on a CUDA device takes the group statistics
    from fp64-accumulating reductions and normalises with one fused multiply-add, in the input's dtype and memory
    format. torch's CUDA kernel reduces each (sample, group) row in one thread block (few blocks for few large
    rows) and copies channels-last inputs to NCHW: on an H200 this made a 16 MP prediction 1.1-1.7x faster
    (BENCHMARKS.md, "GPU"). Training, adaptation (gradients) and CPUs use torch's kernel (on the CPU the
    reductions were 2x slower). ``reduce_on_cuda`` switches the fast path off for comparisons."""

    reduce_on_cuda: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (x.is_cuda and self.reduce_on_cuda and self.affine and x.dim() == 4 and not torch.is_grad_enabled()):
            return super().forward(x)
        return group_norm_by_reduction(x, self.num_groups, self.weight, self.bias, self.eps)


def group_norm_by_reduction(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor,
                            eps: float) -> torch.Tensor:
    """Group normalisation of ``x (N, C, H, W)`` (any memory format, fp32 or bf16): per (sample, group) mean and
    variance as E[x] and E[x²] - E[x]² summed in fp64, then ``x * scale + shift`` per channel in ``x``'s dtype."""
    n, c, h, w = x.shape
    g = groups
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        xg, dims = x.permute(0, 2, 3, 1).reshape(n, h * w, g, c // g), (1, 3)  # a view: NHWC memory
    else:
        xg, dims = x.reshape(n, g, -1), (2,)
    count = (c // g) * h * w
    # fp64 sums: in fp32, E[x²] - E[x]² cancels where a group is nearly constant (a flat or glass-only tile moved
    # probabilities by up to 0.06); in fp64 the bundled model's outputs match a float64 forward to 1e-6 there. Each
    # sum is still one memory-bound pass
    mean = torch.sum(xg, dim=dims, dtype=torch.float64) / count  # (n, g)
    sq = torch.linalg.vector_norm(xg, 2, dim=dims, dtype=torch.float64).square_() / count
    rstd = (sq - mean * mean).clamp_min_(0).add_(eps).rsqrt_()
    scale = weight.double().view(1, g, c // g) * rstd[..., None]
    shift = bias.double().view(1, g, c // g) - mean[..., None] * scale
    return torch.addcmul(shift.reshape(n, c, 1, 1).to(x.dtype), x, scale.reshape(n, c, 1, 1).to(x.dtype))


def group_norm(c: int, groups: int) -> GroupNorm:
    """A :class:`GroupNorm` of ``c`` channels in at most ``groups`` groups (the most that divide ``c``)."""
    g = min(groups, c)
    while c % g:
        g -= 1
    return GroupNorm(g, c)


class ConvBlock(nn.Sequential):
    """(3x3 conv → GroupNorm → ReLU) × 2."""

    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), group_norm(cout, groups), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), group_norm(cout, groups), nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """U-Net with GroupNorm returning full-resolution decoder features ``(B, base_channels, H, W)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        chs = [cfg.base_channels * 2**i for i in range(cfg.depth)]
        self.encoders = nn.ModuleList()
        cin = cfg.in_channels
        for c in chs:
            self.encoders.append(ConvBlock(cin, c, cfg.groups))
            cin = c
        self.decoders = nn.ModuleList(ConvBlock(chs[i + 1] + chs[i], chs[i], cfg.groups)
                                      for i in reversed(range(cfg.depth - 1)))
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)

    @property
    def out_channels(self) -> int:
        return self.cfg.base_channels

    @property
    def multiple(self) -> int:
        return 2 ** (self.cfg.depth - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.encode(x))

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], int, int]:
        """Encoder half: ``(skips, h, w)`` for :meth:`decode` (the input is padded to a multiple of 2^(depth-1))."""
        h, w = x.shape[-2:]
        m = self.multiple
        ph, pw = (-h) % m, (-w) % m
        x = (x - self.mean) / self.std
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        return skips, h, w

    def decode(self, skips: list[torch.Tensor], h: int, w: int, x: torch.Tensor | None = None,
               start: int = 0) -> torch.Tensor:
        """Decoder half: features ``(B, base_channels, h, w)`` from :meth:`encode`'s output (not modified); or,
        from :meth:`decode_head_start`'s output, the decoder blocks ``start..`` only."""
        skips = list(skips)
        if x is None:
            x = skips.pop()
        for dec in list(self.decoders)[start:]:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = dec(torch.cat([x, skip], dim=1))
        return x[..., :h, :w]

    def decode_head_start(self, skips: list[torch.Tensor], h: int, w: int, start: int
                          ) -> tuple[list[torch.Tensor], int, int, torch.Tensor, int]:
        """Run the first ``start`` decoder blocks (the deep, low-resolution ones): returns the arguments of
        :meth:`decode` that finish the decoding from there — the skips not used yet, ``x`` and ``start``."""
        skips = list(skips)
        x = skips.pop()
        for dec in list(self.decoders)[:start]:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = dec(torch.cat([x, skip], dim=1))
        return skips, h, w, x, start


class PixelHead(nn.Module):
    """Per-pixel MLP (1x1 convs): features → hidden → ``out`` logits; ``hidden=0`` gives a linear head."""

    def __init__(self, cin: int, out: int, hidden: int) -> None:
        super().__init__()
        self.out_channels = out
        if hidden:
            self.net = nn.Sequential(nn.Conv2d(cin, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, out, 1))
        else:
            self.net = nn.Sequential(nn.Conv2d(cin, out, 1))

    def forward(self, f: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"seg": self.net(f)}


class HoVerHead(nn.Module):
    """HoVer branches on shared decoder features: NP (2 logits), HV (2 maps, trained towards [-1, 1]) and an
    optional NC (``n_types`` logits incl. background). HV uses a 3x3 conv for local context."""

    def __init__(self, cin: int, hidden: int, n_types: int = 0) -> None:
        super().__init__()
        hid = max(hidden, 16)
        self.np = nn.Sequential(nn.Conv2d(cin, hid, 1), nn.ReLU(inplace=True), nn.Conv2d(hid, 2, 1))
        self.hv = nn.Sequential(nn.Conv2d(cin, hid, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(hid, 2, 1))
        self.nc = (nn.Sequential(nn.Conv2d(cin, hid, 1), nn.ReLU(inplace=True), nn.Conv2d(hid, n_types, 1))
                   if n_types else None)

    def forward(self, f: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"np": self.np(f), "hv": self.hv(f)}
        if self.nc is not None:
            out["nc"] = self.nc(f)
        return out


class MetaHistoSegNet(nn.Module):
    """Backbone + task heads. ``heads`` is an ``nn.ModuleDict`` keyed by task name."""

    def __init__(self, cfg: ModelConfig, heads: dict[str, int] | None = None, hover_types: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = UNet(cfg)
        self.heads = nn.ModuleDict()
        for task, n in (heads or {}).items():
            self.add_head(task, n)
        if hover_types is not None:
            self.heads["hover"] = HoVerHead(self.backbone.out_channels, cfg.head_hidden, hover_types)

    def add_head(self, task: str, n_classes: int, extra_inputs: int = 0) -> PixelHead:
        """Create (or replace) the semantic head of ``task`` sized to ``n_classes``; ``extra_inputs``: channels the
        head takes after the decoder features (:func:`colour_channels`)."""
        if n_classes < 2:
            raise ValueError(f"task {task!r} needs at least 2 classes, got {n_classes}")
        head = PixelHead(self.backbone.out_channels + extra_inputs, n_classes, self.cfg.head_hidden)
        self.heads[task] = head
        return head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor | None, task: str,
                encoded: tuple[list[torch.Tensor], int, int] | None = None) -> dict[str, torch.Tensor]:
        """Head ``task`` on the backbone features of ``x``, or of ``encoded`` = ``backbone.encode(x)`` computed
        beforehand (a decoder-only inner loop encodes the support once instead of at every step)."""
        if task not in self.heads:
            raise ValueError(f"no head for task {task!r}; heads: {sorted(self.heads)}")
        feats = self.backbone.decode(*encoded) if encoded is not None else self.backbone(x)
        return self.heads[task](feats)


def head_param_names(model: nn.Module, task: str) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.startswith(f"heads.{task}.")]


def decoder_param_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.startswith("backbone.decoders.")]


def adapted_param_names(model: nn.Module, task: str, which: str, decoder_blocks: int = 0) -> list[str]:
    """Names of the parameters an inner loop adapts: ``"head"``, ``"decoder"`` (+head; with ``decoder_blocks``
    > 0 only that many decoder blocks at the full-resolution end) or ``"all"``."""
    if which == "head":
        return head_param_names(model, task)
    if which == "decoder":
        names = decoder_param_names(model)
        if decoder_blocks:
            n = len(model.backbone.decoders)
            keep = {f"backbone.decoders.{i}." for i in range(max(0, n - decoder_blocks), n)}
            names = [k for k in names if any(k.startswith(p) for p in keep)]
        return names + head_param_names(model, task)
    if which == "all":
        return [n for n, _ in model.named_parameters() if not n.startswith("heads.") or n.startswith(f"heads.{task}.")]
    raise ValueError(f"unknown adapt choice {which!r} (head, decoder, all)")


def to_tensor_image(images, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(N,H,W,3) uint8`` numpy → ``(N,3,H,W) float32`` in [0, 1] on ``device``."""
    t = torch.as_tensor(images)
    if t.ndim == 3:
        t = t[None]
    return t.to(device).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def gaussian_smooth(t: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Maps ``(N, C, H, W)`` smoothed per channel by a Gaussian of ``sigma_px`` (separable, truncated at 3 sigma,
    edges replicated); ``sigma_px <= 0`` returns ``t``. Isotropic, so it commutes with flips and transposes."""
    if sigma_px <= 0:
        return t
    r = max(1, math.ceil(3 * sigma_px))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=t.dtype, device=t.device) / sigma_px) ** 2)
    k = k / k.sum()
    c = t.shape[1]
    t = F.conv2d(F.pad(t, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(t, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


# Ruifrok & Johnston's H&E(-DAB) optical-density vectors (rows: haematoxylin, eosin, DAB), as in
# skimage.color.rgb2hed; the colour channels keep the first two stains
_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
HED_FROM_OD = torch.linalg.inv(_HED)[:, :2].float()  # (3 OD, 2 stains)
COLOUR_BASE = ("red", "green", "blue", "haematoxylin", "eosin")  # the channels before smoothing


def colour_base(x: torch.Tensor) -> torch.Tensor:
    """``(B, 5, H, W)``: RGB in [0, 1] and the haematoxylin and eosin optical densities of ``x (B, 3, H, W)``."""
    od = -torch.log(x.float().clamp_min(1 / 255))
    hed = torch.einsum("bchw,cs->bshw", od, HED_FROM_OD.to(x.device))
    return torch.cat([x.float(), hed], 1)


def colour_channels(x: torch.Tensor, stats: torch.Tensor, sigmas_px) -> torch.Tensor:
    """The colour inputs of a head (``MAMLConfig.colour_features``): :func:`colour_base` of ``x (B, 3, H, W)``
    standardised by the image's ``stats (2, 5)`` (means, standard deviations; :func:`image_colour_stats` of
    pipeline), then Gaussian-smoothed at each of ``sigmas_px`` (0 = as is): ``(B, 5 * len(sigmas_px), H, W)``.
    Per-pixel up to the smoothing, which reaches ``3 * max(sigmas_px)`` pixels: tiles with a larger halo agree."""
    stats = stats.to(x.device, torch.float32)
    base = (colour_base(x) - stats[0].view(1, -1, 1, 1)) / stats[1].view(1, -1, 1, 1)
    return torch.cat([gaussian_smooth(base, s) for s in sigmas_px], 1)
