"""Sweep of the point-detection peak settings on BM-Graz DEV images (1 support image, 3 queries).
Run: .venv/bin/python benchmarks/tune_detection.py  (prints sigma, min distance, threshold, F1, precision, recall)."""
import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from napari_metahistoseg.data import open_dataset
from napari_metahistoseg.pipeline import load_backbone, adapt
from napari_metahistoseg.inference import predict
from napari_metahistoseg.maml import run
from napari_metahistoseg.metrics import detection_scores
ds = open_dataset(str(__import__('pathlib').Path(__file__).resolve().parents[1] / '..' / 'shared' / 'data' / 'bm_graz_cells'))
s = ds.load(ds.ids[0]); qs = [ds.load(i) for i in ds.ids[1:]]
bb = load_backbone()
head = run(adapt(bb, [s.image], [s.semantic], list(ds.class_names), mpp=s.mpp))
probs = [run(predict(bb, head, q.image, mpp=q.mpp)).probs[1] for q in qs]
for sig in (1, 2, 3, 4):
  for md in (9, 12, 15, 18):
    for th in (0.5, 0.6, 0.7):
        tp=fp=fn=0
        for p, q in zip(probs, qs):
            sm = ndi.gaussian_filter(p.astype(np.float32), sig)
            pts = peak_local_max(sm, min_distance=md, threshold_abs=th, exclude_border=False)
            d = detection_scores(pts.astype(float), q.points, 12.0)
            tp+=d["tp"]; fp+=d["fp"]; fn+=d["fn"]
        P=tp/max(tp+fp,1); R=tp/max(tp+fn,1); print(sig, md, th, round(2*P*R/max(P+R,1e-9),3), round(P,3), round(R,3))
