"""Train backbone: meta-train (or resume) a backbone from a JSON TrainConfig inside napari — what
``metahistoseg meta-train`` does, on a worker thread with a progress bar, ETA, a live loss curve and Cancel.

With a share of the images *held apart for validation* (``TrainConfig.val_fraction``), the run also shows, every
``val_every`` steps, the mIoU that the generic head adapted on one training image of each task reaches on that task's
held-apart images (and, when it starts from trained weights, where it starts: forgetting shows against it).

A cancelled run keeps its last checkpoint (every ``checkpoint_every`` steps); *resume* (on by default) continues
it from there. *Use as backbone* makes the finished checkpoint the backbone of this viewer's Adapt & predict
panel.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Generator
from pathlib import Path
from typing import Any

import napari
from napari.utils.notifications import show_info
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..config import TrainConfig
from ..devices import available_devices
from ..maml import relay
from ..training import load_train_config, read_log, train, validation_summary
from .common import path_row, row
from .plot import LossCurve
from .state import state_for
from .workers import JobRunner


def train_job(cfg: TrainConfig, resume: bool = True) -> Generator[dict, None, Path]:
    """:func:`~napari_metahistoseg.training.train` with the phase as the progress stage; returns the checkpoint."""
    return (yield from relay(train(cfg, resume=resume), lambda p: {**p, "stage": p["phase"]}))


log = logging.getLogger(__name__)

RANDOM = "(random)"  # the start-from choice of random initial weights


class TrainWidget(QWidget):
    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.config_edit = QLineEdit(placeholderText="TrainConfig JSON, e.g. configs/backbone.json")
        self.config_edit.editingFinished.connect(self._load)
        self.out_edit = QLineEdit(placeholderText="output folder (from the config)")
        self.device_combo = QComboBox(editable=True)
        self.device_combo.addItems(["auto", *available_devices()])  # auto: a GPU when there is one
        self.supervised_spin, self.meta_spin = QSpinBox(maximum=10**7), QSpinBox(maximum=10**7)
        self.init_combo = QComboBox(editable=True)  # "(random)" or a checkpoint path typed in
        self.init_combo.addItems([RANDOM, "default", "transfer"])
        self.init_combo.setToolTip("start from these weights (fine-tuning): the bundled backbone (default), the "
                                   "transfer baseline, or a checkpoint path of the same architecture")
        self.resume_check = QCheckBox("resume from the output folder's checkpoint", checked=True)
        self.button = QPushButton("Train")
        self.button.clicked.connect(lambda: self.start())
        self.cancel_button = QPushButton("Cancel", enabled=False)
        self.bar, self.status = QProgressBar(), QLabel("Choose a training config (JSON), then press Train.")
        self.status.setWordWrap(True)
        self.curve = LossCurve()
        self.curve.setToolTip("training loss per step: the supervised loss, then the meta (query) loss (own scale)")
        self.val_curve = LossCurve(name="held-apart mIoU", colour=(90, 200, 255))
        self.val_curve.setToolTip("validation (the config's val_fraction): the generic head adapted on a training "
                                  "image of each task, mIoU on the task's held-apart images, mean over tasks")
        self.val_curve.setVisible(False)
        self.val_spin = QSpinBox(maximum=90, suffix=" %")
        self.val_spin.setToolTip("share of each task's images held apart from training to validate on (0: none); "
                                 "the validation runs every val_every steps of the config (0: at every checkpoint)")
        self.val_label = QLabel("")
        self.val_label.setWordWrap(True)
        self.result = QLabel("")
        self.result.setWordWrap(True)
        self.use_button = QPushButton("Use as backbone", enabled=False)
        self.use_button.setToolTip("make this checkpoint the backbone of Adapt & predict")
        self.use_button.clicked.connect(self.use_checkpoint)
        self.runner = JobRunner(self.bar, self.status, self)
        self.cancel_button.clicked.connect(self.runner.cancel)
        self.runner.started.connect(lambda: self._busy(True))
        self.runner.stopped.connect(self._stopped)
        self.cfg: TrainConfig | None = None
        self.checkpoint: str | None = None
        form = QFormLayout()
        for label, w in [("config", path_row(self.config_edit, "Training config", "JSON (*.json)")),
                         ("output folder", self.out_edit), ("device", self.device_combo),
                         ("supervised steps", self.supervised_spin), ("meta steps", self.meta_spin),
                         ("start from", self.init_combo), ("held apart for validation", self.val_spin),
                         ("", self.resume_check)]:
            form.addRow(label, w)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        for w in (row(self.button, self.cancel_button), self.bar, self.status, self.curve, self.val_curve,
                  self.val_label, self.result, self.use_button):
            lay.addWidget(w)
        lay.addStretch()

    def _load(self) -> TrainConfig | None:
        """Read the config named in the box and show its steps and output folder (an error notification if it is
        not a valid TrainConfig)."""
        self.cfg = self.runner.guarded("Loading the training config",
                                       lambda: load_train_config(self.config_edit.text()))
        if self.cfg is not None:
            self.supervised_spin.setValue(self.cfg.supervised_steps)
            self.meta_spin.setValue(self.cfg.meta_steps)
            self.out_edit.setText(self.cfg.out_dir)
            self.init_combo.setCurrentText(self.cfg.init_from or RANDOM)
            self.val_spin.setValue(round(100 * self.cfg.val_fraction))
            self.status.setText(f"{len(self.cfg.data)} task(s): {', '.join(self.cfg.data)}; "
                                f"method {self.cfg.method}")
        return self.cfg

    def settings(self) -> TrainConfig:
        """The config with this panel's overrides (ValueError naming the problem)."""
        if not self.config_edit.text().strip():
            raise ValueError("no training config: choose a TrainConfig JSON (e.g. configs/backbone.json)")
        cfg = load_train_config(self.config_edit.text(), out_dir=self.out_edit.text().strip() or None,
                                device=self.device_combo.currentText().strip() or None,
                                supervised_steps=self.supervised_spin.value(), meta_steps=self.meta_spin.value(),
                                init_from=self._init_from(), val_fraction=self.val_spin.value() / 100)
        if cfg.supervised_steps + cfg.meta_steps == 0:
            raise ValueError("nothing to train: supervised and meta steps are both 0")
        return cfg

    def _init_from(self) -> str:
        text = self.init_combo.currentText().strip()
        return "" if text == RANDOM else text

    def start(self) -> Any:
        """Start training (an error notification if the settings are wrong)."""
        return self.runner.guarded("Training", self._start)

    def _start(self) -> None:
        cfg = self.settings()
        self.curve.clear()
        self.val_curve.clear()
        self.val_curve.setVisible(bool(cfg.val_fraction))
        self.val_label.setText("")
        self.checkpoint = None
        self.use_button.setEnabled(False)
        self.result.setText(f"training into {cfg.out_dir} …")
        if self.resume_check.isChecked():
            self._history(Path(cfg.out_dir))
        self.runner.run("Training", train_job, cfg, self.resume_check.isChecked(), on_yield=self._step,
                        on_return=self._done)

    def _history(self, out: Path) -> None:
        """A run that resumes from a checkpoint in ``out`` continues its curves: the logged steps and validations up
        to that checkpoint are shown first (those after it are trained again)."""
        if not all((out / f).exists() for f in ("last.json", "resume.safetensors", "log.jsonl")):
            return
        try:
            done = int(json.loads((out / "last.json").read_text())["training"]["steps_done"])
            steps, vals = read_log(out / "log.jsonl")
        except (OSError, ValueError, KeyError, TypeError) as e:  # the curves only: training reports real problems
            log.warning("%s: earlier curves not shown (%s)", out, e)
            return
        for r in steps:
            if r["step"] <= done and "total" in r:
                self.curve.add(r["total"], r["step"])
        for v in vals:
            if v["step"] <= done:
                self._validation(v)

    def _step(self, p: dict) -> None:
        if p["phase"] != "validation":
            self.curve.add(p["loss"], p["step"])
        elif "val" in p:  # a validation's result (its progress only moves the bar)
            self._validation(p["val"])

    def _validation(self, v: dict) -> None:
        self.val_curve.setVisible(True)
        self.val_curve.add(v["mean_miou"], v["step"])
        self.val_label.setText(f"held-apart images, step {v['step']}: {validation_summary(v)}")

    def _done(self, path: Path) -> None:
        self.checkpoint = str(path)
        self.use_button.setEnabled(True)
        self.result.setText(f"checkpoint: {path}")
        show_info(f"Training finished: {path}")

    def use_checkpoint(self) -> None:
        """The finished checkpoint becomes the backbone of this viewer's Adapt & predict panel."""
        if self.checkpoint:
            state_for(self.viewer).backbone_spec = self.checkpoint
            show_info(f"Adapt & predict now uses the backbone {self.checkpoint}")

    def _stopped(self, outcome: str) -> None:
        self._busy(False)
        if outcome == "aborted":
            self.result.setText("cancelled: the last checkpoint in the output folder is kept; press Train with "
                                "<i>resume</i> ticked to continue from it")

    def _busy(self, busy: bool) -> None:
        self.button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)
