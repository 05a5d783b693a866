"""``metahistoseg inspect`` run in-process on every shared data folder, plus its error paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_metahistoseg.cli import main
from napari_metahistoseg.data import Sample, save_unified

EXPECTED = {  # folder -> fields of the JSON summary (counts from each folder's SOURCE.md)
    "monuseg": {"layout": "monuseg", "task": "monuseg", "kind": "segmentation", "n_images": 5,
                "classes": ["background", "nucleus"], "n_instances": 1726, "n_points": None, "n_patches": None,
                "mpp": 0.25, "image_sizes": {"min_h": 1000, "max_h": 1000, "min_w": 1000, "max_w": 1000}},
    "cpm15": {"layout": "cpm15", "task": "cpm15", "kind": "segmentation", "n_images": 10, "n_instances": 1860,
              "mpp": None, "mpp_values": [0.25, 0.5],
              "image_sizes": {"min_h": 392, "max_h": 888, "min_w": 459, "max_w": 1032}},
    "consep_tiles": {"layout": "consep_tiles", "task": "consep", "n_images": 432, "n_instances": 18216,
                     "classes": ["background", "other", "inflammatory", "epithelial", "spindle"]},
    "glas": {"layout": "glas", "task": "glas", "n_images": 32, "classes": ["background", "gland"], "mpp": 0.62,
             "image_sizes": {"min_h": 522, "max_h": 522, "min_w": 775, "max_w": 775}},
    "bm_graz_cells": {"layout": "bm_graz_cells", "kind": "points", "n_images": 4, "n_points": 1639, "mpp": None},
    "amibr_mitosis": {"layout": "amibr_mitosis", "kind": "patches", "n_images": 513, "n_patches": 513,
                      "classes": ["normal", "atypical"], "label_counts": {"normal": 401, "atypical": 112},
                      "n_unanimous": 416, "n_instances": None},
}


def run_inspect(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict | None, str]:
    code = main(["inspect", *args])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return code, (json.loads(lines[-1]) if code == 0 else None), err


@pytest.mark.parametrize("folder", sorted(EXPECTED))
def test_inspect_shared_folder(shared_data: Path, capsys: pytest.CaptureFixture[str], folder: str) -> None:
    code, summary, err = run_inspect(capsys, str(shared_data / folder))
    assert code == 0, err
    for key in ("layout", "task", "kind", "n_images", "classes", "n_instances", "n_points", "n_patches",
                "label_counts", "mpp", "image_sizes"):
        assert key in summary
    for key, value in EXPECTED[folder].items():
        assert summary[key] == value, key
    assert f"layout {summary['layout']}" in err  # the human summary goes to stderr


def test_inspect_explicit_layout(shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, summary, _ = run_inspect(capsys, str(shared_data / "glas"), "--layout", "glas")
    assert code == 0 and summary["n_images"] == 32


def test_inspect_unified_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    inst = np.zeros((16, 20), np.uint32)
    inst[2:6, 3:8], inst[9:12, 10:15] = 1, 2
    samples = [
        Sample(image=rng.integers(0, 255, (16, 20, 3), dtype=np.uint8), task="toy", sample_id=f"s{i}",
               semantic=(inst > 0).astype(np.uint8), instances=inst, mpp=0.5)
        for i in range(2)
    ]
    save_unified(samples, tmp_path / "toy")
    code, summary, err = run_inspect(capsys, str(tmp_path / "toy"))
    assert code == 0, err
    assert summary["layout"] == "unified" and summary["task"] == "toy"
    assert (summary["n_images"], summary["n_instances"], summary["mpp"]) == (2, 4, 0.5)


@pytest.mark.parametrize("make_bad", ["empty", "missing", "file", "unknown_layout", "wrong_layout"])
def test_inspect_bad_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str], make_bad: str) -> None:
    args = {
        "empty": [str(tmp_path)],
        "missing": [str(tmp_path / "nope")],
        "file": [str(tmp_path / "a.txt")],
        "unknown_layout": [str(tmp_path), "--layout", "no_such_layout"],
        "wrong_layout": [str(tmp_path), "--layout", "monuseg"],
    }[make_bad]
    (tmp_path / "a.txt").write_text("not a folder")
    code = main(["inspect", *args])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metahistoseg: error: "), err


def test_cli_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2  # no command: help on stderr
    assert "inspect" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "inspect" in capsys.readouterr().out
    assert main(["inspect"]) == 2  # missing DATA_DIR: argparse usage error
    assert "DATA_DIR" in capsys.readouterr().err


def test_debug_shows_traceback(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="layout not recognised"):
        main(["--debug", "inspect", str(tmp_path)])
