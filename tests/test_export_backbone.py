"""scripts/export_backbone.py reads a run's log.jsonl: step records (a resume rewrites steps) apart from the
validation records, the wall time over resumed segments, and the curves with a validation panel."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from napari_metahistoseg.training import read_log

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("export_backbone", ROOT / "scripts" / "export_backbone.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _val(step: int, a: float, b: float) -> dict:
    return {"step": step, "phase": "validation", "seconds": 17.5, "mean_miou": (a + b) / 2,
            "tasks": {"monuseg": {"miou": a, "images": 1, "support": ["x"]},
                      "glas": {"miou": b, "images": 2, "support": ["y"]}}}


def test_read_log_keeps_validations_apart(tmp_path):
    mod = _module()
    rows = [{"step": s, "phase": "supervised", "seconds": 10.0 * s, "seg/monuseg": 1.0 / s, "total": 2.0 / s}
            for s in range(1, 5)]
    rows.insert(2, _val(2, 0.5, 0.6))  # validation records carry their own duration as "seconds"
    rows += [{"step": 4, "phase": "supervised", "seconds": 3.0, "seg/monuseg": 0.2, "total": 0.4},  # resumed at 3
             {"step": 5, "phase": "meta", "seconds": 6.0, "seg/monuseg": 0.1, "total": 0.3}, _val(5, 0.7, 0.8)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps, vals = read_log(tmp_path / "log.jsonl")
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5] and steps[3]["seconds"] == 3.0  # the resumed step 4 wins
    assert all(r["phase"] != "validation" for r in steps) and [v["step"] for v in vals] == [2, 5]
    assert mod.training_seconds(tmp_path) == 40.0 + 6.0  # first segment up to 40 s, then 6 s after the resume
    info = mod.plot_curves(tmp_path, tmp_path / "curves.png")
    assert info == {"steps": 5, "seconds": 46.0} and (tmp_path / "curves.png").stat().st_size > 10_000
