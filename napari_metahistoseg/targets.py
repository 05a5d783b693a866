"""Training targets derived from instance maps (HoVer-Net horizontal/vertical distance maps)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def hv_targets(instances: np.ndarray) -> np.ndarray:
    """HoVer targets ``(2, H, W) float32`` from an ``(H, W)`` instance map (0 = background).

    Channel 0 is the horizontal (column) and channel 1 the vertical (row) distance of each nuclear pixel to
    its nucleus' centre of mass, normalised per nucleus to [-1, 1] separately on the negative and positive
    side (as hover_net's ``gen_instance_hv_map``); 0 outside nuclei.
    """
    inst = np.asarray(instances)
    if inst.ndim != 2:
        raise ValueError(f"instance map must be 2-D (H, W), got shape {inst.shape}")
    out = np.zeros((2,) + inst.shape, np.float32)
    if not inst.any():
        return out
    lab = inst.astype(np.int64, copy=False)
    for k, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None:
            continue
        m = lab[sl] == k
        rr, cc = np.nonzero(m)
        for ch, coord in ((0, cc), (1, rr)):
            d = coord - coord.mean()
            neg, pos = -d[d < 0].min(initial=0.0), d[d > 0].max(initial=0.0)
            d = np.where(d < 0, d / (neg if neg > 0 else 1.0), d / (pos if pos > 0 else 1.0))
            out[ch][sl][m] = d
    return out
