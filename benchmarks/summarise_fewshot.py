"""One table from several ``bench_fewshot.py`` result files: mean ± std over draws of one method, per task and K.

    .venv/bin/python benchmarks/summarise_fewshot.py LABEL=RESULT_NAME [...] [--method maml] [--out NAME]

RESULT_NAME is a ``benchmarks/results/<name>.json`` written by ``bench_fewshot.py --out <name>``. Used to compare
backbones run through the same protocol (e.g. the leave-MoNuSeg-out training-length curve, BENCHMARKS.md "GPU
training"). Prints the markdown table and writes ``benchmarks/results/<--out>.md`` when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

METRICS = ("miou", "aji", "pq", "det_f1")


def _fmt(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def table(pairs: list[tuple[str, str]], method: str) -> str:
    rows = []
    for label, name in pairs:
        data = json.loads((common.RESULTS / f"{name}.json").read_text())
        recs = [r for r in data["records"] if r["method"] == method and r["setting"] == "full"]
        for task, k in sorted({(r["task"], r["x"]) for r in recs}):
            sel = [r for r in recs if r["task"] == task and r["x"] == k]
            cells = [_fmt([r[m] for r in sel]) if all(m in r for r in sel) else "–" for m in METRICS]
            rows.append((task, k, label, len(sel), cells, data.get("commit", "?")))
    lines = [f"| task | K | backbone | draws | {' | '.join(METRICS)} | commit |",
             "|---|---|---|---|" + "---|" * len(METRICS) + "---|"]
    order = {label: i for i, (label, _) in enumerate(pairs)}
    for task, k, label, n, cells, commit in sorted(rows, key=lambda r: (r[0], r[1], order[r[2]])):
        lines.append(f"| {task} | {k} | {label} | {n} | {' | '.join(cells)} | `{commit}` |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pairs", nargs="+", help="LABEL=RESULT_NAME")
    ap.add_argument("--method", default="maml")
    ap.add_argument("--out", help="write benchmarks/results/<out>.md")
    args = ap.parse_args(argv)
    pairs = []
    for p in args.pairs:
        label, sep, name = p.partition("=")
        if not sep:
            ap.error(f"{p!r}: expected LABEL=RESULT_NAME")
        pairs.append((label, name))
    md = (f"Command: `{common.command_line()}`\n\n" if args.out else "") + table(pairs, args.method)
    print(md)
    if args.out:
        (common.RESULTS / f"{args.out}.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
