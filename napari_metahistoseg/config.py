"""Frozen, validated configuration dataclasses with units, and their JSON I/O.

Every tunable number of the library is a field here (never a literal in a function body). Units are in the
field name or its comment: ``_px`` pixels, ``_um`` micrometres, ``_s`` seconds. Sizes that depend on the
resolution are given in µm and converted with the image's microns-per-pixel (mpp).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class ModelConfig:
    """GroupNorm U-Net backbone and heads."""

    in_channels: int = 3
    base_channels: int = 16  # channels of the first encoder level; doubles per level
    depth: int = 4  # number of resolution levels (3 poolings for depth 4)
    groups: int = 8  # GroupNorm groups (clipped to the channel count)
    head_hidden: int = 32  # hidden width of the pixel-MLP heads (0 = linear 1x1 head)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # input normalisation on [0, 1] RGB
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    mpp: float = 0.5  # µm per pixel the backbone was trained at; inputs are rescaled to it

    def __post_init__(self) -> None:
        _positive(self, "base_channels", "depth", "groups", "in_channels", "mpp")
        if self.head_hidden < 0:
            raise ValueError("ModelConfig.head_hidden must be >= 0")


@dataclass(frozen=True)
class MAMLConfig:
    """Inner-loop (task adaptation) settings — what the Adapt button runs."""

    # defaults chosen on the dev data with benchmarks/tune_adapt.py (results/tune_adapt_v2.md; BENCHMARKS.md)
    steps: int = 20  # inner-loop gradient steps on the support set
    inner_lr: float = 0.1  # SGD step size (paper: 0.01); with learn_inner_lr, the mean of the per-tensor sizes
    first_order: bool = True  # drop second-order terms when differentiating through the inner loop
    adapt: str = "head"  # which parameters adapt: "head" | "decoder" (decoder + head) | "all"
    learn_inner_lr: bool = True  # Meta-SGD / MAML++: the backbone's meta-learned per-tensor inner step sizes
    max_support_pixels: int = 50_000  # labelled pixels sampled per head-only step (features cached)
    # True: stratified pixel sampling + inverse-frequency CE weights (neutral when the labelled class ratio is
    # arbitrary: strokes, clicks; and it keeps rare classes of multi-class tasks); False: uniform sampling + plain
    # CE (the head learns the support's class prior); "auto": False for a two-class support of which at least
    # dense_label_fraction of the crop is labelled, else True
    class_balance: bool | str = "auto"
    dense_label_fraction: float = 0.5  # labelled share of the support crop (0-1) above which "auto" is unbalanced
    seed: int = 0  # seeds the support-pixel sampling and any new head's initialisation
    # decoder/all modes on a CPU-only device set: support shards computed side by side, each with one intra-op
    # thread (0 = one shard per torch thread; 1 = a single shard using all threads). 2 shards on 2 cores: 1.6x
    cpu_shards: int = 0
    # decoder mode: how many decoder blocks adapt, counted from the full-resolution end (0 = all of them). The
    # deeper, frozen blocks run once on the support instead of at every step. 10 steps on 8 x 256² (2 CPU cores):
    # all 4 blocks 16.8 s, the last 2 12.5 s, the last one 7.1 s; dev mIoU within 0.002 of each other on MoNuSeg
    # (1 tile) and GlaS (4 images) (benchmarks/tune_decoder.py; BENCHMARKS.md, "Adaptation latency")
    decoder_blocks: int = 1
    # head mode, densely labelled two-class support: after the inner loop, the class decision (classes layer,
    # objects) uses the foreground-probability threshold of the grid below that maximises the support's mIoU (ties:
    # closest to 0.5) instead of 0.5; probabilities, and so nuclei and point detection, are unchanged
    # (BENCHMARKS.md, "Adaptation defaults": threshold calibration)
    calibrate_threshold: bool = True
    threshold_min: float = 0.2  # foreground-probability thresholds tried (0-1), from min to max in steps of step
    threshold_max: float = 0.8
    threshold_step: float = 0.05
    # with calibrate_threshold (same supports): the class decision is also made on class probabilities smoothed by
    # the Gaussian of the sigma below (µm) that maximises the support's mIoU (ties: the smallest). It removes the
    # pixel noise of heads on large objects (GlaS glands: +0.015 mIoU at K = 4) and keeps 0 on nuclei (BENCHMARKS.md,
    # "Adaptation defaults": smoothing calibration); probabilities, and so nuclei and point detection, unchanged
    calibrate_smoothing: bool = True
    smoothing_um: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0)  # sigmas tried; keep 3 sigma within the tile halo
    calibration_window_px: int = 768  # side (model px) of the window of each support image scored for it
    # a sigma > 0 must beat no smoothing by this much support mIoU: on the support the head's own training pixels
    # favour smoothing a little (MoNuSeg: +0.005 there, -0.026 on the queries); the gains that carried over to the
    # queries were +0.011 to +0.026 on the support (GlaS, BM-Graz)
    smoothing_min_gain: float = 0.01
    # head mode: the head also sees the image's colour (RGB and haematoxylin/eosin optical density, standardised by
    # the image's own statistics so a lab's stain shift cancels, each Gaussian-smoothed at colour_sigmas_um) next
    # to the backbone's features; those weights start at 0 (the meta-learned head is unchanged) and take
    # colour_lr_scale x the head's step size. Measured on the dev data with evaluate (BENCHMARKS.md, "Adaptation
    # defaults": colour inputs): BM-Graz cells, which the backbone never saw, mIoU +0.014 (one image) to +0.032
    # (clicks); GlaS lost up to 0.08 and CPM-15 0.007 without the two rules below, which drop them there
    colour_features: bool = True
    colour_sigmas_um: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)  # keep 3 sigma within the tile halo
    colour_lr_scale: float = 10.0
    # the image statistics that standardise them skip background (glass) pixels: total RGB optical density below
    # this (unitless; 0.3 = a uniform grey of about 231/255), so a slide with much glass and a tissue crop of it agree
    colour_tissue_min_od: float = 0.3
    # ... for cell-sized objects only: the support's labelled objects (connected components of its non-background
    # classes) have a median area <= this (µm²; nuclei and cells, not glands: GlaS lost up to 0.08 mIoU with them)
    colour_max_object_um2: float = 250.0
    # ... and they are kept only if a head with them beats one without by colour_min_gain mIoU in a two-fold
    # cross-check on the support (pipeline.colour_check: support images split by parity, one image by its halves;
    # on the dev data smaller support gains did not carry over to the queries: MoNuSeg, CPM-15 -0.001 to -0.007)
    colour_check: bool = True
    colour_min_gain: float = 0.005
    colour_check_pixels: int = 20_000  # support pixels the cross-check's fits use (both folds together)

    def __post_init__(self) -> None:
        if not (self.smoothing_um and all(isinstance(v, (int, float)) and v >= 0 for v in self.smoothing_um)):
            raise ValueError(f"MAMLConfig.smoothing_um must be one or more sigmas >= 0 (µm), got {self.smoothing_um!r}")
        if not (self.colour_sigmas_um and all(isinstance(v, (int, float)) and v >= 0 for v in self.colour_sigmas_um)):
            raise ValueError("MAMLConfig.colour_sigmas_um must be one or more sigmas >= 0 (µm), got "
                             f"{self.colour_sigmas_um!r}")
        if not self.colour_max_object_um2 > 0:
            raise ValueError(f"MAMLConfig.colour_max_object_um2 must be > 0 (µm²), got {self.colour_max_object_um2!r}")
        if not -1.0 <= self.colour_min_gain <= 1.0:
            raise ValueError(f"MAMLConfig.colour_min_gain must be in [-1, 1], got {self.colour_min_gain!r}")
        if not (isinstance(self.colour_check_pixels, int) and self.colour_check_pixels >= 2):
            raise ValueError("MAMLConfig.colour_check_pixels must be an integer >= 2, got "
                             f"{self.colour_check_pixels!r}")
        if not self.colour_tissue_min_od >= 0:
            raise ValueError(f"MAMLConfig.colour_tissue_min_od must be >= 0, got {self.colour_tissue_min_od!r}")
        if not self.colour_lr_scale > 0:
            raise ValueError(f"MAMLConfig.colour_lr_scale must be > 0, got {self.colour_lr_scale!r}")
        if not 0.0 <= self.smoothing_min_gain <= 1.0:
            raise ValueError(f"MAMLConfig.smoothing_min_gain must be in [0, 1], got {self.smoothing_min_gain!r}")
        if not (isinstance(self.calibration_window_px, int) and self.calibration_window_px >= 16):
            raise ValueError("MAMLConfig.calibration_window_px must be an integer >= 16, got "
                             f"{self.calibration_window_px!r}")
        if not 0.0 < self.threshold_min <= self.threshold_max < 1.0 or not self.threshold_step > 0:
            raise ValueError("MAMLConfig needs 0 < threshold_min <= threshold_max < 1 and threshold_step > 0, got "
                             f"{self.threshold_min!r}, {self.threshold_max!r}, {self.threshold_step!r}")
        if not (isinstance(self.decoder_blocks, int) and self.decoder_blocks >= 0):
            raise ValueError(f"MAMLConfig.decoder_blocks must be an integer >= 0, got {self.decoder_blocks!r}")
        if not (isinstance(self.cpu_shards, int) and self.cpu_shards >= 0):
            raise ValueError(f"MAMLConfig.cpu_shards must be an integer >= 0, got {self.cpu_shards!r}")
        if self.adapt not in ("head", "decoder", "all"):
            raise ValueError(f"MAMLConfig.adapt must be 'head', 'decoder' or 'all', got {self.adapt!r}")
        if self.steps < 0:
            raise ValueError("MAMLConfig.steps must be >= 0")
        _positive(self, "inner_lr", "max_support_pixels")
        if self.class_balance not in (True, False, "auto"):
            raise ValueError(f"MAMLConfig.class_balance must be true, false or 'auto', got {self.class_balance!r}")
        if not 0.0 <= self.dense_label_fraction <= 1.0:
            raise ValueError(f"MAMLConfig.dense_label_fraction must be in [0, 1], got {self.dense_label_fraction!r}")


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation as in MetaHistoSeg (applied consistently to image, masks, instances and points)."""

    scale_min: float = 0.8
    scale_max: float = 1.2
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.1
    hue: float = 0.1  # fraction of the hue circle (0.1 = ±36°)
    flip_p: float = 0.5  # per axis
    rotate_deg: float = 15.0  # uniform in ±rotate_deg
    crop_px: int = 256  # square crop side (paper: 768)

    def __post_init__(self) -> None:
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError("AugmentConfig needs 0 < scale_min <= scale_max")
        _positive(self, "crop_px")


