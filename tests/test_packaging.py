"""Packaging and layering: the napari manifest, the entry points and the core/_qt import boundary."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import napari_metahistoseg

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(napari_metahistoseg.__file__).resolve().parent
MANIFEST = PACKAGE_DIR / "napari.yaml"
GUI_PACKAGES = {"napari", "qtpy", "magicgui", "superqt", "PyQt5", "PyQt6", "PySide2", "PySide6"}
QT_PACKAGE = "napari_metahistoseg._qt"

EXPECTED_WIDGETS = {
    "napari_metahistoseg._qt.annotate:AnnotateWidget": "Annotate support",
    "napari_metahistoseg._qt.adapt:AdaptWidget": "Adapt & predict",
    "napari_metahistoseg._qt.heads:HeadsWidget": "Export / import head",
    "napari_metahistoseg._qt.evaluate:EvaluateWidget": "Evaluate",
    "napari_metahistoseg._qt.train:TrainWidget": "Train backbone",
    "napari_metahistoseg._qt.mitosis:MitosisWidget": "Mitosis classifier",
}
EXPECTED_SAMPLES = {
    "napari_metahistoseg.sample_data:synthetic_he": "Synthetic H&E tile with nuclei",
    "napari_metahistoseg.sample_data:ihc_image": "IHC (scikit-image)",
    "napari_metahistoseg.sample_data:demo_session": "Demo session: strokes ready to Adapt",
}
EXPECTED_READERS = {  # python target -> filename patterns
    "napari_metahistoseg._qt.io:get_reader": ["*.mhshead.json"],
    "napari_metahistoseg._qt.reader:get_reader": ["*.tif", "*.tiff", "*.svs", "*.ome.tif", "*.ome.tiff",
                                                  "*.zarr"],
}


@pytest.fixture(scope="module")
def manifest():
    npe2 = pytest.importorskip("npe2")
    return npe2.PluginManifest.from_file(MANIFEST)


def module_file(module: str) -> Path | None:
    """Source file of a module of this package, found on disk without importing anything."""
    parts = module.split(".")
    assert parts[0] == "napari_metahistoseg", module
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def top_level_names(path: Path) -> set[str]:
    """Names bound at module level (defs, classes, assignments, imports)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


# ------------------------------------------------------------------------------------------------ manifest


def test_top_level_manifest_is_a_relative_symlink() -> None:
    link = REPO / "napari.yaml"
    assert link.is_symlink()
    assert not os.path.isabs(os.readlink(link))
    assert link.resolve() == MANIFEST
    assert link.read_text() == MANIFEST.read_text()


def test_manifest_identity(manifest) -> None:
    assert manifest.name == "napari-metahistoseg"
    assert manifest.display_name == "MetaHistoSeg"


def test_manifest_contributions(manifest) -> None:
    commands = {c.id: c for c in manifest.contributions.commands}
    widgets = {commands[w.command].python_name: w.display_name for w in manifest.contributions.widgets}
    assert widgets == EXPECTED_WIDGETS
    samples = {commands[s.command].python_name: s.display_name for s in manifest.contributions.sample_data}
    assert samples == EXPECTED_SAMPLES
    readers = {commands[r.command].python_name: r.filename_patterns for r in manifest.contributions.readers}
    assert readers == EXPECTED_READERS


def test_manifest_targets_inside_package(manifest) -> None:
    """Every python_name points into this package; the targets already written define the named object."""
    for command in manifest.contributions.commands:
        module, _, attr = command.python_name.partition(":")
        assert module.startswith("napari_metahistoseg.") and attr, command.python_name
        assert command.id.startswith("napari-metahistoseg."), command.id
        path = module_file(module)
        if path is not None:  # not written yet is fine here; `npe2 validate --imports` checks the full set
            assert attr in top_level_names(path), f"{path} defines no {attr!r}"


def test_core_sample_data_module_is_importable_without_qt() -> None:
    """sample_data is core code: where it exists it is found without importing napari."""
    import importlib.util

    if module_file("napari_metahistoseg.sample_data") is None:
        pytest.skip("napari_metahistoseg.sample_data not written yet")
    assert importlib.util.find_spec("napari_metahistoseg.sample_data") is not None


def test_installed_entry_points() -> None:
    try:
        dist = importlib.metadata.distribution("napari-metahistoseg")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("napari-metahistoseg is not installed (pip install -e .)")
    eps = {(ep.group, ep.name): ep.value for ep in dist.entry_points}
    assert eps[("napari.manifest", "napari-metahistoseg")] == "napari_metahistoseg:napari.yaml"
    assert eps[("console_scripts", "metahistoseg")] == "napari_metahistoseg.cli:main"
    assert dist.version == napari_metahistoseg.__version__


def test_npe2_finds_the_installed_manifest(manifest) -> None:
    npe2 = pytest.importorskip("npe2")
    try:
        importlib.metadata.distribution("napari-metahistoseg")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("napari-metahistoseg is not installed (pip install -e .)")
    installed = npe2.PluginManifest.from_distribution("napari-metahistoseg")
    assert installed.name == "napari-metahistoseg"
    assert installed.contributions == manifest.contributions


# ------------------------------------------------------------------------------------------------ layering


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module imported anywhere in ``path`` (relative imports resolved)."""
    rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    package = list(rel.parts[:-1])  # the package a relative import starts from (same for __init__.py)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            found.add(base_name)
            found |= {f"{base_name}.{a.name}" for a in node.names if a.name != "*"}
    return found


def core_files() -> list[Path]:
    qt_dir = PACKAGE_DIR / "_qt"
    return sorted(p for p in PACKAGE_DIR.rglob("*.py") if qt_dir not in p.parents)


def test_core_modules_import_no_gui() -> None:
    files = core_files()
    assert PACKAGE_DIR / "data" / "readers.py" in files
    offenders = []
    for path in files:
        for mod in imported_modules(path):
            if mod.split(".")[0] in GUI_PACKAGES or mod == QT_PACKAGE or mod.startswith(QT_PACKAGE + "."):
                offenders.append(f"{path.relative_to(PACKAGE_DIR.parent)} imports {mod}")
    assert not offenders, "core code must not import napari/Qt/magicgui or _qt:\n" + "\n".join(offenders)


def test_import_scanner_resolves_relative_imports(tmp_path: Path) -> None:
    """The scanner above sees `from .. import _qt` style imports (checked on the cli package's own file)."""
    mods = imported_modules(PACKAGE_DIR / "cli" / "__init__.py")
    assert "napari_metahistoseg.__version__" in mods


def test_lint_imports_contracts_kept() -> None:
    exe = Path(sys.executable).parent / "lint-imports"
    exe = str(exe) if exe.exists() else shutil.which("lint-imports")
    if exe is None:
        pytest.skip("lint-imports (import-linter) is not installed")
    res = subprocess.run([exe, "--no-cache", "--no-logo"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout
