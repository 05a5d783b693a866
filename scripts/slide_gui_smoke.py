"""Slide-scale GUI check with a real canvas: a multiscale image above ``TilingConfig.stream_above_mp``, zoomed in;
a support *region* made from the visible field, strokes painted into it, Adapt & predict (streamed, multiscale
result layers), Evaluate against the support region; prints what it saw and saves a screenshot.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/slide_gui_smoke.py [--size 6144] \
        [--out slide_smoke.png]

Not a test (minutes of CPU with the bundled backbone); run it after changing the slide-scale GUI paths. Exits 1 if
the support is not a region of the visible field, the results are not multiscale, or the region's accuracy against
the synthetic truth is below ``--min-accuracy``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PLUGIN = "napari-metahistoseg"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=6144, help="image side (a multiple of 1024; 6144 = 38 MP)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--min-accuracy", type=float, default=0.9)
    ap.add_argument("--out", default="slide_smoke.png")
    args = ap.parse_args()
    import os
    import tempfile

    from napari_metahistoseg._qt.jobs import PREDICTIONS_ENV
    from napari_metahistoseg.session import SESSIONS_ENV

    scratch = tempfile.mkdtemp(prefix="slide_smoke_")  # autosaved sessions and predictions stay out of $HOME
    os.environ[SESSIONS_ENV], os.environ[PREDICTIONS_ENV] = f"{scratch}/sessions", f"{scratch}/predictions"

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_metahistoseg._qt.layers import find_layers, visible_region
    from napari_metahistoseg.data.synthetic import synthetic_tile
    from napari_metahistoseg.sample_data import support_to_layer

    def pump(seconds: float) -> None:
        end = time.time() + seconds
        while time.time() < end:
            QApplication.processEvents()
            time.sleep(0.02)

    n = args.size // 1024
    tile = synthetic_tile((1024, 1024), seed=3, mpp=0.5)
    big, sem = np.tile(tile.image, (n, n, 1)), np.tile(tile.semantic, (n, n))
    viewer = napari.Viewer(show=True)
    img = viewer.add_image([big, big[::2, ::2], big[::4, ::4], big[::8, ::8]], rgb=True, multiscale=True,
                           name="slide", metadata={"mpp": 0.5})
    _, annotate = viewer.window.add_plugin_dock_widget(PLUGIN, "Annotate support")
    _, adapt = viewer.window.add_plugin_dock_widget(PLUGIN, "Adapt & predict")
    pump(2)
    viewer.scene.camera.zoom *= 6
    viewer.scene.camera.center = (args.size // 2, args.size // 3)
    pump(2)
    field = visible_region(img, 1.0)
    support = annotate.create_support()
    r0, c0 = support.metadata["metahistoseg"]["origin"]
    h, w = support.data.shape
    print(f"visible field {field}; support region at {(r0, c0)}, {h}x{w}")
    ok = field is not None and field[0] <= r0 and field[2] <= c0 and h * w < args.size**2
    strokes = np.zeros((h, w), np.uint8)
    strokes[::6] = support_to_layer(sem[r0:r0 + h, c0:c0 + w])[::6]
    support.data = strokes
    adapt.settings.steps.setValue(args.steps)
    t0 = time.time()
    adapt.run_adapt()
    while adapt.runner.worker is not None:
        pump(0.5)
    print(f"adapt + predict {time.time() - t0:.0f} s: {adapt.status.text()}")
    for kind in ("prediction", "instances"):
        layers = find_layers(viewer, kind)
        shapes = [a.shape for a in layers[0].data] if layers and layers[0].multiscale else None
        print(f"{kind}: levels {shapes}")
        ok &= shapes is not None and shapes[0] == (args.size, args.size)
    pred = find_layers(viewer, "prediction")[0]
    acc = float((np.asarray(pred.data[0][r0:r0 + h, c0:c0 + w]) == sem[r0:r0 + h, c0:c0 + w]).mean())
    print(f"accuracy in the region {acc:.3f}")
    ok &= acc >= args.min_accuracy
    _, evaluate = viewer.window.add_plugin_dock_widget(PLUGIN, "Evaluate")
    evaluate.truth_combo.set_layer(support)
    evaluate.pred_inst_combo.setCurrentIndex(0)
    evaluate.evaluate()
    while evaluate.runner.busy:
        pump(0.2)
    print(f"Evaluate against the support region: {evaluate.results}")
    ok &= "mIoU" in evaluate.results
    viewer.screenshot(args.out, canvas_only=False)
    viewer.close()
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
