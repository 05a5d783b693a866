"""Run every ``benchmarks/bench_*.py`` in turn (``make bench``); report each script's exit status and duration.

    .venv/bin/python benchmarks/run_all.py [--only fewshot,adapt_speed] [--skip postprocess] [--quick]
        [-- extra args passed to every script]

``--quick`` is passed on to the scripts whose ``--help`` mentions it. Exits non-zero if any script failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def scripts(only: list[str], skip: list[str]) -> list[Path]:
    found = sorted(HERE.glob("bench_*.py"))
    names = {p.stem[len("bench_"):]: p for p in found}
    unknown = [n for n in only + skip if n not in names]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; available: {', '.join(names)}")
    return [p for n, p in names.items() if (not only or n in only) and n not in skip]


def supports(script: Path, flag: str) -> bool:
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300)
    return flag in out.stdout


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="comma list of benchmark names (bench_<name>.py)")
    p.add_argument("--skip", default="", help="comma list of benchmark names to leave out")
    p.add_argument("--quick", action="store_true", help="pass --quick to the scripts that accept it")
    args = p.parse_args(argv)
    todo = scripts([n for n in args.only.split(",") if n], [n for n in args.skip.split(",") if n])
    status = []
    for script in todo:
        cmd = [sys.executable, str(script), *extra]
        if args.quick and supports(script, "--quick"):
            cmd.append("--quick")
        print(f"==> {' '.join(cmd)}", flush=True)
        t0 = time.time()
        rc = subprocess.run(cmd, cwd=HERE.parent).returncode
        status.append((script.name, rc, time.time() - t0))
    print("\nbenchmark                 exit   minutes")
    for name, rc, secs in status:
        print(f"{name:<25} {rc:>4}   {secs / 60:7.1f}")
    return 0 if all(rc == 0 for _, rc, _ in status) else 1


if __name__ == "__main__":
    sys.exit(main())
