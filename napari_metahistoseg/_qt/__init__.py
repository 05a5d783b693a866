"""napari dock widgets, reader, workers and layer conversion — the only package importing napari/Qt/magicgui.

Widgets share one :class:`~.state.PluginState` per viewer (backbone, adapted head, session store); long work
runs in napari's generator ``thread_worker`` (:mod:`.workers`) over the core generators of
:mod:`napari_metahistoseg.pipeline` and :mod:`napari_metahistoseg.inference`.
"""
