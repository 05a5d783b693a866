"""Benchmark: HoVerPostProcessor vs the hover_net repository's ``__proc_np_hv`` on 1000x1000 MoNuSeg tiles.

NP/HV maps are synthesised from the real MoNuSeg instance masks (``../shared/data/monuseg/instance_masks``):
NP = blurred nuclear mask + noise, HV = :func:`hv_targets` + blur + noise. Each method is timed (median of
``--repeats`` runs per tile) and its instance map scored with AJI and PQ against the true instances.

The reference is a transcription of hover_net's ``models/hovernet/post_proc.py`` (``__proc_np_hv`` and the
per-nucleus part of ``process``) and needs OpenCV (``pip install opencv-python-headless``); without cv2 only our
timings are reported. Wall-clock and CPU time (this process, all threads) are both reported: on a shared machine
the CPU time is the steadier comparison. Writes ``benchmarks/results/postprocess.{json,png}``.

    .venv/bin/python benchmarks/bench_postprocess.py [--repeats 7] [--tiles 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path

import common  # noqa: E402  (benchmarks/common.py, next to this script)
import imageio.v3 as iio
import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from napari_metahistoseg.config import HoVerPostConfig
from napari_metahistoseg.metrics import aji, panoptic_quality
from napari_metahistoseg.postprocess import HoVerPostProcessor, hv_targets

try:
    import cv2
except ImportError:  # the reference is optional
    cv2 = None

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data" / "monuseg" / "instance_masks"
RESULTS = REPO / "benchmarks" / "results"
MPP = 0.25  # MoNuSeg is scanned at 40x
SEED = 0
NP_BLUR_PX, NP_NOISE = 1.0, 0.1
HV_BLUR_PX, HV_NOISE = 0.7, 0.05
# hover_net's constants: 10 px objects and markers, a 21 px Sobel, marker threshold 0.4 (at 0.25 µm/px)
HOVERNET_CFG = HoVerPostConfig(min_object_area_um2=10 * MPP**2, min_marker_area_um2=10 * MPP**2,
                               sobel_kernel_um=21 * MPP, marker_threshold=0.4)


# ------------------------------------------------------------------------------------------------ reference


def _remove_small_objects(labels: np.ndarray, min_size: int) -> np.ndarray:
    """skimage's (pre-0.26) ``remove_small_objects(labels, min_size)`` on a labelled array."""
    sizes = np.bincount(labels.ravel())
    too_small = sizes < min_size
    too_small[0] = False
    out = labels.copy()
    out[too_small[labels]] = 0
    return out