@dataclass(frozen=True)
class EpisodeConfig:
    """Task-level sampling (episode_loader)."""

    n_support: int = 8
    n_query: int = 8
    episodes_per_batch: int = 4
    task_weights: dict[str, float] = field(default_factory=dict)  # empty = uniform over tasks

    def __post_init__(self) -> None:
        _positive(self, "n_support", "n_query", "episodes_per_batch")


@dataclass(frozen=True)
class TrainConfig:
    """Backbone training: supervised multi-task warm-up, then first-order MAML episodes."""

    model: ModelConfig = field(default_factory=ModelConfig)
    maml: MAMLConfig = field(default_factory=lambda: MAMLConfig(steps=5, inner_lr=0.1, learn_inner_lr=True))
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    episodes: EpisodeConfig = field(default_factory=lambda: EpisodeConfig(n_support=4, n_query=4,
                                                                          episodes_per_batch=2))
    data: dict[str, str] = field(default_factory=dict)  # task name -> folder
    holdout_tasks: tuple[str, ...] = ()  # leave-one-task-out: tasks never trained on
    method: str = "maml"  # "maml" | "transfer"
    supervised_steps: int = 1500  # multi-task supervised steps before meta-training
    meta_steps: int = 1000  # meta-training outer steps
    batch_size: int = 8  # crops per supervised step
    outer_lr: float = 1e-3  # Adam (paper: 1e-4 for 300k iterations; we train ~1000x fewer)
    weight_decay: float = 1e-5
    hv_loss_weight: float = 1.0  # multiplier of the HoVer HV terms (MSE + MSGE) in the supervised loss
    checkpoint_every: int = 100  # steps
    seed: int = 0
    threads: int = 0  # torch intra-op threads (0 = torch default)
    # "auto": under torchrun each rank takes cuda:LOCAL_RANK, else the first GPU; a CPU when there is none.
    # "cpu", "cuda", "cuda:1", ...: that device (a missing one is an error, never a silent fallback)
    device: str = "auto"
    # processes that crop and augment batches/episodes ahead of the training steps (0 = in the training process,
    # the bundled backbone's recipe). A GPU step outruns one process (BENCHMARKS.md); the batches then come from one
    # seeded stream per worker, so a run is reproducible for a given count, not across counts
    loader_workers: int = 0
    # NHWC (channels-last) weights and inputs in the supervised phase: "cpu" = on a CPU device only (oneDNN's NHWC
    # convolutions: a supervised step 7-18 % faster on 2 cores; the meta phase was not faster, so it stays NCHW;
    # BENCHMARKS.md "Training speed on the CPU"), "all" = on every device, "none". GPUs stay NCHW by default: with
    # GroupNorm, channels-last cost layout copies on the H200 (BENCHMARKS.md "GPU")
    channels_last: str = "cpu"
    # start from trained weights instead of random ones (fine-tuning): "default" (the bundled backbone),
    # "transfer" (the bundled transfer-learning baseline) or a checkpoint path of the same architecture; the
    # backbone and every head of the same name and shape are copied, new tasks get new heads. "" = random. A run
    # that resumes from its own checkpoint ignores it
    init_from: str = ""
    # validation on held-apart images (USERS.md #4: curves on data the run does not train on, and forgetting when
    # fine-tuning): this share of each task's source images (whole images: CoNSeP tiles go with their parent) is
    # never trained on; every ``val_every`` steps (0 = at every checkpoint), and before the first step of a run that
    # starts from ``init_from``, the generic head is adapted as the GUI's Adapt does on ``val_support`` training
    # images of each task and scored (mIoU) on its held-apart images. Logged in log.jsonl and the checkpoint.
    # 0 = no validation (the bundled recipe: it trains on every dev image)
    val_fraction: float = 0.0
    val_every: int = 0  # steps
    val_support: int = 1  # training images per task whose full labels adapt the head in a validation
    out_dir: str = "runs/backbone"

    def __post_init__(self) -> None:
        if self.method not in ("maml", "transfer"):
            raise ValueError(f"TrainConfig.method must be 'maml' or 'transfer', got {self.method!r}")
        _check_layout(self)
        if not (isinstance(self.loader_workers, int) and self.loader_workers >= 0):
            raise ValueError(f"TrainConfig.loader_workers must be an integer >= 0, got {self.loader_workers!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"TrainConfig.val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.val_every < 0 or self.val_support < 1:
            raise ValueError(f"TrainConfig.val_every must be >= 0 and val_support >= 1, got {self.val_every!r} and "
                             f"{self.val_support!r}")


def channels_last_on(mode: str, device) -> bool:
    """Whether a layout setting (``TrainConfig`` / ``TilingConfig.channels_last``: ``"cpu"`` = NHWC on CPU devices
    only, ``"all"``, ``"none"``) asks for channels-last on ``device`` (``torch.device`` or a spec string)."""
    kind = getattr(device, "type", str(device).split(":")[0])
    return mode == "all" or (mode == "cpu" and kind == "cpu")


def _check_layout(cfg, name: str = "channels_last") -> None:
    if getattr(cfg, name) not in ("cpu", "all", "none"):
        raise ValueError(f"{type(cfg).__name__}.{name} must be 'cpu', 'all' or 'none', got {getattr(cfg, name)!r}")


def _all_cpu(devices) -> bool:
    """Whether every device (``torch.device`` or a spec string such as ``"cuda:1"``) is a CPU."""
    return all(getattr(d, "type", str(d).split(":")[0]) == "cpu" for d in devices)


@dataclass(frozen=True)
class TilingConfig:
    """Tiled inference over large images."""

    tile_px: int = 512  # tile side in model pixels
    halo_px: int = 32  # overlap on each side, blended with a cosine ramp
    # tiles per forward pass and device (GPU). 16: on the H200, 512 px tiles ran at 78 MP/s with 4 per forward and
    # 103 with 16 (BENCHMARKS.md "GPU", session 9); a GPU short of memory falls back to fewer (resilience.py)
    batch_size: int = 16
    cpu_batch_size: int = 1  # tiles per forward pass when every device is a CPU (1 was fastest on 2 cores)
    # CPU-only device sets: tiles run side by side in this many threads of one intra-op thread each (0 = torch's
    # thread count; 1 = one tile at a time on all threads). On the 2-core dev VM the two were within its run-to-run
    # noise (0-15 % either way, BENCHMARKS.md), so 1 stays the default; on many cores tile threads may scale better
    cpu_workers: int = 1
    # freed memory (MB) glibc keeps for reuse instead of unmapping it after every tile (process-wide, set when a
    # CPU runs tiles; 0 = leave malloc alone); page faults on fresh pages cost ~35 % of 1024² prediction on the VM
    malloc_keep_mb: float = 256.0
    # NHWC (channels-last) weights and inputs: "cpu" = on CPU devices only (oneDNN's NHWC convolutions are faster
    # there), "all" = on every device, "none". GPUs take NCHW by default: with GroupNorm's CUDA inference path a 16 MP
    # prediction on an H200 was as fast in NCHW as channels-last in fp32 and faster in bf16 in most runs (183-203
    # against 113-200 MP/s; BENCHMARKS.md "GPU prediction", session 13). True / False (older code) = "all" / "none"
    channels_last: str = "cpu"
    autocast_bf16: bool = False  # bf16 autocast on CUDA
    # torch.compile the network's forward on CUDA devices (never on a CPU, where the compiled forward was 1.7x
    # slower). Static shapes: each new (batch, tile) shape compiles once (~15-30 s on an H200), later images and
    # heads of the same architecture reuse it within the process (dynamic shapes made the forward slower than eager;
    # BENCHMARKS.md "GPU"). For slides and batch runs, not for a first click in the GUI
    compile: bool = False
    # in-memory prediction on a GPU: tiles are blended on the first device of the set (no per-tile copies to host
    # memory, no host-side blending; the blended maps come back once) while its accumulators (float32 maps + blend
    # weights) take at most this many MB of device memory; larger images, and CPU-first device sets, blend on the host
    device_blend_max_mb: float = 4096.0
    # test-time augmentation: average the outputs of this many dihedral variants of every tile (1 = off; 2 = +
    # left-right flip; 4 = all flips; 8 = flips and transposes). HV maps are mapped back (signs, axes). Costs as
    # many forward passes
    tta_variants: int = 1
    instance_window_px: int = 1024  # core side of the HoVer post-processing windows (image pixels)
    instance_margin_um: float = 24.0  # context around each window; must exceed the largest nucleus diameter
    stream_above_mp: float = 16.0  # images above this many megapixels are predicted streamed, into zarr
    tile_multiple_px: int = 16  # balanced tiles are rounded up to this (the U-Net pads inputs to 2**(depth-1))
    band_float32_max_mb: float = 256.0  # streamed row-of-tiles buffers above this use float16 (half the memory)
    # streamed label outputs (semantic, instances, objects) get nearest-neighbour levels (each half the previous)
    # until the longer side is at most this, so a viewer shows a slide's labels multiscale, loading only what is on
    # screen (napari reads a single-scale layer whole); 0 = no levels
    pyramid_min_px: int = 2048
    pyramid_strip_mb: float = 64.0  # rows of a level read at a time while building the next one

    def __post_init__(self) -> None:
        if isinstance(self.channels_last, bool):
            object.__setattr__(self, "channels_last", "all" if self.channels_last else "none")
        _check_layout(self)
        _positive(self, "tile_px", "batch_size", "cpu_batch_size", "instance_window_px", "instance_margin_um",
                  "stream_above_mp", "tile_multiple_px", "band_float32_max_mb", "pyramid_strip_mb")
        if not (isinstance(self.pyramid_min_px, int) and self.pyramid_min_px >= 0):
            raise ValueError(f"TilingConfig.pyramid_min_px must be an integer >= 0, got {self.pyramid_min_px!r}")
        if not 0 <= 2 * self.halo_px < self.tile_px:
            raise ValueError("TilingConfig needs 0 <= 2*halo_px < tile_px")
        for name in ("malloc_keep_mb", "device_blend_max_mb"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"TilingConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.tta_variants not in (1, 2, 4, 8):
            raise ValueError(f"TilingConfig.tta_variants must be 1, 2, 4 or 8, got {self.tta_variants!r}")
        if not (isinstance(self.cpu_workers, int) and self.cpu_workers >= 0):
            raise ValueError(f"TilingConfig.cpu_workers must be an integer >= 0, got {self.cpu_workers!r}")

    def channels_last_on(self, device) -> bool:
        """Whether weights and inputs are channels-last on ``device`` (``torch.device`` or a spec string)."""
        return channels_last_on(self.channels_last, device)

    def workers_for(self, devices) -> int:
        """Tile threads on ``devices``: ``cpu_workers`` (0 = torch's intra-op thread count) when all are CPUs,
        else 1 (GPUs run their batches asynchronously)."""
        if not _all_cpu(devices):
            return 1
        if self.cpu_workers:
            return self.cpu_workers
        import torch

        return max(1, torch.get_num_threads())

    def batch_for(self, devices) -> int:
        """Tiles per forward round and device on ``devices``: ``cpu_batch_size`` per tile thread (capped by
        ``batch_size``, which the out-of-memory fallback lowers) when all are CPUs, else ``batch_size``."""
        if _all_cpu(devices):
            return min(self.batch_size, self.cpu_batch_size * self.workers_for(devices))
        return self.batch_size


@dataclass(frozen=True)
class HoVerPostConfig:
    """NP + HV → instances (marker-controlled watershed). Sizes in µm, converted with the image mpp."""

    np_threshold: float = 0.5  # nuclear-pixel probability at/above which a pixel is nuclear
    # edge strength (0-1) at/above which a mask pixel cannot seed a marker: markers = mask - [edge >= t].
    # hover_net uses 0.4 with its fully trained HV maps; 0.65 (with sobel_kernel_um=8) was best for the bundled
    # backbone's weaker HV maps on the MoNuSeg dev tiles (AJI 0.04 -> 0.48; benchmarks/tune notes in BENCHMARKS.md)
    marker_threshold: float = 0.65
    min_object_area_um2: float = 2.5  # smaller objects are removed (hover_net: 10 px = 0.6 µm² at 0.25 µm/px)
    # smaller markers are removed (hover_net: 0.6 µm²). 4.5 µm² on the nuclear dev tiles (MoNuSeg, CPM-15, CoNSeP;
    # benchmarks/tune_instances.py): mean PQ 0.357 -> 0.378, AJI unchanged, with the bundled backbone's weak HV maps
    # (fewer spurious splits); with perfect NP/HV maps it costs PQ 0.006 (MoNuSeg) / 0.016 (CPM-15). Raising
    # min_object_area_um2 to 8 gained 0.003 more but cost 0.024 / 0.035 there (6-9 % of nuclei are < 8 µm²)
    min_marker_area_um2: float = 4.5
    sobel_kernel_um: float = 8.0  # Sobel kernel size, rounded to odd px (hover_net: 21 px = 5.25 µm at 0.25 µm/px)
    marker_open_radius_um: float = 0.5  # opening radius of the marker mask (hover_net: 5x5 ellipse)
    fill_mask_holes: bool = True  # fill holes of the thresholded NP mask (hover_net does not)
    surface_blur_um: float = 0.2  # Gaussian sigma smoothing the watershed surface (hover_net: 3x3 at 0.25 µm/px)
    threads: int = 2  # >= 2: edge map beside the mask labelling, markers/watershed on two halves in two threads
    #                   (more than 2 behaves like 2); 1 = one thread; results identical
    # the nuclear-pixel map of inference.predict with np_source="blend" (the default; HoVerPostProcessor itself takes
    # whatever map it is given): w * HoVer NP branch + (1 - w) * adapted foreground probability, the branch capped
    # by the adapted foreground max-filtered over np_gate_um (nuclei the adapted head rejects stay out, so a
    # "lymphocytes only" head does not get every nucleus). 0.75 / 2 µm on the MoNuSeg dev tiles
    # (benchmarks/tune_np_blend.py, session 10): AJI 0.315 -> 0.377, PQ 0.282 -> 0.328 with a backbone that never
    # saw MoNuSeg; PQ +0.013 with the bundled one
    np_hover_weight: float = 0.75
    np_gate_um: float = 2.0

    def __post_init__(self) -> None:
        _positive(self, "sobel_kernel_um")
        for name in ("np_threshold", "marker_threshold", "np_hover_weight"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"HoVerPostConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("min_object_area_um2", "min_marker_area_um2", "marker_open_radius_um", "surface_blur_um",
                     "np_gate_um"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"HoVerPostConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if not (isinstance(self.threads, int) and self.threads >= 1):
            raise ValueError(f"HoVerPostConfig.threads must be an integer >= 1, got {self.threads!r}")


@dataclass(frozen=True)
class ObjectPostConfig:
    """Semantic foreground → instances of large objects (glands, not nuclei): what ``metahistoseg evaluate`` scores
    AJI/PQ on for non-nuclear tasks. Sizes in µm, converted with the image mpp. Defaults chosen on the GlaS dev
    images (benchmarks/tune_objects.py; BENCHMARKS.md): PQ 0.05 -> 0.35, AJI 0.33 -> 0.44 against plain connected
    components; with perfect (truth) masks they keep PQ 0.92 (a 1000 µm² minimum scored 0.37 on predictions but
    cost 0.02 there: 9 % of the true glands are smaller)."""

    fill_holes: bool = True  # fill holes (gland lumens) before anything else
    min_object_area_um2: float = 500.0  # smaller objects are removed (GlaS glands: median ≈ 3700 µm², 5 % < 500)
    # objects joined by a neck are split by a marker watershed on the smoothed distance transform (in µm); markers
    # are its maxima at least this deep (skimage h-maxima); an object without one stays whole. 0 = components only
    split_depth_um: float = 12.0
    smooth_um: float = 4.0  # Gaussian sigma smoothing the distance transform (0 = none)
    # the rules above run on a grid of about this many µm per pixel (an integer multiple of the image's; labels are
    # painted back at full resolution): cost per µm², not per pixel; 0 = at the image's own resolution
    work_mpp_um: float = 0.0
    # the grid for images predicted to disk in tiles (``predict_large``), whose mask is never held in memory at full
    # resolution (GlaS dev: PQ 0.354 -> 0.344 at 1.9 µm/px against full resolution, 4x faster; tune_objects.py)
    large_work_mpp_um: float = 2.0
    # the split markers (h-maxima of the smoothed distance transform, the slow step) are searched on a grid of about
    # this many µm per pixel, the watershed runs at the working resolution; 0 = at the working resolution. GlaS dev:
    # 3x faster at 2.48 µm/px with AJI/PQ identical to 3 decimals on the tuning queries, but the few-shot benchmark
    # moved (transfer K=4 AJI 0.421 -> 0.388): not neutral enough to be the default (BENCHMARKS.md)
    marker_mpp_um: float = 0.0

    def __post_init__(self) -> None:
        for name in ("min_object_area_um2", "split_depth_um", "smooth_um", "work_mpp_um", "large_work_mpp_um",
                     "marker_mpp_um"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"ObjectPostConfig.{name} must be >= 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class MitosisConfig:
    """Mitosis patch classification: candidate patches, the small GroupNorm CNN, few-shot adaptation."""

    patch_um: float = 32.0  # side of the square patch around each candidate (AMi-Br patches: 128 px at 0.25 µm/px)
    patch_px: int = 64  # classifier input side (patches are resized to it: 0.5 µm/px at the defaults)
    threshold: float = 0.5  # probability at/above which a candidate is called mitotic/atypical
    # scoring calls against truth figures: a call within this distance of a figure matches it (one to one); 7.5 µm
    # is the MIDOG challenges' criterion (about the radius of a mitotic figure)
    match_radius_um: float = 7.5
    pad_mode: str = "reflect"  # how patches crossing the image border are padded (reflect/constant/edge)
    positive_rotations_deg: tuple[float, ...] = (0.0, 45.0, 90.0)  # augmentation copies of a label-1 patch
    negative_rotations_deg: tuple[float, ...] = (0.0, 45.0)  # augmentation copies of a label-0 patch
    channels: tuple[int, ...] = (16, 32, 64, 64)  # CNN stage widths; each stage = conv3x3-GN-ReLU + 2x2 pool
    groups: int = 8  # GroupNorm groups (clipped to the channel count)
    normalise: str = "patch"  # input normalisation: "patch" (per-patch, per-channel mean/std) | "fixed"
    adapt_steps: int = 100  # few-shot adaptation steps (full batch over the augmented support)
    adapt_lr: float = 0.01  # Adam step size of the few-shot adaptation
    adapt_weight_decay: float = 1e-3  # L2 on the adapted parameters (keeps a 1-shot head from overshooting)
    adapt_flips: bool = True  # also add horizontal/vertical flips of every rotated support patch
    adapt_class_balance: bool = True  # weight the support cross-entropy by inverse class frequency
    adapt_stages: int = 0  # conv stages adapted besides the linear head (0 = head only; features cached)

    def __post_init__(self) -> None:
        if self.pad_mode not in ("reflect", "constant", "edge"):
            raise ValueError(f"MitosisConfig.pad_mode must be reflect/constant/edge, got {self.pad_mode!r}")
        if self.normalise not in ("patch", "fixed"):
            raise ValueError(f"MitosisConfig.normalise must be 'patch' or 'fixed', got {self.normalise!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"MitosisConfig.threshold must be in [0, 1], got {self.threshold!r}")
        if not self.match_radius_um > 0:
            raise ValueError(f"MitosisConfig.match_radius_um must be > 0, got {self.match_radius_um!r}")
        if not self.channels or any(c <= 0 for c in self.channels):
            raise ValueError(f"MitosisConfig.channels must be positive widths, got {self.channels!r}")
        if not self.positive_rotations_deg or not self.negative_rotations_deg:
            raise ValueError("MitosisConfig rotations must list at least one angle (0.0 = no rotation)")
        if self.adapt_steps < 0 or self.adapt_weight_decay < 0 or not 0 <= self.adapt_stages <= len(self.channels):
            raise ValueError("MitosisConfig needs adapt_steps >= 0, adapt_weight_decay >= 0 and "
                             "0 <= adapt_stages <= len(channels)")
        _positive(self, "patch_um", "patch_px", "groups", "adapt_lr")


@dataclass(frozen=True)
class PointsConfig:
    """Centroid clicks → filled circles; detections → centroids."""

    radius: float = 12.0  # circle radius (BreastPathQ: 12 px)
    radius_unit: str = "px"  # "px" or "um"
    match_radius_px: float = 12.0  # detection matching distance for precision/recall/F1
    min_detection_area_px: int = 20  # predicted blobs smaller than this are not detections
    background_margin_px: float = 6.0  # for exhaustive point annotation: ring left unknown around circles
    # detections = local maxima of the Gaussian-smoothed foreground probability, chosen on the BM-Graz dev images
    # (every image once as the support, the 3 others as queries; benchmarks/tune_detection.py) for the default
    # adaptation: F1 0.847 at sigma 5 / distance 8 / threshold 0.4 (plateau 0.845-0.849 for sigma 5-6, threshold
    # 0.35-0.45), vs 0.829 at the session-2 choice 3 / 12 / 0.5 picked on one support image. Scaled with the
    # clicked circles' radius when that differs from ``radius``
    peak_sigma_px: float = 5.0  # smoothing of the probability map before peak finding (image px)
    peak_min_distance_px: int = 8  # minimum distance between two detections (image px)
    peak_threshold: float = 0.4  # smoothed probability a detection must reach (0-1)


# ------------------------------------------------------------------------------------------ JSON I/O


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not v > 0:
            raise ValueError(f"{type(obj).__name__}.{n} must be > 0, got {v!r}")


def to_dict(cfg: Any) -> dict:
    """Dataclass → JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type[T], data: dict, *, source: str = "config") -> T:
    """Build ``cls`` from a dict, recursing into nested dataclasses; unknown/ill-typed fields raise ValueError."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {sorted(unknown)} for {cls.__name__}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        v = data[f.name]
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            v = from_dict(hint, v, source=f"{source}.{f.name}")
        elif typing.get_origin(hint) is tuple and isinstance(v, list):
            v = tuple(v)
        kwargs[f.name] = _check_type(v, hint, f"{source}.{f.name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None


def _check_type(v: Any, hint: Any, where: str) -> Any:
    """``v`` checked against ``hint`` (elements of ``tuple[...]``/``dict[...]`` too); ints become floats where a
    float is expected; NaN/inf are refused (JSON has no such numbers)."""
    base = typing.get_origin(hint) or hint
    args = typing.get_args(hint)
    if hint is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if base is tuple and isinstance(v, list):
        v = tuple(v)
    if base in (int, float, str, bool, dict, tuple) and not isinstance(v, base):
        raise ValueError(f"{where}: expected {getattr(base, '__name__', base)}, got {type(v).__name__} ({v!r})")
    if base is int and isinstance(v, bool):
        raise ValueError(f"{where}: expected int, got bool")
    if base is float and not math.isfinite(v):
        raise ValueError(f"{where}: expected a finite number, got {v!r}")
    if base is tuple and args:
        hints = [args[0]] * len(v) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(hints) != len(v):
            raise ValueError(f"{where}: expected {len(hints)} values, got {len(v)}")
        v = tuple(_check_type(x, h, f"{where}[{i}]") for i, (x, h) in enumerate(zip(v, hints, strict=True)))
    if base is dict and len(args) == 2:
        v = {_check_type(k, args[0], f"{where} key"): _check_type(x, args[1], f"{where}[{k!r}]") for k, x in v.items()}
    return v


def save_json(cfg: Any, path: str | os.PathLike) -> None:
    """Write a dataclass as JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(to_dict(cfg), f, indent=2)
    os.replace(tmp, path)


def load_json(cls: type[T], path: str | os.PathLike) -> T:
    """Read a dataclass from JSON with a clear error naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: config file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a folder, not a config file") from None
    return from_dict(cls, data, source=str(path))
