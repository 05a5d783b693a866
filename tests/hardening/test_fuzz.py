"""Fuzzing the readers: mutated image files and mutated checkpoints give a valid result or a ``ValueError``.

Image files (PNG, 16-bit and RGB TIFF, JPEG) get random byte flips (biased towards the headers), insertions,
deletions and truncations; :func:`read_rgb` must return an ``(H, W, 3) uint8`` image or raise ``ValueError``
naming the file, never another exception or a crash. While a mutated file is read the process's address space is
capped (Linux), so a header claiming a gigantic image fails fast as an out-of-memory, which must be reported as a
``ValueError`` too. Checkpoints (backbone and exported head) get mutated safetensors headers and bodies — with the
JSON's SHA-256 updated, so that the safetensors parser and the shape checks are what is exercised — and mutated
or ill-typed JSON descriptions; :func:`load_model`, :func:`import_head` and :meth:`AdaptedHead.load` must load or
raise ``ValueError``. ``MHS_FUZZ_EXAMPLES`` sets the number of examples per test (default 40).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_metahistoseg.checkpoints import file_sha256, import_head, load_model
from napari_metahistoseg.data.io import read_mask, read_rgb

# MHS_FUZZ_EXAMPLES=2000 for a deeper run than CI's
FUZZ = settings(max_examples=int(os.environ.get("MHS_FUZZ_EXAMPLES", "40")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
MEMORY_HEADROOM = 1 << 30  # bytes a fuzzed read may allocate beyond the process's current address space

# ------------------------------------------------------------------------------------------------ mutations

_position = st.floats(0.0, 1.0).map(lambda f: f**3)  # biased towards the start of the file (the headers)
mutations = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), _position, st.integers(0, 255)),
        st.tuples(st.just("insert"), _position, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), _position, st.integers(1, 64)),
        st.tuples(st.just("truncate"), st.floats(0.0, 1.0), st.none()),
    ),
    min_size=1,
    max_size=6,
)


def mutate(raw: bytes, ops: list[tuple], start: int = 0, end: int | None = None) -> bytes:
    """Apply ``ops`` to ``raw``; positions are fractions of the ``[start, end)`` region."""
    b = bytearray(raw)
    for kind, frac, arg in ops:
        lo, hi = start, (len(b) if end is None else min(end, len(b)))
        pos = lo + int(frac * max(hi - lo - 1, 0))
        if kind == "flip" and pos < len(b):
            b[pos] = arg
        elif kind == "insert":
            b[pos:pos] = arg
        elif kind == "delete":
            del b[pos:pos + arg]
        elif kind == "truncate":
            del b[int(frac * len(b)):]
    return bytes(b)


@contextlib.contextmanager
def capped_memory(headroom: int = MEMORY_HEADROOM) -> Iterator[None]:
    """Cap the address space at its current size + ``headroom`` (Linux only; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        yield
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    cap = vm + headroom if hard == resource.RLIM_INFINITY else min(vm + headroom, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="mhs_fuzz_") as d:
        yield Path(d)


# ------------------------------------------------------------------------------------------------ image readers


@FUZZ
@given(kind=st.sampled_from(["png", "tif16", "tif", "jpg"]), ops=mutations)
def test_fuzzed_images_read_or_value_error(valid_images: dict[str, Path], scratch: Path, kind: str, ops) -> None:
    src = valid_images[kind]
    path = scratch / f"fuzzed{src.suffix}"
    path.write_bytes(mutate(src.read_bytes(), ops))
    for reader in (read_rgb, read_mask):
        try:
            with capped_memory():
                out = reader(path)
        except ValueError as e:
            assert str(path) in str(e), e
        else:
            assert isinstance(out, np.ndarray) and out.size > 0
            if reader is read_rgb:
                assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
            else:
                assert out.ndim == 2


def test_capped_memory_turns_a_huge_header_into_value_error(scratch: Path) -> None:
    """A TIFF header claiming a 60000 x 60000 RGB image (10 GB) in a 1 kB file."""
    import tifffile

    path = scratch / "huge.tif"
    tifffile.imwrite(path, np.zeros((8, 8, 3), np.uint8), photometric="rgb")
    raw = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tf:
        tags = tf.pages[0].tags
        for name in ("ImageWidth", "ImageLength", "RowsPerStrip"):
            tag = tags[name]
            fmt = "<I" if tag.dtype == 4 else "<H"
            raw[tag.valueoffset:tag.valueoffset + struct.calcsize(fmt)] = struct.pack(fmt, 60000)
    path.write_bytes(bytes(raw))
    with capped_memory(), pytest.raises(ValueError) as info:
        read_rgb(path)
    assert str(path) in str(info.value)


# ------------------------------------------------------------------------------------------------ checkpoints


def _copy_pair(src_w: Path, src_j: Path, dst_w: Path, dst_j: Path, wbytes: bytes | None = None,
               desc: dict | None = None, fix_sha: bool = True) -> None:
    wbytes = src_w.read_bytes() if wbytes is None else wbytes
    desc = json.loads(src_j.read_text()) if desc is None else desc
    dst_w.write_bytes(wbytes)
    if fix_sha:
        desc = {**desc, "weights_sha256": file_sha256(dst_w)}
    dst_j.write_text(json.dumps(desc))


def _header_end(raw: bytes) -> int:
    return 8 + struct.unpack("<Q", raw[:8])[0]


@FUZZ
@given(ops=mutations, region=st.sampled_from(["header", "body", "anywhere"]))
def test_fuzzed_backbone_weights(tiny_backbone_dir: Path, scratch: Path, ops, region: str) -> None:
    raw = tiny_backbone_dir.with_suffix(".safetensors").read_bytes()
    start, end = {"header": (0, _header_end(raw)), "body": (_header_end(raw), None), "anywhere": (0, None)}[region]
    _copy_pair(tiny_backbone_dir.with_suffix(".safetensors"), tiny_backbone_dir.with_suffix(".json"),
               scratch / "bb.safetensors", scratch / "bb.json", wbytes=mutate(raw, ops, start, end))
    try:
        with capped_memory():
            model, _, _ = load_model(scratch / "bb")
    except ValueError as e:
        assert str(scratch / "bb") in str(e), e
    else:
        assert model is not None


@FUZZ
@given(ops=mutations)
def test_fuzzed_backbone_json_bytes(tiny_backbone_dir: Path, scratch: Path, ops) -> None:
    text = tiny_backbone_dir.with_suffix(".json").read_bytes()
    (scratch / "bb.safetensors").write_bytes(tiny_backbone_dir.with_suffix(".safetensors").read_bytes())
    (scratch / "bb.json").write_bytes(mutate(text, ops))
    try:
        load_model(scratch / "bb")
    except ValueError as e:
        assert str(scratch / "bb") in str(e), e


json_values = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10), st.sampled_from([10**6, 2**40, 10**30, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5), st.lists(st.integers(0, 3), max_size=4),
    st.dictionaries(st.sampled_from(["classes", "x", "steps", "mpp"]), st.integers(0, 3), max_size=2),
)


