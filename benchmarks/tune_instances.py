"""Sweep of the HoVer marker threshold and Sobel size for the bundled backbone on MoNuSeg DEV tiles (1 support,
2 queries). Run: .venv/bin/python benchmarks/tune_instances.py  (prints mean AJI, PQ, number of nuclei)."""
import numpy as np, dataclasses
from napari_metahistoseg.data import open_dataset
from napari_metahistoseg.pipeline import load_backbone, adapt
from napari_metahistoseg.inference import predict
from napari_metahistoseg.maml import run
from napari_metahistoseg.metrics import aji, panoptic_quality
from napari_metahistoseg.postprocess import HoVerPostProcessor, hv_edge_map
from napari_metahistoseg.config import HoVerPostConfig
ds = open_dataset(str(__import__('pathlib').Path(__file__).resolve().parents[1] / '..' / 'shared' / 'data' / 'monuseg'))
s = ds.load(ds.ids[0]); qs = [ds.load(i) for i in ds.ids[1:3]]
bb = load_backbone()
head = run(adapt(bb, [s.image], [s.semantic], list(ds.class_names), mpp=s.mpp))
preds = [run(predict(bb, head, q.image, mpp=q.mpp, instances=True)) for q in qs]
e = hv_edge_map(preds[0].hv.astype(np.float32), HoVerPostConfig(), qs[0].mpp)
m = preds[0].np_prob > 0.5
print("edge quantiles in mask", np.quantile(e[m], [0.1, 0.5, 0.9]))
for mt in (0.4, 0.55, 0.65, 0.7, 0.75):
  for sob in (5.25, 8.0):
    cfg = HoVerPostConfig(marker_threshold=mt, sobel_kernel_um=sob)
    r = []
    for p, q in zip(preds, qs):
        inst, _ = HoVerPostProcessor(cfg)(p.np_prob.astype(np.float32), p.hv.astype(np.float32), q.mpp)
        r.append((aji(q.instances, inst), panoptic_quality(q.instances, inst)["pq"], inst.max()))
    print(mt, sob, np.round(np.mean(r, 0), 3))
