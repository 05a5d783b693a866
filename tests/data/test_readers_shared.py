"""Every folder of the shared development data opens with the right reader and holds what its SOURCE.md states."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from napari_metahistoseg.data import IGNORE, READERS, detect_layout, open_dataset

LAYOUTS = {
    "amibr_mitosis": "amibr_mitosis",
    "bm_graz_cells": "bm_graz_cells",
    "consep_tiles": "consep_tiles",
    "cpm15": "cpm15",
    "glas": "glas",
    "monuseg": "monuseg",
}

MONUSEG_INSTANCES = {  # SOURCE.md: polygons in XML = instances in mask
    "TCGA-21-5784-01Z-00-DX1": 398,
    "TCGA-A7-A13E-01Z-00-DX1": 314,
    "TCGA-B0-5698-01Z-00-DX1": 357,
    "TCGA-CH-5767-01Z-00-DX1": 294,
    "TCGA-NH-A8F7-01A-01-TS1": 363,
}

CPM15_TABLE = {  # SOURCE.md: image -> (magnification, (H, W), nuclei)
    "image01": (20, (488, 643), 351),
    "image02": (20, (490, 488), 127),
    "image03": (20, (587, 751), 256),
    "image05": (20, (493, 623), 144),
    "image06": (20, (392, 459), 255),
    "image08": (40, (596, 798), 251),
    "image09": (40, (888, 801), 97),
    "image10": (40, (808, 1032), 218),
    "image11": (40, (696, 677), 68),
    "image13": (40, (589, 641), 93),
}

GRAZ_POINTS = {"BM_GRAZ_HE_0001_01": 356, "BM_GRAZ_HE_0001_02": 452, "BM_GRAZ_HE_0002_01": 419,
               "BM_GRAZ_HE_0003_01": 412}


def n_ids(instances: np.ndarray) -> int:
    """Number of distinct non-zero instance ids."""
    return int(np.count_nonzero(np.unique(instances)))


def test_every_shared_folder_is_recognised(shared_data: Path) -> None:
    folders = sorted(p.name for p in shared_data.iterdir() if p.is_dir())
    assert folders, f"{shared_data} has no data folders"
    for name in folders:
        assert detect_layout(shared_data / name) in READERS, name


@pytest.mark.parametrize("folder, layout", sorted(LAYOUTS.items()))
def test_layout_detection(shared_data: Path, folder: str, layout: str) -> None:
    assert detect_layout(shared_data / folder) == layout
    ds = open_dataset(shared_data / folder)
    assert ds.layout == layout
    assert ds.ids == sorted(ds.ids)


def test_monuseg(shared_data: Path) -> None:
    ds = open_dataset(shared_data / "monuseg")
    assert (ds.task, ds.kind, ds.class_names) == ("monuseg", "segmentation", ("background", "nucleus"))
    assert ds.ids == sorted(MONUSEG_INSTANCES)
    for s in ds:
        assert s.shape == (1000, 1000)
        assert n_ids(s.instances) == MONUSEG_INSTANCES[s.sample_id]
        assert int(s.instances.max()) == MONUSEG_INSTANCES[s.sample_id]  # relabelled 1..N
        np.testing.assert_array_equal(s.semantic, (s.instances > 0).astype(np.uint8))
        assert s.mpp is not None and 0.24 < s.mpp < 0.26  # from the XML's MicronsPerPixel


def test_monuseg_png_masks_match_xml(shared_data: Path) -> None:
    """The shipped instance_masks were rasterised from the XML the same way the reader does it."""
    sid = "TCGA-CH-5767-01Z-00-DX1"
    from_xml = open_dataset(shared_data / "monuseg").load(sid)
    from_png = open_dataset(shared_data / "monuseg", use_xml=False).load(sid)
    np.testing.assert_array_equal(from_xml.instances, from_png.instances)


def test_cpm15(shared_data: Path) -> None:
    ds = open_dataset(shared_data / "cpm15")
    assert (ds.task, ds.kind) == ("cpm15", "segmentation")
    assert ds.ids == sorted(CPM15_TABLE)
    for s in ds:
        mag, shape, nuclei = CPM15_TABLE[s.sample_id]
        assert s.shape == shape, s.sample_id
        assert n_ids(s.instances) == nuclei, s.sample_id
        assert s.mpp == (0.5 if mag == 20 else 0.25)


def test_consep(shared_data: Path) -> None:
    ds = open_dataset(shared_data / "consep_tiles")
    assert (ds.task, ds.kind, len(ds.class_names)) == ("consep", "segmentation", 5)
    assert len(ds) == 432
    total = 0
    types = np.zeros(len(ds.class_names), np.int64)
    for s in ds:
        assert s.shape == (256, 256)
        total += n_ids(s.instances)
        # majority type under each instance (SOURCE.md: equals inst_type of the .mat, 0 mismatches)
        inst = s.instances.astype(np.int64)
        fg = inst > 0
        counts = np.zeros((int(inst.max()) + 1, len(ds.class_names)), np.int64)
        np.add.at(counts, (inst[fg], s.semantic[fg]), 1)
        present = counts.sum(axis=1) > 0
        types += np.bincount(counts[present].argmax(axis=1), minlength=len(ds.class_names))
        assert not np.any(s.semantic[~fg])  # type 0 = background outside nuclei
    assert total == 18216
    assert types.tolist() == [0, 432, 4507, 6609, 6668]  # SOURCE.md "Instance types"


def test_glas(shared_data: Path) -> None:
    ds = open_dataset(shared_data / "glas")
    assert (ds.task, ds.kind, ds.class_names) == ("glas", "segmentation", ("background", "gland"))
    assert len(ds) == 32
    with open(shared_data / "glas" / "Grade.csv", newline="") as f:
        patients = {r["name"]: r["patient_id"] for r in csv.DictReader(f)}
    per_patient: dict[str, int] = {}
    for s in ds:
        assert s.shape == (522, 775)
        assert set(np.unique(s.semantic)) <= {0, 1}
        assert s.semantic.any() and n_ids(s.instances) >= 1
        assert s.meta["grade"]["grade_glas"] in ("benign", "malignant")
        per_patient[patients[s.sample_id]] = per_patient.get(patients[s.sample_id], 0) + 1
    assert per_patient == {p: 4 for p in ("1", "2", "3", "4", "7", "9", "10", "11")}  # SOURCE.md split


def test_bm_graz(shared_data: Path) -> None:
    from skimage import io as skio

    ds = open_dataset(shared_data / "bm_graz_cells")
    assert (ds.task, ds.kind) == ("bm_graz_cells", "points")
    assert ds.ids == sorted(GRAZ_POINTS)
    for s in ds:
        assert s.shape == (1200, 1200)
        assert len(s.points) == GRAZ_POINTS[s.sample_id]
        # the dot masks mark the same pixels: checks the x/y -> (row, col) swap
        dots = np.argwhere(skio.imread(shared_data / "bm_graz_cells" / "dot_masks" / f"{s.sample_id}.png") > 0)
        assert {tuple(p) for p in np.rint(s.points).astype(int)} == {tuple(p) for p in dots}
        # exhaustively annotated: circles around the points, background elsewhere, nothing unknown
        assert set(np.unique(s.semantic)) <= {0, 1} and IGNORE not in s.semantic
        assert n_ids(s.instances) == len(s.points)


def test_amibr(shared_data: Path) -> None:
    ds = open_dataset(shared_data / "amibr_mitosis")
    assert (ds.task, ds.kind, ds.class_names) == ("amibr_mitosis", "patches", ("normal", "atypical"))
    assert len(ds) == 513
    with open(shared_data / "amibr_mitosis" / "labels.csv", newline="") as f:
        majority = {Path(r["patch"]).stem: r["majority_atypical"] == "True" for r in csv.DictReader(f)}
    labels, unanimous = [], 0
    for s in ds:
        assert s.shape == (128, 128)
        assert s.patch_label == int(majority[s.sample_id])
        assert len(s.meta["votes"]) == 3
        labels.append(s.patch_label)
        unanimous += s.meta["agreement"] == 1.0
    assert np.bincount(labels).tolist() == [401, 112]
    assert unanimous == 416