def _paths(obj, prefix=()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _set(obj, path: tuple, value, delete: bool) -> None:
    for key in path[:-1]:
        obj = obj[key]
    if delete and isinstance(obj, dict):
        del obj[path[-1]]
    else:
        obj[path[-1]] = value


@FUZZ
@given(data=st.data(), value=json_values, delete=st.booleans())
def test_ill_typed_backbone_json_fields(tiny_backbone_dir: Path, scratch: Path, data, value, delete: bool) -> None:
    desc = json.loads(tiny_backbone_dir.with_suffix(".json").read_text())
    path = data.draw(st.sampled_from([p for p in _paths(desc) if p[0] != "weights_sha256"]))
    _set(desc, path, value, delete)
    _copy_pair(tiny_backbone_dir.with_suffix(".safetensors"), tiny_backbone_dir.with_suffix(".json"),
               scratch / "bb.safetensors", scratch / "bb.json", desc=desc)
    try:
        load_model(scratch / "bb")
    except ValueError as e:
        assert str(scratch / "bb") in str(e), e


def _head_files(head_dir: Path) -> tuple[Path, Path]:
    return head_dir.with_name("h.mhshead.safetensors"), head_dir.with_name("h.mhshead.json")


@FUZZ
@given(ops=mutations, region=st.sampled_from(["header", "body"]), data=st.data(), value=json_values,
       delete=st.booleans(), what=st.sampled_from(["weights", "json_bytes", "json_field"]))
def test_fuzzed_heads(head_dir: Path, tiny_backbone, scratch: Path, ops, region, data, value, delete, what) -> None:
    from napari_metahistoseg.pipeline import AdaptedHead

    src_w, src_j = _head_files(head_dir)
    dst_w, dst_j = scratch / "h.mhshead.safetensors", scratch / "h.mhshead.json"
    raw = src_w.read_bytes()
    if what == "weights":
        start, end = (0, _header_end(raw)) if region == "header" else (_header_end(raw), None)
        _copy_pair(src_w, src_j, dst_w, dst_j, wbytes=mutate(raw, ops, start, end))
    elif what == "json_bytes":
        _copy_pair(src_w, src_j, dst_w, dst_j)
        dst_j.write_bytes(mutate(dst_j.read_bytes(), ops))
    else:
        desc = json.loads(src_j.read_text())
        path = data.draw(st.sampled_from([p for p in _paths(desc) if p[0] != "weights_sha256"]))
        _set(desc, path, value, delete)
        _copy_pair(src_w, src_j, dst_w, dst_j, desc=desc)
    for load in (lambda: import_head(scratch / "h"), lambda: AdaptedHead.load(scratch / "h", tiny_backbone)):
        try:
            with capped_memory():
                load()
        except ValueError as e:
            assert str(scratch / "h") in str(e), e
