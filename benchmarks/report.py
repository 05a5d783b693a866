"""Render the results JSON of the speed/memory/mitosis benchmarks as markdown and copy every generated block
into BENCHMARKS.md, so that no number there is typed by hand.

* ``throughput.json``      → ``throughput.md`` (and ``throughput_gpu[_s13].json`` → ``throughput_gpu[_s13].md``)
* ``gpu_profile.txt``      → ``gpu_profile.md`` (its header and table of parts, without the profiler tables)
* ``postprocess.json``     → ``postprocess.md``
* ``large_image_*.json``   → ``large_image.md`` (one row per image size)
* ``mitosis_fewshot.json`` → ``mitosis_fewshot.md``

Then every ``<!-- BEGIN generated: benchmarks/results/NAME.md -->`` … ``<!-- END generated: … -->`` block of
BENCHMARKS.md is replaced by the current content of that file (the few-shot, LOTO and adaptation-latency
scripts write their own ``.md``).

    .venv/bin/python benchmarks/report.py            # render + sync
    .venv/bin/python benchmarks/report.py --check    # exit 1 if BENCHMARKS.md is out of date
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "BENCHMARKS.md"
BLOCK = re.compile(r"(<!-- BEGIN generated: (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- END generated: (?P=path) -->)",
                   re.S)


def _load(name: str) -> dict | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _machine(m: dict | None) -> str:
    if not m:
        return "unknown machine"
    load = m.get("load_avg_1_5_15")
    gpu = ", ".join(m.get("cuda") or []) or "no GPU"
    return (f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, {gpu}; torch {m.get('torch', '?')}"
            + (f"; load average at start {load}" if load else ""))


def throughput_md(d: dict) -> str:
    effort = all("gmac_per_s" in r for r in d["rows"])  # runs since session 15
    m = d.get("machine") or {}
    rows = [[r["device"], r["tile"], r["batch"], f"{r['image_px']}²", r["mpp"], f"{r['seconds']:.2f}",
             f"{r['mp_per_s']:.2f}", f"{r['cpu_seconds']:.2f}" if r.get("cpu_seconds") is not None else "–",
             *([f"{r['model_mpx']:.2f}", f"{r['gmac_per_s']:.1f}"] if effort else [])] for r in d["rows"]]
    sgemm = (f"  \nThis machine's fp32 matrix product ({m['sgemm_threads']} threads, 2048²): "
             f"{m['sgemm_gmac_s_start']} GMAC/s at the start, {m.get('sgemm_gmac_s_end', '?')} at the end; the "
             f"network does {m['macs_per_model_px'] / 1e3:.1f} k multiply-adds per model pixel"
             if "sgemm_gmac_s_start" in m else "")
    head = (f"Machine: {_machine(m)}{sgemm}  \nCommit: `{d.get('commit', 'not recorded')}`  \n"
            f"Command: `{d['command']}`  \n"
            f"Backbone: `{d['backbone']}` ({d['backbone_sha256'][:12]}); {d.get('note', '')}"
            + (f"  \nLabels: {d['relabelled']}" if d.get("relabelled") else "") + "\n\n")
    return head + common.md_table(["device", "tile px", "batch", "image", "image µm/px", "median wall s",
                                   "MP/s (image px)", "median CPU s"]
                                  + (["model MP (with overlaps)", "network GMAC/s"] if effort else []), rows)


def postprocess_md(d: dict) -> str:
    rows = [[s["method"], f"{s['ms_per_tile']:.0f}", f"{s['cpu_ms_per_tile']:.0f}",
             f"{s['speedup']:.2f}×" if s.get("speedup") else "–",
             f"{s['cpu_speedup']:.2f}×" if s.get("cpu_speedup") else "–",
             f"{s['aji']:.3f}", f"{s['pq']:.3f}", f"{s['nuclei']:.0f}"] for s in d["summary"]]
    cmd = d.get("command", ".venv/bin/python benchmarks/bench_postprocess.py")
    head = (f"Machine: {d.get('cpus', '?')} CPU cores ({d.get('machine', '?')}), python {d.get('python', '?')}, "
            f"OpenCV {d.get('cv2')} with {d.get('cv2_threads')} thread(s) for the reference; load average (1 min) "
            f"at start {d.get('load_avg_1min', float('nan')):.2f}  \nCommit: `{d.get('commit', '?')}`  \n"
            f"Command: `{cmd}`  \n{len(d['tiles'])} MoNuSeg tiles of {d['shape'][0]}×{d['shape'][1]} px, "
            f"{d['repeats']} interleaved repeats each (median per tile, mean over tiles); speed-up against the "
            "hover_net row of the same kind (map only / with the per-nucleus table).\n\n")
    return head + common.md_table(["method", "wall ms / tile", "CPU ms / tile", "speed-up (wall)", "speed-up (CPU)",
                                   "AJI", "PQ", "nuclei"], rows)


def large_image_md(results: list[dict]) -> str:
    rows = [[f"{d['size']}²", d["mpp"], d.get("threads"), d.get("tile_px"), f"{d['wall_s']:.0f}",
             f"{d['predict_s']:.0f}", f"{d['instances_s']:.0f}",
             f"{d['pyramid_s']:.0f}" if "pyramid_s" in d else "–", d["nuclei"], f"{d['image_mp_per_s']:.2f}",
             f"{max(d['peak_rss_mb_sampled'], d['peak_rss_mb_ru_maxrss']):.0f}",
             "yes" if d["rss_ok"] else "no", d.get("load_avg_end", "?")] for d in results]
    cmds = "".join(f"Command ({d['size']}²{', commit `' + d['commit'] + '`' if d.get('commit') else ''}): "
                   f"`{d['command']}`  \n" for d in results)
    return cmds + "\n" + common.md_table(
        ["image", "µm/px", "threads", "tile px", "wall s", "predict s", "instances s", "levels s", "nuclei", "MP/s",
         "peak RSS MB", "≤ 2 GB", "load avg at end"], rows)


def mitosis_md(d: dict) -> str:
    lines = []
    shots = sorted({int(k) for v in d["summary"].values() for k in v})
    for method, per_k in d["summary"].items():
        for k in shots:
            s = per_k.get(str(k))
            if s:
                lines.append([method, k, f"{s['balanced_accuracy'][0]:.3f} ± {s['balanced_accuracy'][1]:.3f}",
                              f"{s['f1'][0]:.3f} ± {s['f1'][1]:.3f}"])
    ref = d.get("reference", {})
    agr = d.get("agreement", {})
    head = (f"Machine: {d.get('machine')} ({d.get('threads')} thread(s)); {d['n_figures']} figures of "
            f"{d['n_slides']} slides; {d['draws']} draws per K; wall {d.get('seconds', 0):.0f} s.  \n"
            + (f"Command: `{d['command']}`  \n" if d.get("command") else
               "Command (reconstructed from the recorded arguments): `.venv/bin/python benchmarks/bench_mitosis.py "
               f"--draws {d['draws']} --shots {' '.join(map(str, d['shots']))} --seed {d['seed']} --threads "
               f"{d['threads']}" + (f" --backbone {d['backbone']}" if d.get("backbone") else "") + "`  \n")
            + f"Commit: `{d.get('commit', 'not recorded')}`  \n"
            f"Reference: chance balanced accuracy {ref.get('chance_balanced_accuracy')}, F1 of always answering "
            f"'atypical' {ref.get('all_atypical_f1')}; annotators unanimous on {agr.get('unanimous', 0):.0%} of "
            f"the figures (atypical share {agr.get('atypical_share', 0):.0%}).\n\n")
    return head + common.md_table(["method", "K per class", "balanced accuracy", "F1 (atypical)"], lines)


def render() -> list[str]:
    written = []
    for name in ("throughput", "throughput_gpu", "throughput_gpu_s13", "throughput_s14", "throughput_s15"):
        if (d := _load(name)) is not None:
            common.write_md(name, throughput_md(d))
            written.append(name)
    if (p := RESULTS / "gpu_profile.txt").exists():
        common.write_md("gpu_profile", p.read_text().split("\n\nHost time")[0])
        written.append("gpu_profile")
    if (d := _load("postprocess")) is not None:
        common.write_md("postprocess", postprocess_md(d))
        written.append("postprocess")
    large = sorted((json.loads(p.read_text()) for p in RESULTS.glob("large_image_*.json")), key=lambda d: d["size"])
    if large:
        common.write_md("large_image", large_image_md(large))
        written.append("large_image")
    if (d := _load("mitosis_fewshot")) is not None:
        common.write_md("mitosis_fewshot", mitosis_md(d))
        written.append("mitosis_fewshot")
    return written


def sync(text: str) -> str:
    def repl(m: re.Match) -> str:
        path = ROOT / m.group("path")
        if not path.exists():
            raise SystemExit(f"BENCHMARKS.md refers to {m.group('path')}, which does not exist")
        return m.group(1) + path.read_text().rstrip("\n") + "\n" + m.group(4)

    return BLOCK.sub(repl, text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check that BENCHMARKS.md is up to date")
    a = ap.parse_args()
    if not a.check:
        print("rendered:", ", ".join(render()) or "nothing")
    old = DOC.read_text()
    new = sync(old)
    if a.check:
        if new != old:
            print("BENCHMARKS.md is out of date: run benchmarks/report.py")
            return 1
        return 0
    DOC.write_text(new)
    print(f"synced {len(BLOCK.findall(new))} generated blocks into {DOC.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
