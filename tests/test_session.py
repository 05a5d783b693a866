"""Core session store: fingerprints, atomic writes, save/load/list round trips (no Qt)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from napari_metahistoseg.data.task import IGNORE
from napari_metahistoseg.session import SESSIONS_ENV, SessionStore, default_root, image_fingerprint


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)


@pytest.fixture
def store(tmp_path) -> SessionStore:
    return SessionStore(tmp_path / "sessions")


def test_fingerprint_stable_and_sensitive(image):
    fp = image_fingerprint(image)
    assert fp == image_fingerprint(image.copy())
    assert all(c in "0123456789abcdef" for c in fp) and len(fp) == 20
    other = image.copy()
    other[0, 0, 0] ^= 1
    assert image_fingerprint(other) != fp
    assert image_fingerprint(image[:, :79]) != fp  # shape is part of the key


def test_fingerprint_large_image_uses_strided_copy():
    big = np.zeros((3000, 2000), np.uint8)
    fp = image_fingerprint(big)
    big[1, 1] = 7  # off the stride grid: not seen (cheap by design)
    assert image_fingerprint(big) == fp
    big[0, 0] = 7
    assert image_fingerprint(big) != fp


def test_fingerprint_of_numpy_unchanged():
    """Digests computed by the strided-copy code of sessions 1-14: existing sessions must keep their folders."""
    a = (np.arange(300 * 200 * 3) % 251).astype(np.uint8).reshape(300, 200, 3)
    b = (np.arange(40 * 30) * 7 % 65521).astype(np.uint16).reshape(40, 30)
    assert image_fingerprint(a) == "d3c37fe94a81d70dc831"
    assert image_fingerprint(b) == "9db3bf15e522d8b30282"


class ChunkCounter:
    """A lazy (H, W) array with square chunks that records which chunks its reads touch."""

    def __init__(self, data: np.ndarray, chunk: int) -> None:
        self.data, self.chunks, self.shape, self.dtype = data, (chunk, chunk), data.shape, data.dtype
        self.touched: set[tuple[int, int]] = set()
        self.calls = 0

    def __getitem__(self, key):
        self.calls += 1
        rows, cols = (np.arange(self.shape[i])[k] // self.chunks[i] for i, k in enumerate(key))
        self.touched |= {(int(r), int(c)) for r in np.unique(rows) for c in np.unique(cols)}
        return self.data[key]


def test_fingerprint_of_lazy_slide_reads_few_chunks():
    data = np.random.default_rng(1).integers(0, 256, (40 * 64, 40 * 64), dtype=np.uint8)  # 40 x 40 chunks
    lazy = ChunkCounter(data, 64)
    fp = image_fingerprint(lazy)
    assert 0 < len(lazy.touched) <= 16 and lazy.calls <= 16
    assert image_fingerprint(ChunkCounter(data.copy(), 64)) == fp
    r, c = min(lazy.touched)  # a chunk that was hashed: change one of its pixels
    changed = data.copy()
    changed[r * 64, c * 64] ^= 1
    assert image_fingerprint(ChunkCounter(changed, 64)) != fp
    assert image_fingerprint(ChunkCounter(data[:, :-1], 64)) != fp  # shape is part of the key
    # zarr and dask arrays with the same chunks read the same blocks
    zarr, da = pytest.importorskip("zarr"), pytest.importorskip("dask.array")
    z = zarr.create_array(store={}, shape=data.shape, chunks=(64, 64), dtype=data.dtype)
    z[:] = data
    assert image_fingerprint(z) == fp
    assert image_fingerprint(da.from_array(data, chunks=64)) == fp


def test_fingerprint_of_small_lazy_image_matches_numpy():
    """A lazy image whose strided copy reads few chunks keeps the numpy fingerprint (sessions carry over)."""
    data = np.random.default_rng(2).integers(0, 256, (200, 150, 3), dtype=np.uint8)
    lazy = ChunkCounter(data, 64)
    lazy.chunks = (64, 64, 3)
    assert image_fingerprint(lazy) == image_fingerprint(data)
    assert lazy.calls == 1


def test_fingerprint_rejects_empty():
    with pytest.raises(ValueError, match="non-empty"):
        image_fingerprint(np.zeros((0, 4)))


def test_default_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv(SESSIONS_ENV, str(tmp_path / "x"))
    assert default_root() == tmp_path / "x"
    monkeypatch.delenv(SESSIONS_ENV)
    assert default_root().parts[-2:] == (".napari-metahistoseg", "sessions")


def test_support_and_points_round_trip(store, image):
    fp = image_fingerprint(image)
    assert not store.has(fp)
    sup = np.full(image.shape[:2], IGNORE, np.uint8)
    sup[:5] = 0
    sup[10:15, 10:15] = 1
    store.save_support(fp, sup, classes=["background", "nucleus"], colours=["#111111", "#222222"],
                       image_name="img", mpp=0.5)
    store.save_points(fp, np.array([[3.5, 4.25], [20.0, 30.0]]), np.array([1, 0]))
    assert store.has(fp)
    data = store.load(fp)
    np.testing.assert_array_equal(data.support, sup)
    np.testing.assert_allclose(data.points, [[3.5, 4.25], [20.0, 30.0]])
    np.testing.assert_array_equal(data.point_classes, [1, 0])
    assert data.classes == ["background", "nucleus"]
    assert data.meta["mpp"] == 0.5 and data.meta["image_name"] == "img"
    assert set(data.meta["saved"]) == {"support", "points"}
    assert data.head_path is None and not data.empty
    # no temporary files left behind
    assert sorted(p.name for p in data.folder.iterdir()) == ["points.csv", "session.json", "support.png"]


def test_save_overwrites_atomically(store, image, monkeypatch):
    fp = image_fingerprint(image)
    sup = np.full(image.shape[:2], IGNORE, np.uint8)
    sup[0] = 1
    store.save_support(fp, sup)

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        store.save_support(fp, np.zeros_like(sup))
    monkeypatch.undo()
    np.testing.assert_array_equal(store.load(fp).support, sup)  # previous version intact
    assert not [p for p in store.folder(fp).iterdir() if p.name.startswith(".")]


def test_save_head_uses_head_save(store, image):
    fp = image_fingerprint(image)

    class FakeHead:
        classes = ["a", "b"]

        def save(self, path):
            j = path.with_name(path.name + ".mhshead.json")
            w = path.with_name(path.name + ".mhshead.safetensors")
            j.write_text("{}")
            w.write_bytes(b"")
            return w, j

    path = store.save_head(fp, FakeHead())
    assert path.name == "head.mhshead.json"
    assert store.load(fp).head_path == path


def test_bad_inputs(store, image):
    fp = image_fingerprint(image)
    with pytest.raises(ValueError, match="hex"):
        store.folder("../etc")
    with pytest.raises(ValueError, match="integer"):
        store.save_support(fp, np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="points"):
        store.save_points(fp, np.zeros((2, 2)), np.zeros(3))
    with pytest.raises(ValueError, match="no saved session"):
        store.load(fp)


def test_corrupt_session_json_is_named(store, image):
    fp = image_fingerprint(image)
    store.save_support(fp, np.zeros(image.shape[:2], np.uint8))
    (store.folder(fp) / "session.json").write_text("{nope")
    with pytest.raises(ValueError, match="session.json"):
        store.load(fp)
    assert store.list() == []


def test_list_newest_first(store, image):
    a, b = image_fingerprint(image), image_fingerprint(image[::2])
    store.save_support(a, np.zeros(image.shape[:2], np.uint8), image_name="a")
    meta = json.loads((store.folder(a) / "session.json").read_text())
    meta["saved"]["support"] = "2000-01-01T00:00:00+00:00"
    (store.folder(a) / "session.json").write_text(json.dumps(meta))
    store.save_support(b, np.zeros(image[::2].shape[:2], np.uint8), image_name="b")
    assert [m["image_name"] for m in store.list()] == ["b", "a"]
    assert SessionStore(store.root / "missing").list() == []


def test_support_regions_are_saved_apart(store, image):
    fp = image_fingerprint(image)
    a = np.full((8, 6), IGNORE, np.uint8)
    a[2:4] = 1
    b = np.zeros((5, 5), np.uint8)
    store.save_support(fp, a, origin=(100, 40), classes=["bg", "fg"])
    store.save_support(fp, b, origin=(3000, 7))
    store.save_support(fp, a[::-1], origin=(100, 40))  # the same region again: replaced, not added
    store.save_points(fp, np.array([[5000.0, 9000.0]]), [1])  # slide coordinates, beyond every region
    data = store.load(fp)
    assert data.support is None and not data.empty
    got = {o: v for v, o in data.regions}
    assert set(got) == {(100, 40), (3000, 7)}
    assert np.array_equal(got[(100, 40)], a[::-1]) and np.array_equal(got[(3000, 7)], b)
    assert data.points.tolist() == [[5000.0, 9000.0]] and data.classes == ["bg", "fg"]
    with pytest.raises(ValueError, match="non-negative"):
        store.save_support(fp, a, origin=(-1, 0))
    meta_path = store.folder(fp) / "session.json"
    meta = json.loads(meta_path.read_text())
    meta["regions"]["1,2"] = {"file": "../../etc/passwd", "shape": [2, 2]}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="bad support region entry"):
        store.load(fp)
