"""Benchmark: the `metahistoseg evaluate` command end to end on each dev data set (wall time, peak memory, scores).

The issue's budget: about 60 s on 2 CPU cores for 1 support tile and 3–4 query tiles of 1000². Each data set is
evaluated with its first image(s) as the support (GlaS: 4, the goal's setting; patch data: the first 5 patches
of each class; else 1) and every other image as the queries, with the defaults (exactly what the GUI's Adapt
button does), in a fresh process timed with ``/usr/bin/time -v`` where available (else wall time only).

    .venv/bin/python benchmarks/bench_evaluate_cli.py [--sets monuseg,cpm15,consep_tiles,glas,bm_graz_cells,...]

Writes ``benchmarks/results/evaluate_cli.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SUPPORT = {"glas": 4}  # support images per data set (default 1)
PATCHES_PER_CLASS = 5  # patch data (mitotic figures): the first 5 patches of each class
SCORES = ("miou", "aji", "pq", "det_f1", "balanced_accuracy", "f1")


def _support_ids(ds, n: int) -> list[str]:
    """The first ``n`` images, or for patch data the first ``PATCHES_PER_CLASS`` patches of each class."""
    if ds.kind != "patches":
        return list(ds.ids[:n])
    by_class: dict[int, list[str]] = {}
    for sid in ds.ids:
        by_class.setdefault(int(ds.load(sid).patch_label), []).append(sid)
    return [sid for c in sorted(by_class) for sid in by_class[c][:PATCHES_PER_CLASS]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", default="monuseg,cpm15,consep_tiles,glas,bm_graz_cells,amibr_mitosis")
    ap.add_argument("--out", default="evaluate_cli")
    args = ap.parse_args(argv)

    from napari_metahistoseg.data import open_dataset

    exe = Path(sys.executable).with_name("metahistoseg")
    timer = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    rows = []
    for name in args.sets.split(","):
        root = common.DATA / name
        ids = _support_ids(open_dataset(root), SUPPORT.get(name, 1))
        cmd = [str(exe), "evaluate", str(root), "--support", ",".join(ids)]
        t0 = time.perf_counter()
        res = subprocess.run(([timer, "-v"] if timer else []) + cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            raise SystemExit(f"{name}: evaluate failed ({res.returncode}): {res.stderr[-2000:]}")
        out = json.loads(res.stdout.strip().splitlines()[-1])
        rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr)
        row = {"set": name, "support": ids, "n_query": out["n_query"], "wall_s": round(wall, 1),
               "adapt_s": out["adapt_seconds"], "predict_s": out["predict_seconds"],
               "peak_rss_mb": round(int(rss.group(1)) / 1024) if rss else None,
               **{k: out[k] for k in SCORES if k in out}}
        rows.append(row)
        print(row, flush=True)
    table = common.md_table(["data set", "support", "queries", "wall s (whole command)", "adapt s", "predict s",
                             "peak RSS MB", "mIoU", "AJI", "PQ", "detection F1", "balanced accuracy", "F1"],
                            [[r["set"], len(r["support"]), r["n_query"], r["wall_s"], r["adapt_s"], r["predict_s"],
                              r["peak_rss_mb"], r.get("miou"), r.get("aji"), r.get("pq"), r.get("det_f1"),
                              r.get("balanced_accuracy"), r.get("f1")]
                             for r in rows])
    common.write_sweep(args.out, {"rows": rows}, "Each row: `metahistoseg evaluate DATA_DIR --support IDS`.", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
