"""Screenshot of the plugin at work: the demo session adapted and predicted, saved to ``docs/screenshot.png``;
and the Train backbone panel after a short run, saved to ``docs/train_panel.png``.

    .venv/bin/python scripts/screenshot.py [--backbone PATH] [--steps 20] [--out docs/screenshot.png]
        [--train-out docs/train_panel.png] [--train-steps 60]

Opens napari with ``show=True`` (starting an Xvfb display itself when ``$DISPLAY`` is unset), loads the sample
"Demo session: strokes ready to Adapt", opens the Annotate / Adapt & predict / Evaluate widgets, runs Adapt &
predict in the widget's worker thread, evaluates against the synthetic truth and saves the whole window.
Backbone: ``--backbone``, else the bundled one, else ``runs/backbone/last`` (the training job's checkpoint).
The Train backbone panel trains a tiny backbone (8 base channels, depth 3) on synthetic nuclei and gland tiles
written to a temporary folder, for ``--train-steps`` steps (``0``: no panel picture).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "napari-metahistoseg"
WINDOW_SIZE = (1600, 1000)
XVFB_DISPLAY = ":97"
RUN_TIMEOUT_S = 900


def pick_backbone(arg: str | None) -> str:
    from napari_metahistoseg._qt.state import bundled_backbone_available

    if arg:
        return arg
    if bundled_backbone_available():
        return "default"
    last = ROOT / "runs" / "backbone" / "last"
    if last.with_suffix(".json").exists():
        return str(last)
    sys.exit("no backbone: pass --backbone PATH (no bundled weights and no runs/backbone/last checkpoint)")


def ensure_display() -> subprocess.Popen | None:
    if os.environ.get("DISPLAY"):
        return None
    if shutil.which("Xvfb") is None:
        sys.exit("no $DISPLAY and no Xvfb: install xvfb (make xvfb) or run under a display")
    proc = subprocess.Popen(["Xvfb", XVFB_DISPLAY, "-screen", "0", f"{WINDOW_SIZE[0]}x{WINDOW_SIZE[1]}x24"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ["DISPLAY"] = XVFB_DISPLAY
    time.sleep(1.5)
    return proc


def wait(app, cond, timeout_s: float) -> None:
    t0 = time.time()
    while not cond():
        app.processEvents()
        time.sleep(0.02)
        if time.time() - t0 > timeout_s:
            raise TimeoutError("timed out waiting for the plugin")


def train_panel_shot(app, viewer, out: Path, steps: int, tmp: Path) -> None:
    """Run the Train backbone panel on a tiny synthetic config and save a picture of the panel."""
    import json

    from napari_metahistoseg.data.synthetic import synthetic_tile
    from napari_metahistoseg.data.task import save_unified

    for k, (name, glands) in enumerate((("monuseg", False), ("glas", True))):
        save_unified([synthetic_tile((128, 128), seed=10 * k + i, mpp=0.5, glands=glands).with_(
            task=name, sample_id=f"s{i}") for i in range(4)], tmp / "data" / name)
    cfg = {"model": {"base_channels": 8, "depth": 3}, "augment": {"crop_px": 96},
           "episodes": {"n_support": 2, "n_query": 2, "episodes_per_batch": 1},
           "data": {"monuseg": "data/monuseg", "glas": "data/glas"}, "supervised_steps": steps * 3 // 4,
           "meta_steps": steps - steps * 3 // 4, "batch_size": 4, "checkpoint_every": 20,
           "val_fraction": 0.25, "val_every": 10,  # one of the four images of each task held apart
           "out_dir": str(tmp / "run"), "device": "cpu"}
    config = tmp / "tiny_backbone.json"
    config.write_text(json.dumps(cfg, indent=1))
    _, panel = viewer.window.add_plugin_dock_widget(PLUGIN, "Train backbone")
    panel.config_edit.setText(str(config))
    panel.config_edit.editingFinished.emit()
    panel.start()
    wait(app, lambda: not panel.runner.busy, RUN_TIMEOUT_S)
    print(panel.status.text(), panel.result.text())
    if panel.checkpoint is None:
        sys.exit("the training run failed")
    panel.resize(520, panel.sizeHint().height())
    for _ in range(10):
        app.processEvents()
        time.sleep(0.05)
    out.parent.mkdir(parents=True, exist_ok=True)
    panel.grab().save(str(out))
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshot.png")
    ap.add_argument("--mitosis", action="store_true", help="also classify mitosis candidates")
    ap.add_argument("--train-out", type=Path, default=ROOT / "docs" / "train_panel.png")
    ap.add_argument("--train-steps", type=int, default=60, help="steps of the Train panel's run (0: no picture)")
    args = ap.parse_args(argv)
    xvfb = ensure_display()
    sessions = tempfile.TemporaryDirectory(prefix="mhs-screenshot-")  # autosave here, not in the user's home
    os.environ["METAHISTOSEG_SESSIONS"] = sessions.name
    try:
        import napari
        from qtpy.QtWidgets import QApplication

        backbone = pick_backbone(args.backbone)
        print(f"backbone: {backbone}")
        viewer = napari.Viewer(show=True, title="napari-metahistoseg")
        viewer.window._qt_window.resize(*WINDOW_SIZE)  # noqa: SLF001 - window size for the picture only
        viewer.open_sample(PLUGIN, "demo_session")
        _, annotate = viewer.window.add_plugin_dock_widget(PLUGIN, "Annotate support")
        _, adapt = viewer.window.add_plugin_dock_widget(PLUGIN, "Adapt & predict")
        _, evaluate = viewer.window.add_plugin_dock_widget(PLUGIN, "Evaluate", tabify=False)
        app = QApplication.instance()
        adapt.settings.backbone_edit.setText(backbone)
        adapt.settings.steps.setValue(args.steps)
        adapt.settings.fov_first.setChecked(False)
        adapt.settings.mitosis.setChecked(args.mitosis)
        worker = adapt.run_adapt()
        if worker is None:
            sys.exit("Adapt was refused (see the notification above)")
        wait(app, lambda: not adapt.runner.busy, RUN_TIMEOUT_S)
        print(adapt.status.text())
        if not adapt.last_created and not adapt.state.head:
            sys.exit("adapt/predict failed")
        # held-out truth of the same synthetic tile (the demo session is seed 0): its Labels layers, hidden
        from napari_metahistoseg.sample_data import synthetic_he

        for data, kwargs, _ in synthetic_he(seed=0)[1:]:
            viewer.add_labels(data, **kwargs)
        evaluate.truth_combo.set_layer(viewer.layers["truth (classes)"])
        evaluate.truth_inst_combo.set_layer(viewer.layers["truth (nuclei)"])
        res = evaluate.evaluate()
        print("metrics:", {k: round(v, 3) for k, v in res.items()})
        viewer.layers["classes (demo H&E)"].opacity = 0.65  # a stronger overlay than the default, for the picture
        viewer.layers["nuclei (demo H&E)"].contour = 2
        viewer.layers.selection.active = viewer.layers["nuclei (demo H&E)"]
        viewer.reset_view()
        for _ in range(20):
            app.processEvents()
            time.sleep(0.05)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        viewer.screenshot(str(args.out), canvas_only=False, flash=False)
        print(f"wrote {args.out}")
        if args.train_steps:
            train_panel_shot(app, viewer, args.train_out, args.train_steps, Path(sessions.name))
        viewer.close()
    finally:
        sessions.cleanup()
        if xvfb is not None:
            xvfb.terminate()


if __name__ == "__main__":
    main()
