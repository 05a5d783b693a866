"""Weight files never execute code; exported heads are checked by SHA-256; nothing touches the network.

* A malicious pickle (its ``__reduce__`` creates a marker folder) fed to every weight reader is refused with a
  ``ValueError`` and the marker never appears; ``torch.load(weights_only=True)`` (the only way a legacy ``.pt``
  may be read) refuses it too. A source scan checks that the package has no other way to unpickle.
* A head whose weights were changed after export (same size, valid safetensors) is refused by its SHA-256.
* ``load_backbone``/``adapt``/``predict`` run with every socket connection attempt raising.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_metahistoseg import pipeline
from napari_metahistoseg.checkpoints import file_sha256, import_head, load_model
from napari_metahistoseg.cli import main
from napari_metahistoseg.config import MAMLConfig
from napari_metahistoseg.data import Sample, save_unified
from napari_metahistoseg.inference import predict

from .conftest import run_gen, support

PACKAGE = Path(pipeline.__file__).resolve().parent


class _Evil:
    """Unpickling this calls ``os.mkdir(marker)``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture
def evil(tmp_path: Path) -> tuple[Path, Path, Path]:
    """``(plain pickle file, torch.save zip file, marker)``."""
    marker = tmp_path / "CODE_RAN"
    plain = tmp_path / "evil.pkl"
    plain.write_bytes(pickle.dumps({"backbone.weight": _Evil(marker)}))
    zipped = tmp_path / "evil.pt"
    torch.save({"backbone.weight": _Evil(marker)}, zipped)
    assert not marker.exists()
    return plain, zipped, marker


def test_pickle_is_really_malicious(evil) -> None:
    plain, _, marker = evil
    pickle.loads(plain.read_bytes())  # what an unsafe reader would do
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_torch_load_weights_only_refuses(evil) -> None:
    plain, zipped, marker = evil
    for path in (plain, zipped):
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path, weights_only=True)
    assert not marker.exists()


def test_every_weight_reader_refuses_a_pickle(tmp_path: Path, evil, tiny_backbone_dir: Path, tiny_backbone,
                                               head_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, zipped, marker = evil
    payload = zipped.read_bytes()
    # a backbone checkpoint whose weights file is the pickle, with a JSON whose SHA-256 matches it
    (tmp_path / "bb.safetensors").write_bytes(payload)
    desc = json.loads(tiny_backbone_dir.with_suffix(".json").read_text())
    (tmp_path / "bb.json").write_text(json.dumps({**desc, "weights_sha256": file_sha256(tmp_path / "bb.safetensors")}))
    with pytest.raises(ValueError, match="bb.safetensors: not a valid safetensors file"):
        load_model(tmp_path / "bb")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        pipeline.load_backbone(str(tmp_path / "bb"))
    data = save_unified([Sample(np.zeros((4, 4, 3), np.uint8), "t", f"s{i}") for i in range(2)], tmp_path / "data")
    assert main(["evaluate", str(data), "--support", "s0", "--backbone", str(tmp_path / "bb")]) == 2
    assert "bb.safetensors: not a valid safetensors file" in capsys.readouterr().err
    # an exported head whose weights file is the pickle, SHA-256 and backbone matching
    w = tmp_path / "h.mhshead.safetensors"
    w.write_bytes(payload)
    hdesc = json.loads(head_dir.with_name("h.mhshead.json").read_text())
    (tmp_path / "h.mhshead.json").write_text(json.dumps({**hdesc, "weights_sha256": file_sha256(w)}))
    with pytest.raises(ValueError, match="h.mhshead.safetensors: not a valid safetensors file"):
        import_head(tmp_path / "h", backbone_sha=tiny_backbone.sha256)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        pipeline.AdaptedHead.load(tmp_path / "h", tiny_backbone)
    # the legacy file names themselves
    for name in ("evil.pt", "evil.pkl"):
        with pytest.raises(ValueError):
            load_model(tmp_path / name)
    capsys.readouterr()
    assert not marker.exists(), "a weight reader executed code from a pickle"


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            base = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            out.append((f"{base}.{name}" if base else name, node))
    return out


def test_package_never_unpickles() -> None:
    """No ``pickle``/``dill``/``joblib`` loads, ``np.load(allow_pickle=True)`` or ``torch.load`` without
    ``weights_only=True`` anywhere in the package."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for name, call in _calls(tree):
            kw = {k.arg: k.value for k in call.keywords}
            where = f"{path.relative_to(PACKAGE.parent)}:{call.lineno} {name}"
            if name in ("pickle.load", "pickle.loads", "dill.load", "dill.loads", "joblib.load", "cloudpickle.load",
                        "pickle.Unpickler", "marshal.loads", "shelve.open"):
                offenders.append(where)
            elif name == "torch.load":
                v = kw.get("weights_only")
                if not (isinstance(v, ast.Constant) and v.value is True):
                    offenders.append(where + " without weights_only=True")
            elif name in ("np.load", "numpy.load"):
                v = kw.get("allow_pickle")
                if isinstance(v, ast.Constant) and v.value is True or v is not None and not isinstance(v, ast.Constant):
                    offenders.append(where + " with allow_pickle")
    assert not offenders, offenders


def _tamper_tensor_byte(path: Path) -> None:
    """Flip one byte inside the tensor data (the file stays a valid safetensors file of the same size)."""
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    raw[8 + n + 5] ^= 0x40
    path.write_bytes(bytes(raw))


def test_tampered_head_refused_by_sha256(tmp_path: Path, head_dir: Path, tiny_backbone) -> None:
    from safetensors.torch import load_file

    for suffix in (".safetensors", ".json"):
        src = head_dir.with_name("h.mhshead" + suffix)
        (tmp_path / src.name).write_bytes(src.read_bytes())
    w = tmp_path / "h.mhshead.safetensors"
    _tamper_tensor_byte(w)
    load_file(str(w))  # still a perfectly valid safetensors file
    with pytest.raises(ValueError, match="h.mhshead.safetensors: SHA-256 does not match h.mhshead.json"):
        pipeline.AdaptedHead.load(tmp_path / "h", tiny_backbone)
    # a head exported by the library carries the hash of its weights
    desc = json.loads(head_dir.with_name("h.mhshead.json").read_text())
    assert desc["weights_sha256"] == file_sha256(head_dir.with_name("h.mhshead.safetensors"))
    assert desc["backbone_sha256"] == tiny_backbone.sha256


def test_tampered_backbone_refused(tmp_path: Path, tiny_backbone_dir: Path) -> None:
    for suffix in (".safetensors", ".json"):
        (tmp_path / f"bb{suffix}").write_bytes(tiny_backbone_dir.with_suffix(suffix).read_bytes())
    _tamper_tensor_byte(tmp_path / "bb.safetensors")
    with pytest.raises(ValueError, match="bb.safetensors: SHA-256 does not match bb.json"):
        load_model(tmp_path / "bb")


def test_no_network_access(tiny_backbone_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[str] = []

    def refuse(name: str):
        def _refuse(*args, **kwargs):
            attempts.append(name)
            raise OSError(f"network access attempted: {name}{args[1:2]}")
        return _refuse

    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    pipeline._BACKBONES.pop(str(tiny_backbone_dir), None)
    bb = pipeline.load_backbone(str(tiny_backbone_dir))  # a real load, not the cached one
    image, labels = support()
    head = run_gen(pipeline.adapt(bb, [image], [labels], ["bg", "cell"], cfg=MAMLConfig(steps=1)))
    pred = run_gen(predict(bb, head, image))
    assert pred.semantic.shape == image.shape[:2] and np.isfinite(pred.probs).all()
    assert attempts == []
