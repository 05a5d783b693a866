"""Train backbone panel: a run from a JSON config with progress and a live loss curve, Cancel keeps the checkpoint
and Train resumes from it, the result becomes the Adapt panel's backbone, bad configs give one clear error."""

from __future__ import annotations

import json

import pytest

from napari_metahistoseg._qt.state import state_for
from napari_metahistoseg._qt.train import TrainWidget
from napari_metahistoseg.data.synthetic import synthetic_tile
from napari_metahistoseg.data.task import save_unified

from ._helpers import PLUGIN


@pytest.fixture
def config(tmp_path):
    """A tiny TrainConfig JSON whose data folders are relative to the config file, as in configs/."""
    for k, name in enumerate(("monuseg", "glas")):
        samples = [synthetic_tile((96, 96), seed=10 * k + i).with_(task=name, sample_id=f"s{i}") for i in range(3)]
        save_unified(samples, tmp_path / "data" / name)
    cfg = {"model": {"base_channels": 8, "depth": 3}, "augment": {"crop_px": 64},
           "maml": {"steps": 2, "inner_lr": 0.1, "learn_inner_lr": True, "max_support_pixels": 500},
           "episodes": {"n_support": 2, "n_query": 2, "episodes_per_batch": 1},
           "data": {"monuseg": "data/monuseg", "glas": "data/glas"}, "supervised_steps": 3, "meta_steps": 2,
           "batch_size": 2, "checkpoint_every": 1, "out_dir": str(tmp_path / "run"), "seed": 1, "device": "cpu"}
    path = tmp_path / "cfg" / "train.json"
    path.parent.mkdir()
    path.write_text(json.dumps(cfg))
    (tmp_path / "cfg" / "data").symlink_to(tmp_path / "data")  # relative folders resolve next to the config
    return path


@pytest.fixture
def panel(viewer) -> TrainWidget:
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Train backbone")
    return widget


def _load(panel: TrainWidget, path) -> None:
    panel.config_edit.setText(str(path))
    panel.config_edit.editingFinished.emit()


def test_train_runs_with_progress_and_becomes_the_backbone(viewer, panel, config, qtbot, tmp_path):
    _load(panel, config)
    assert panel.supervised_spin.value() == 3 and panel.meta_spin.value() == 2
    assert panel.out_edit.text() == str(tmp_path / "run") and "2 task(s)" in panel.status.text()
    panel.meta_spin.setValue(1)  # the panel's fields override the config
    panel.start()
    assert panel.runner.busy and not panel.button.isEnabled() and panel.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: not panel.runner.busy, timeout=120000)
    assert len(panel.curve.values) == 4 and panel.checkpoint and panel.checkpoint.endswith("last.safetensors")
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == ["supervised"] * 3 + ["meta"]
    assert panel.status.text() == "Training: done" and panel.use_button.isEnabled()
    _, adapt = viewer.window.add_plugin_dock_widget(PLUGIN, "Adapt & predict")
    panel.use_checkpoint()
    assert state_for(viewer).backbone_spec == panel.checkpoint
    assert adapt.settings.backbone_edit.text() == panel.checkpoint
    assert state_for(viewer).backbone().mpp == 0.5  # it loads


