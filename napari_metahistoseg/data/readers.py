"""One reader per data source, looked up by name, with layout auto-detection.

Every reader turns a folder in its source's layout into a :class:`TaskDataset`: a lazy list of sample ids
plus ``load(id) -> Sample`` in the unified format (:mod:`.task`). Register new readers with
:func:`register_reader`; :func:`open_dataset` picks one by name or by :func:`detect_layout`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .task import Sample


@dataclass
class TaskDataset:
    """A data source opened lazily: ``ids`` in a stable order and ``load(id)`` giving a :class:`Sample`."""

    layout: str
    root: Path
    task: str
    class_names: tuple[str, ...]
    ids: list[str]
    loader: Callable[[str], Sample]
    mpp: float | None = None
    kind: str = "segmentation"  # "segmentation" | "points" | "patches"
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, sample_id: str) -> Sample:
        if sample_id not in self.ids:
            raise ValueError(f"{self.root}: no image with id {sample_id!r} (known: {', '.join(self.ids[:8])}...)")
        return self.loader(sample_id)

    def __iter__(self) -> Iterator[Sample]:
        for i in self.ids:
            yield self.loader(i)


@dataclass(frozen=True)
class Reader:
    """A named reader: ``detect(root) -> bool`` recognises the layout, ``open(root, **opts)`` opens it."""

    name: str
    detect: Callable[[Path], bool]
    open: Callable[..., TaskDataset]
    description: str = ""


READERS: dict[str, Reader] = {}


def register_reader(reader: Reader) -> Reader:
    if reader.name in READERS:
        raise ValueError(f"reader {reader.name!r} is already registered")
    READERS[reader.name] = reader
    return reader


def detect_layout(root: str | os.PathLike) -> str:
    """Name of the first registered reader that recognises ``root``; ``ValueError`` if none does."""
    root = Path(root)
    if not root.exists():
        raise ValueError(f"{root}: folder not found")
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    for name, reader in READERS.items():
        try:
            if reader.detect(root):
                return name
        except OSError:
            continue
    raise ValueError(
        f"{root}: layout not recognised; supported layouts: {', '.join(READERS)} (see the README's data section)"
    )


def open_dataset(root: str | os.PathLike, layout: str | None = None, **options) -> TaskDataset:
    """Open ``root`` with the reader named ``layout`` (auto-detected when ``None``)."""
    root = Path(root)
    name = layout or detect_layout(root)
    if name not in READERS:
        raise ValueError(f"unknown layout {name!r}; known: {', '.join(READERS)}")
    if layout is not None:
        if not root.is_dir():
            raise ValueError(f"{root}: folder not found")
        if not READERS[name].detect(root):
            raise ValueError(f"{root}: does not look like a {name!r} folder ({READERS[name].description})")
    ds = READERS[name].open(root, **options)
    if not ds.ids:
        raise ValueError(f"{root}: no images found for layout {name!r}")
    return ds


# --------------------------------------------------------------------------------------------- helpers


def _stems(folder: Path, exts: tuple[str, ...]) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.iterdir() if p.suffix.lower() in exts and not p.name.startswith("."))


def _find(folder: Path, stem: str, exts: tuple[str, ...]) -> Path:
    for e in exts:
        for cand in (folder / f"{stem}{e}", folder / f"{stem}{e.upper()}"):
            if cand.exists():
                return cand
    raise ValueError(f"{folder}: no file for {stem!r} with extension {'/'.join(exts)} (missing file)")


def relabel_sequential(inst: np.ndarray) -> np.ndarray:
    """Instance ids → 1..N (order preserved), as uint32."""
    from skimage.segmentation import relabel_sequential as _rs

    return _rs(inst.astype(np.uint32, copy=False))[0].astype(np.uint32)


IMG_EXTS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


def _semantic_from_instances(inst: np.ndarray) -> np.ndarray:
    return (inst > 0).astype(np.uint8)


# Importing the source modules registers their readers (order = detection priority).
from . import sources, sources_extra  # noqa: E402,F401
