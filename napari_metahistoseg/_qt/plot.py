"""A light live loss curve: a QWidget painting a polyline (no plotting library)."""

from __future__ import annotations

from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QWidget

MARGIN_PX = 6


class LossCurve(QWidget):
    """A value per step (a loss by default), rescaled to the widget; the last value and its step are printed in the
    corner (``name``: what the value is, e.g. ``"held-apart mIoU"``)."""

    def __init__(self, parent: QWidget | None = None, *, name: str = "loss",
                 colour: tuple[int, int, int] = (255, 170, 0)) -> None:
        super().__init__(parent)
        self.name, self.colour = name, QColor(*colour)
        self.values: list[float] = []
        self.steps: list[int] = []
        self.setMinimumHeight(70)
        self.setToolTip("support loss per adaptation step")

    def clear(self) -> None:
        self.values, self.steps = [], []
        self.update()

    def add(self, value: float, step: int | None = None) -> None:
        """Append ``value``, at ``step`` (default: one after the last)."""
        self.values.append(float(value))
        self.steps.append(int(step) if step is not None else len(self.values))
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt override
        p = QPainter(self)
        p.fillRect(self.rect(), QColor(30, 30, 30))
        w, h = self.width() - 2 * MARGIN_PX, self.height() - 2 * MARGIN_PX
        p.setPen(QColor(160, 160, 160))
        if not self.values:
            p.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, f"{self.name} curve")
            return
        lo, hi = min(self.values), max(self.values)
        span = (hi - lo) or 1.0
        n = max(len(self.values) - 1, 1)
        pts = [QPointF(MARGIN_PX + w * i / n, MARGIN_PX + h * (1 - (v - lo) / span)) for i, v in enumerate(self.values)]
        p.drawText(MARGIN_PX, MARGIN_PX + 10, f"{self.name} {self.values[-1]:.4f} (step {self.steps[-1]})")
        p.setPen(QPen(self.colour, 2))
        p.drawPolyline(QPolygonF(pts))
