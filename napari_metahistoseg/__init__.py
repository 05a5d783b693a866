"""napari-metahistoseg: few-shot segmentation for histopathology (core library; the napari plugin lives in _qt)."""

__version__ = "0.1.0"
