"""The settings panel of the Adapt & predict widget: backbone, start head, mode, inner loop, devices, outputs.

It turns the controls into the core configs (:class:`MAMLConfig`, :class:`~.jobs.PredictSettings`); the
post-processing and tiling configs are attributes (``hover``, ``tiling``) with the library defaults.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QLineEdit, QSlider, QSpinBox, QWidget

from ..config import HoVerPostConfig, MAMLConfig, ObjectPostConfig, TilingConfig
from ..devices import available_devices, device_label
from . import jobs
from .common import path_row, row
from .layers import image_mpp, visible_region

MODES = {"fast: head only": "head", "full: MAML steps on decoder + head": "decoder"}
TTA = {"TTA off": 1, "TTA: 2 flips": 2, "TTA: 4 flips": 4, "TTA: 8 (flips, transposes)": 8}


class AdaptSettings(QWidget):
    def __init__(self, backbone_spec: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.hover = HoVerPostConfig()  # NP/HV post-processing thresholds used by Predict
        self.objects_cfg = ObjectPostConfig()  # gland/object instance rules used by Predict
        self.tiling = TilingConfig()
        self.backbone_edit = QLineEdit(backbone_spec, placeholderText="backbone checkpoint (bundled: default)")
        self.start_combo = QComboBox()
        self.start_combo.addItems(["new head", "current head"])
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(list(MODES))
        self.decoder_blocks = QSpinBox(minimum=0, maximum=16, value=MAMLConfig.decoder_blocks, prefix="blocks: ",
                                       specialValueText="blocks: all",
                                       toolTip="full mode: decoder blocks that adapt, from the full-resolution "
                                               "end (all = every block; fewer = faster, the rest run once)")
        self.decoder_blocks.setEnabled(False)  # head-only mode has no decoder blocks to choose
        self.mode_combo.currentTextChanged.connect(lambda t: self.decoder_blocks.setEnabled(MODES[t] == "decoder"))
        self.steps = QSpinBox(minimum=0, maximum=10000, value=MAMLConfig.steps)
        self.inner_lr = QDoubleSpinBox(decimals=4, minimum=1e-4, maximum=10.0, singleStep=0.005,
                                       value=MAMLConfig.inner_lr)
        self.first_order = QCheckBox("first-order", checked=MAMLConfig.first_order)
        self.calibrate = QCheckBox("calibrate", checked=MAMLConfig.calibrate_threshold,
                                   toolTip="fast mode, fully painted two-class support: fit the foreground "
                                           "probability threshold and the smoothing of the class decision that "
                                           "score best on the support")
        self.mode_combo.currentTextChanged.connect(lambda t: self.calibrate.setEnabled(MODES[t] == "head"))
        self.colour = QCheckBox("colour", checked=MAMLConfig.colour_features,
                                toolTip="fast mode: the head also sees the image's colour (RGB and haematoxylin / "
                                        "eosin, standardised per image) next to the backbone's features; helps "
                                        "where the backbone never saw the kind of object")
        self.mode_combo.currentTextChanged.connect(lambda t: self.colour.setEnabled(MODES[t] == "head"))
        found = available_devices()
        first = next((d for d in found if d.startswith("cuda")), "cpu")  # a CUDA GPU when there is one
        self.device_boxes = {d: QCheckBox(device_label(d), checked=(d == first)) for d in found}
        self.instances = QCheckBox("nuclei instances (HoVer)", checked=True)
        self.objects = QCheckBox("gland / object instances", checked=False,
                                 toolTip="instances of large objects (glands) of the predicted foreground: holes "
                                         "filled, small pieces dropped, touching objects split at necks")
        self.fov_first = QCheckBox("visible field first", checked=True)
        self.live = QCheckBox("live: re-adapt after each stroke")
        self.tta = QComboBox(toolTip="test-time augmentation: predict flipped (and transposed) copies of every tile "
                                     "and average them; each variant costs one more forward pass")
        self.tta.addItems(list(TTA))
        on = jobs.MITOSIS_AVAILABLE
        self.mitosis = QCheckBox("mitosis candidates", visible=on)
        self.mitosis_edit = QLineEdit(visible=on, placeholderText="mitosis model (bundled)")
        self.threshold = QSlider(Qt.Orientation.Horizontal, minimum=0, maximum=100, value=50, visible=on,
                                 toolTip="mitosis probability threshold")
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        for label, w in [("backbone", path_row(self.backbone_edit, "Backbone", "Backbone (*.safetensors *.json)")),
                         ("start from", self.start_combo), ("mode", row(self.mode_combo, self.decoder_blocks)),
                         ("steps / inner lr", row(self.steps, self.inner_lr, self.first_order, self.calibrate,
                                                  self.colour)),
                         ("devices", row(*self.device_boxes.values())), ("", row(self.instances, self.objects)),
                         ("", row(self.fov_first, self.live, self.tta)), ("", row(self.mitosis, self.mitosis_edit)),
                         ("threshold", self.threshold)]:
            form.addRow(label, w)
        form.labelForField(self.threshold).setVisible(on)

    def devices(self) -> list[str]:
        devs = [d for d, box in self.device_boxes.items() if box.isChecked()]
        if not devs:
            raise ValueError("no device selected: tick the CPU or a GPU")
        return devs

    def maml_config(self) -> MAMLConfig:
        return MAMLConfig(steps=self.steps.value(), inner_lr=self.inner_lr.value(),
                          first_order=self.first_order.isChecked(), adapt=MODES[self.mode_combo.currentText()],
                          decoder_blocks=self.decoder_blocks.value(),
                          calibrate_threshold=self.calibrate.isChecked(),
                          calibrate_smoothing=self.calibrate.isChecked(),
                          colour_features=self.colour.isChecked())

    def start_from_current(self) -> bool:
        return self.start_combo.currentText() == "current head"

    def predict_settings(self, image_layer: Any) -> jobs.PredictSettings:
        mitosis = self.mitosis_edit.text().strip() if jobs.MITOSIS_AVAILABLE and self.mitosis.isChecked() else None
        region = visible_region(image_layer) if self.fov_first.isChecked() else None
        tiling = dataclasses.replace(self.tiling, tta_variants=TTA[self.tta.currentText()])
        return jobs.PredictSettings(mpp=image_mpp(image_layer), devices=self.devices(), tiling=tiling,
                                    instances=self.instances.isChecked(), hover=self.hover, region=region,
                                    mitosis_model=mitosis, objects=self.objects.isChecked(),
                                    object_cfg=self.objects_cfg, name=image_layer.name)
