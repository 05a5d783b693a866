"""``python -m napari_metahistoseg`` runs the ``metahistoseg`` command line."""

from napari_metahistoseg.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