def hovernet_proc_np_hv(pred: np.ndarray) -> np.ndarray:
    """hover_net ``__proc_np_hv``: ``pred (H, W, 3)`` = NP probability, x-map, y-map → instance map."""
    pred = np.array(pred, dtype=np.float32)
    blb_raw, h_dir_raw, v_dir_raw = pred[..., 0], pred[..., 1], pred[..., 2]
    blb = np.array(blb_raw >= 0.5, dtype=np.int32)
    blb = ndi.label(blb)[0]
    blb = _remove_small_objects(blb, min_size=10)
    blb[blb > 0] = 1
    h_dir = cv2.normalize(h_dir_raw, None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    v_dir = cv2.normalize(v_dir_raw, None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    sobelh = cv2.Sobel(h_dir, cv2.CV_64F, 1, 0, ksize=21)
    sobelv = cv2.Sobel(v_dir, cv2.CV_64F, 0, 1, ksize=21)
    sobelh = 1 - cv2.normalize(sobelh, None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    sobelv = 1 - cv2.normalize(sobelv, None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    overall = np.maximum(sobelh, sobelv)
    overall = overall - (1 - blb)
    overall[overall < 0] = 0
    dist = (1.0 - overall) * blb
    dist = -cv2.GaussianBlur(dist, (3, 3), 0)
    overall = np.array(overall >= 0.4, dtype=np.int32)
    marker = blb - overall
    marker[marker < 0] = 0
    marker = ndi.binary_fill_holes(marker).astype("uint8")
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    marker = cv2.morphologyEx(marker, cv2.MORPH_OPEN, kernel)
    marker = ndi.label(marker)[0]
    marker = _remove_small_objects(marker, min_size=10)
    return watershed(dist, markers=marker, mask=blb)


def hovernet_table(pred_inst: np.ndarray) -> dict:
    """The per-nucleus loop of hover_net ``process`` (bbox, centroid from moments, cv2 contour)."""
    info = {}
    for inst_id in np.unique(pred_inst)[1:]:
        inst_map = pred_inst == inst_id
        rows, cols = np.nonzero(np.any(inst_map, axis=1))[0], np.nonzero(np.any(inst_map, axis=0))[0]
        rmin, rmax, cmin, cmax = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        crop = inst_map[rmin:rmax, cmin:cmax].astype(np.uint8)
        m = cv2.moments(crop)
        contour = np.squeeze(cv2.findContours(crop, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0][0].astype("int32"))
        info[int(inst_id)] = dict(bbox=np.array([[rmin, cmin], [rmax, cmax]]),
                                  centroid=np.array([m["m10"] / m["m00"] + cmin, m["m01"] / m["m00"] + rmin]),
                                  contour=contour + np.array([cmin, rmin]))
    return info


# ------------------------------------------------------------------------------------------------ inputs


def synthetic_maps(inst: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """True instances → (np_prob (H, W) float32, hv (2, H, W) float32) that look like network outputs."""
    np_prob = ndi.gaussian_filter((inst > 0).astype(np.float32), NP_BLUR_PX)
    np_prob = np.clip(np_prob + rng.normal(0, NP_NOISE, inst.shape), 0, 1).astype(np.float32)
    hv = ndi.gaussian_filter(hv_targets(inst), (0, HV_BLUR_PX, HV_BLUR_PX))
    hv = np.clip(hv + rng.normal(0, HV_NOISE, hv.shape), -1, 1).astype(np.float32)
    return np_prob, hv


def interleaved_ms(methods: dict, args: tuple, repeats: int) -> tuple[dict, dict, dict]:
    """Run every method once per round (so load changes hit all alike).

    Returns per method: median wall-clock ms, median CPU ms of this process (all its threads), last output.
    """
    wall: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    outs = {}
    for _ in range(repeats):
        for name, fn in methods.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            outs[name] = fn(*args)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    med = lambda d: {name: 1000 * statistics.median(t) for name, t in d.items()}  # noqa: E731
    return med(wall), med(cpu), outs


# ------------------------------------------------------------------------------------------------ main


def run(repeats: int, n_tiles: int) -> dict:
    files = sorted(DATA.glob("*.png"))[:n_tiles]
    if not files:
        raise SystemExit(f"no instance masks under {DATA.resolve()}")
    rng = np.random.default_rng(SEED)
    ours_hn, ours_default = HoVerPostProcessor(HOVERNET_CFG), HoVerPostProcessor(HoVerPostConfig())
    ours_hn1 = HoVerPostProcessor(dataclasses.replace(HOVERNET_CFG, threads=1))
    methods = {
        "ours (hover_net sizes)": lambda p, h, _: ours_hn.instances(p, h, MPP),
        "ours (hover_net sizes, 1 thread)": lambda p, h, _: ours_hn1.instances(p, h, MPP),
        "ours (default config)": lambda p, h, _: ours_default.instances(p, h, MPP),
        "ours + table": lambda p, h, _: ours_hn(p, h, MPP)[0],
    }
    if cv2 is not None:  # hover_net takes the network output as one (H, W, 3) array
        methods["hover_net __proc_np_hv (cv2)"] = lambda p, h, stacked: hovernet_proc_np_hv(stacked)
        methods["hover_net + table (cv2)"] = lambda p, h, stacked: _with_table(hovernet_proc_np_hv(stacked))
    rows = {name: dict(ms=[], cpu_ms=[], aji=[], pq=[], n=[]) for name in methods}
    hv_ms = []
    for f in files:
        inst = iio.imread(f).astype(np.uint32)
        wall, cpu, _ = interleaved_ms({"hv": hv_targets}, (inst,), repeats)
        hv_ms.append((wall["hv"], cpu["hv"]))
        np_prob, hv = synthetic_maps(inst, rng)
        ms, cpu_ms, outs = interleaved_ms(methods, (np_prob, hv, np.dstack([np_prob, hv[0], hv[1]])), repeats)
        for name, out in outs.items():
            rows[name]["ms"].append(ms[name])
            rows[name]["cpu_ms"].append(cpu_ms[name])
            rows[name]["aji"].append(aji(inst, out))
            rows[name]["pq"].append(panoptic_quality(inst, out)["pq"])
            rows[name]["n"].append(int(len(np.unique(out)) - 1))
    return dict(rows=rows, hv_targets_ms=hv_ms, tiles=[f.stem for f in files], shape=list(inst.shape),
                repeats=repeats, cv2=getattr(cv2, "__version__", None),
                cv2_threads=cv2.getNumThreads() if cv2 is not None else None, cpus=os.cpu_count(),
                load_avg_1min=os.getloadavg()[0], python=platform.python_version(), machine=platform.machine())


def _with_table(inst: np.ndarray) -> np.ndarray:
    hovernet_table(inst)
    return inst


def summarise(res: dict) -> list[dict]:
    mp = res["shape"][0] * res["shape"][1] / 1e6
    ref = res["rows"].get("hover_net __proc_np_hv (cv2)")
    ref_table = res["rows"].get("hover_net + table (cv2)")
    out = []
    for name, r in res["rows"].items():
        ms = float(np.mean(r["ms"]))
        base = ref_table if "table" in name else ref
        cpu = float(np.mean(r["cpu_ms"]))
        out.append(dict(method=name, ms_per_tile=ms, mp_per_s=mp / (ms / 1000), cpu_ms_per_tile=cpu,
                        speedup=float(np.mean(base["ms"])) / ms if base else None,
                        cpu_speedup=float(np.mean(base["cpu_ms"])) / cpu if base else None,
                        aji=float(np.mean(r["aji"])), pq=float(np.mean(r["pq"])), nuclei=float(np.mean(r["n"]))))
    return out


def report(summary: list[dict], res: dict) -> None:
    print(f"{len(res['tiles'])} MoNuSeg tiles {res['shape'][0]}x{res['shape'][1]}, median of {res['repeats']} "
          f"interleaved runs, {res['cpus']} CPUs (load {res['load_avg_1min']:.1f}), cv2 {res['cv2']} with "
          f"{res['cv2_threads']} threads; speed-up vs the hover_net row of the same kind (map only / with table)")
    print(f"{'method':30s} {'ms/tile':>8s} {'MP/s':>6s} {'speed-up':>8s} {'CPU ms':>8s} {'CPU x':>6s} "
          f"{'AJI':>7s} {'PQ':>7s} {'nuclei':>6s}")
    for s in summary:
        sp = f"{s['speedup']:.2f}x" if s["speedup"] else "-"
        cp = f"{s['cpu_speedup']:.2f}x" if s["cpu_speedup"] else "-"
        print(f"{s['method']:30s} {s['ms_per_tile']:8.1f} {s['mp_per_s']:6.2f} {sp:>8s} {s['cpu_ms_per_tile']:8.1f} "
              f"{cp:>6s} {s['aji']:7.4f} {s['pq']:7.4f} {s['nuclei']:6.1f}")
    wall, cpu = np.mean(res["hv_targets_ms"], axis=0)
    print(f"hv_targets: {wall:.1f} ms per tile ({cpu:.1f} ms CPU)")


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    names = [s["method"] for s in summary]
    colours = ["tab:orange" if n.startswith("hover_net") else "tab:blue" for n in names]
    for ax, key, label in ((axes[0], "ms_per_tile", "wall clock"), (axes[1], "cpu_ms_per_tile", "CPU time")):
        values = [s[key] for s in summary]
        ax.barh(names, values, color=colours)
        for i, (v, s) in enumerate(zip(values, summary, strict=True)):
            ax.text(v, i, f" {v:.0f} ms" + (f", AJI {s['aji']:.3f}" if key == "ms_per_tile" else ""),
                    va="center", fontsize=8)
        ax.set_xlabel(f"{label}: ms per 1000x1000 tile (median)")
        ax.set_xlim(0, 1.5 * max(values))
    axes[0].invert_yaxis()
    fig.suptitle("HoVer-Net post-processing: ours (blue) vs hover_net's __proc_np_hv (orange)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def replot(path: Path = RESULTS / "postprocess.json") -> None:
    """Redraw the figure from a saved JSON (``--replot``)."""
    plot(json.loads(path.read_text())["summary"], path.with_suffix(".png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tiles", type=int, default=5)
    parser.add_argument("--cv2-threads", type=int, default=-1,
                        help="OpenCV threads for the reference (default -1: OpenCV's own pool, as ours runs its "
                             "Sobel passes in HoVerPostConfig.threads=2 threads; 1 = single-threaded, to compare "
                             "with the '1 thread' row)")
    parser.add_argument("--replot", action="store_true", help="only redraw the figure from the saved JSON")
    args = parser.parse_args()
    if args.replot:
        return replot()
    if cv2 is not None and args.cv2_threads >= 0:
        cv2.setNumThreads(args.cv2_threads)
    if cv2 is None:
        print("cv2 not installed: the hover_net reference is skipped (pip install opencv-python-headless)")
    res = run(args.repeats, args.tiles)
    summary = summarise(res)
    report(summary, res)
    RESULTS.mkdir(parents=True, exist_ok=True)
    prov = common.provenance()
    (RESULTS / "postprocess.json").write_text(json.dumps(dict(summary=summary, **res, commit=prov["commit"],
                                                              command=prov["command"]), indent=2))
    plot(summary, RESULTS / "postprocess.png")
    print(f"wrote {RESULTS / 'postprocess.json'} and {RESULTS / 'postprocess.png'}")


if __name__ == "__main__":
    main()
