"""Shared helpers of the benchmark scripts: paths, machine/commit description, timing, tables, plots, results.

Every ``bench_*.py`` writes ``benchmarks/results/<name>.json`` (raw numbers + machine + commit + command) and
``benchmarks/results/<name>.md`` (the tables that BENCHMARKS.md includes), so no number is ever typed by hand.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the shared dev data: $METAHISTOSEG_DATA if set (as for the tests), else ../shared/data beside the checkout
DATA = Path(os.environ.get("METAHISTOSEG_DATA") or REPO / ".." / "shared" / "data").expanduser().resolve()
RESULTS = REPO / "benchmarks" / "results"
BUNDLED = REPO / "napari_metahistoseg" / "weights"


# ------------------------------------------------------------------------------------------------ provenance


def git_commit() -> str:
    """Short commit of the working tree, with ``+dirty`` when tracked files are modified."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict:
    """CPU model, usable cores, RAM, load average (concurrent work on the machine), torch version and devices."""
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    info = {
        "cpu": _cpu_model(),
        "cores": cores,
        "ram_gib": _ram_gib(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
    }
    return info


def machine_line(info: dict) -> str:
    """One markdown line describing the machine (used under every table)."""
    load = info.get("load_avg_1_5_15")
    gpu = ", GPUs: " + ", ".join(info["cuda"]) if info.get("cuda") else ", no GPU"
    return (f"{info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM{gpu}; torch {info['torch']} "
            f"({info['torch_threads']} threads); load average at start {load} (1/5/15 min)")


def command_line() -> str:
    """The exact command that ran this script, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    return " ".join([".venv/bin/python", shlex.quote(str(script))] + [shlex.quote(a) for a in sys.argv[1:]])


def provenance() -> dict:
    return {"machine": machine_info(), "commit": git_commit(), "command": command_line(),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# ------------------------------------------------------------------------------------------------ backbones


def resolve_checkpoint(which: str, bundled: str) -> str:
    """``"default"``/``"transfer"`` → the bundled weights (clear error when absent); ``"auto"`` → the bundled
    weights, else the training run's ``runs/backbone/last``; else a checkpoint path."""
    if which == "auto":
        for stem in (BUNDLED / bundled, REPO / "runs" / "backbone" / "last"):
            if stem.with_suffix(".safetensors").exists():
                return str(stem)
        raise SystemExit("no backbone: neither napari_metahistoseg/weights/backbone nor runs/backbone/last exists")
    if which in ("default", "transfer"):
        stem = BUNDLED / (bundled if which == "default" else "transfer")
        if not stem.with_suffix(".safetensors").exists():
            raise SystemExit(f"{stem}.safetensors does not exist (no bundled {which} backbone yet); pass a "
                             f"checkpoint path instead, e.g. --backbone runs/backbone/last --transfer "
                             f"runs/backbone/transfer")
        return str(stem)
    p = Path(which)
    if not p.is_absolute():
        p = (REPO / p) if (REPO / p).with_suffix(".safetensors").exists() or (REPO / p).exists() else p
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    if not stem.with_suffix(".safetensors").exists():
        raise SystemExit(f"checkpoint {stem}.safetensors not found")
    return str(stem)


def scratch_backbone(template):
    """The ``scratch`` baseline: the template's architecture, random weights (seed 0), as ``load_backbone("scratch")``
    builds it — but without needing the bundled weights to exist."""
    import torch

    from napari_metahistoseg.checkpoints import backbone_sha256
    from napari_metahistoseg.models import MetaHistoSegNet
    from napari_metahistoseg.pipeline import GENERIC, Backbone

    torch.manual_seed(0)
    model = MetaHistoSegNet(template.model.cfg, {GENERIC: 2}, hover_types=5).eval()
    return Backbone(model, {"name": "scratch"}, {}, backbone_sha256(model), "scratch")


# ------------------------------------------------------------------------------------------------ timing


def median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    med, times, _, _ = median_wall_cpu(fn, repeats, warmup)
    return med, times


def median_wall_cpu(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> tuple[float, list[float],
                                                                                          float, list[float]]:
    """Medians and lists of wall-clock and process CPU seconds of ``fn()`` (``warmup`` untimed runs first).

    On a machine shared with other jobs the CPU time of a single-threaded run approximates the wall time the
    same run would take on an idle core; the wall time is what a user waits here and now."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), walls, statistics.median(cpus), cpus


# ------------------------------------------------------------------------------------------------ tables


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.1e}" if 0 < abs(v) < 10 ** -digits else f"{v:.{digits}f}"
    return str(v)


def md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table (values formatted with :func:`fmt`)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ results


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(name: str, obj: dict) -> Path:
    path = RESULTS / f"{name}.json"
    _atomic_write(path, json.dumps(obj, indent=1, default=float) + "\n")
    return path


def read_json(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def write_md(name: str, text: str) -> Path:
    path = RESULTS / f"{name}.md"
    _atomic_write(path, text.rstrip() + "\n")
    return path


def floats(spec: str) -> list[float]:
    """``"0.4,0.5"`` → ``[0.4, 0.5]`` (comma lists of the sweep scripts' arguments)."""
    return [float(v) for v in spec.split(",")]


def write_sweep(name: str, data: dict, note: str, table: str) -> None:
    """Results of a tuning sweep: ``<name>.json`` (``data`` + provenance) and ``<name>.md`` (machine, commit,
    command, ``note``, ``table``)."""
    prov = provenance()
    write_json(name, {**prov, **data})
    write_md(name, f"{machine_line(prov['machine'])}  \nCommand (commit `{prov['commit']}`): `{prov['command']}`  \n"
             f"{note}\n\n{table}\n")


def new_figure(ncols: int, width: float = 4.0, height: float = 3.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, axes[0]


def save_plot(fig, name: str) -> Path:
    import matplotlib.pyplot as plt

    path = RESULTS / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
