"""A light live loss curve: a QWidget painting a polyline (no plotting library)."""

from __future__ import annotations

from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QWidget

MARGIN_PX = 6


class LossCurve(QWidget):
    """Loss per adaptation step, rescaled to the widget; the last value is printed in the corner."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.values: list[float] = []
        self.setMinimumHeight(70)
        self.setToolTip("support loss per adaptation step")

    def clear(self) -> None:
        self.values = []
        self.update()

    def add(self, loss: float) -> None:
        self.values.append(float(loss))
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt override
        p = QPainter(self)
        p.fillRect(self.rect(), QColor(30, 30, 30))
        w, h = self.width() - 2 * MARGIN_PX, self.height() - 2 * MARGIN_PX
        p.setPen(QColor(160, 160, 160))
        if not self.values:
            p.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, "loss curve")
            return
        lo, hi = min(self.values), max(self.values)
        span = (hi - lo) or 1.0
        n = max(len(self.values) - 1, 1)
        pts = [QPointF(MARGIN_PX + w * i / n, MARGIN_PX + h * (1 - (v - lo) / span)) for i, v in enumerate(self.values)]
        p.drawText(MARGIN_PX, MARGIN_PX + 10, f"loss {self.values[-1]:.4f} (step {len(self.values)})")
        p.setPen(QPen(QColor(255, 170, 0), 2))
        p.drawPolyline(QPolygonF(pts))