def test_cancel_keeps_the_checkpoint_and_train_resumes(panel, config, qtbot, tmp_path):
    _load(panel, config)
    panel.supervised_spin.setValue(40)
    first: list[int] = []

    def cancel_after_two(p: dict) -> None:
        first.append(p["step"])
        if len(first) == 2:
            panel.runner.cancel()

    panel._step = cancel_after_two  # noqa: SLF001 - hook the per-step handler of this run
    panel.start()
    qtbot.waitUntil(lambda: not panel.runner.busy, timeout=120000)
    assert panel.checkpoint is None and panel.status.text() == "Training: cancelled"
    assert "cancelled" in panel.result.text()
    done = [json.loads(x)["step"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert 2 <= len(done) < 42
    del panel._step  # noqa: SLF001
    panel.supervised_spin.setValue(len(done) + 1)
    panel.meta_spin.setValue(0)
    panel.start()  # resume is ticked: continues after the last checkpoint
    qtbot.waitUntil(lambda: not panel.runner.busy, timeout=120000)
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps[-1] == len(done) + 1
    kept = json.loads((tmp_path / "run" / "last.json").read_text())["training"]["steps_done"]
    assert kept == len(done) + 1  # (checkpoint_every 1)
    # the resumed run's curve continues the first one: its steps up to the checkpoint, then the new step
    assert panel.checkpoint is not None and panel.curve.steps == list(range(1, len(done) + 2))


def test_bad_configs_give_one_clear_error(panel, tmp_path, errors):
    panel.start()
    assert errors[-1].startswith("Training failed: no training config")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    _load(panel, bad)
    assert str(bad) in errors[-1] and "not valid JSON" in errors[-1]
    bad.write_text(json.dumps({"method": "nope"}))
    panel.start()
    assert "method" in errors[-1] and not panel.runner.busy
    _load(panel, tmp_path / "missing.json")
    assert "config file not found" in errors[-1]


def test_start_from_weights(panel, config, qtbot, tmp_path, errors):
    _load(panel, config)
    assert panel.init_combo.currentText() == "(random)"
    panel.init_combo.setCurrentText("default")  # the bundled backbone is larger than the tiny config's network
    panel.start()
    qtbot.waitUntil(lambda: not panel.runner.busy, timeout=60000)
    assert "another architecture" in errors[-1] and "base_channels" in errors[-1]
    panel.init_combo.setCurrentText("(random)")
    panel.supervised_spin.setValue(1)
    panel.meta_spin.setValue(0)
    panel.start()
    qtbot.waitUntil(lambda: not panel.runner.busy, timeout=60000)
    first = panel.checkpoint
    panel.init_combo.setCurrentText(first)  # fine-tune the run's own result into another folder
    panel.out_edit.setText(str(tmp_path / "tuned"))
    panel.start()
    qtbot.waitUntil(lambda: not panel.runner.busy, timeout=60000)
    desc = json.loads((tmp_path / "tuned" / "last.json").read_text())
    assert desc["training"]["init"]["init_from"] == first


def test_validation_curve_on_held_apart_images(panel, config, qtbot, tmp_path):
    _load(panel, config)
    assert panel.val_spin.value() == 0 and not panel.val_curve.isVisibleTo(panel)  # the config holds none apart
    panel.val_spin.setValue(34)  # one of the three images of each task
    panel.supervised_spin.setValue(2)
    panel.meta_spin.setValue(0)
    seen: list[str] = []
    step = panel._step  # noqa: SLF001

    def record(p: dict) -> None:
        seen.append(p["phase"])
        step(p)

    panel._step = record  # noqa: SLF001 - watch the events of this run
    panel.start()
    assert panel.val_curve.isVisibleTo(panel)
    qtbot.waitUntil(lambda: not panel.runner.busy, timeout=120000)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    vals = [r for r in log if r["phase"] == "validation"]
    assert [r["step"] for r in vals] == [1, 2]  # checkpoint_every 1 in the config: a validation at each
    assert panel.val_curve.values == [r["mean_miou"] for r in vals] and panel.val_curve.steps == [1, 2]
    losses = [r["total"] for r in log if r["phase"] == "supervised"]
    assert panel.curve.values == pytest.approx(losses, abs=1e-4)  # no mIoU on the loss curve
    label = panel.val_label.text()
    assert label.startswith("held-apart images, step 2: mean mIoU") and "glas" in label
    assert "validation" in seen and panel.status.text() == "Training: done"
    # resumed for one more step: the curves continue the first run's (its validations at steps 1 and 2 come back)
    panel._step = step  # noqa: SLF001
    panel.supervised_spin.setValue(3)
    panel.start()
    qtbot.waitUntil(lambda: not panel.runner.busy, timeout=120000)
    assert panel.val_curve.steps == [1, 2, 3] and panel.curve.steps == [1, 2, 3]
    assert panel.val_label.text().startswith("held-apart images, step 3:")
