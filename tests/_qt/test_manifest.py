"""Every widget and sample opens through the plugin manifest."""

from __future__ import annotations

import pytest

from napari_metahistoseg._qt.adapt import AdaptWidget
from napari_metahistoseg._qt.annotate import AnnotateWidget
from napari_metahistoseg._qt.evaluate import EvaluateWidget
from napari_metahistoseg._qt.heads import HeadsWidget
from napari_metahistoseg._qt.mitosis import MitosisWidget
from napari_metahistoseg._qt.train import TrainWidget

from ._helpers import PLUGIN

WIDGETS = {"Annotate support": AnnotateWidget, "Adapt & predict": AdaptWidget,
           "Export / import head": HeadsWidget, "Evaluate": EvaluateWidget, "Train backbone": TrainWidget,
           "Mitosis classifier": MitosisWidget}


@pytest.mark.parametrize("name", list(WIDGETS))
def test_widget_opens_from_manifest(viewer, name):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    assert isinstance(widget, WIDGETS[name])


def test_all_widgets_share_state(viewer):
    widgets = [viewer.window.add_plugin_dock_widget(PLUGIN, name)[1] for name in WIDGETS]
    assert len({id(w.state) for w in widgets if hasattr(w, "state")}) == 1


@pytest.mark.parametrize(("key", "n_layers"), [("synthetic_he", 3), ("ihc_image", 1), ("demo_session", 2)])
def test_samples_open(viewer, key, n_layers):
    viewer.open_sample(PLUGIN, key)
    assert len(viewer.layers) == n_layers


def test_demo_session_is_ready_to_adapt(viewer):
    viewer.open_sample(PLUGIN, "demo_session")
    _, annotate = viewer.window.add_plugin_dock_widget(PLUGIN, "Annotate support")
    _, adapt = viewer.window.add_plugin_dock_widget(PLUGIN, "Adapt & predict")
    support = viewer.layers["support"]
    assert annotate.support_combo.layer() == support and adapt.support_combo.layer() == support
    assert adapt.image_combo.layer() == viewer.layers["demo H&E"]
    assert annotate.class_combo.count() == 2 and annotate.classes() == ["background", "nucleus"]
