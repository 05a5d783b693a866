"""Run the core generators in napari's ``thread_worker``: progress bar + ETA label, cancel, clear errors.

The core generators yield progress dicts (``stage`` with ``step``/``steps`` or ``done``/``total``, ``loss``,
``eta_s``) and return their result; :class:`JobRunner` connects ``yielded`` to the progress widgets (and to the
caller's handler), ``returned`` to the caller, ``errored`` to an error notification, and ``Cancel`` to
``worker.quit()`` (honoured at the next yield). Only one job runs at a time per runner.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from typing import Any

from napari.qt.threading import GeneratorWorker, create_worker
from napari.utils.notifications import show_error
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QLabel, QProgressBar

log = logging.getLogger(__name__)

STAGE_NAMES = {"backbone": "loading backbone", "features": "support features", "adapt": "adapting",
               "predict": "predicting", "instances": "nuclei (HoVer)", "objects": "gland / object instances",
               "preview": "visible field shown", "tables": "reading tables", "evaluate": "evaluating",
               "fov": "visible field", "mitosis": "mitosis candidates", "adapted": "head adapted",
               "supervised": "training (supervised)", "meta": "meta-training (MAML)",
               "validation": "validating (held-apart images)"}


def describe(p: dict) -> tuple[int, int, str]:
    """``(value, maximum, text)`` for a progress dict (maximum 0 = busy indicator)."""
    stage = str(p.get("stage", ""))
    name = STAGE_NAMES.get(stage, stage)
    if "step" in p and "steps" in p:
        done, total = int(p["step"]), int(p["steps"])
    elif "done" in p and "total" in p:
        done, total = int(p["done"]), int(p["total"])
    else:
        return 0, 0, name
    text = f"{name} {done}/{total}"
    if p.get("loss") is not None:
        text += f" · loss {float(p['loss']):.4f}"
    if p.get("eta_s") is not None and done < total:
        text += f" · ETA {float(p['eta_s']):.0f} s"
    return done, max(total, 1), text


def error_text(what: str, exc: BaseException) -> str:
    """One clear line for an error notification (ValueErrors already name the file and the problem)."""
    msg = str(exc) or type(exc).__name__
    return f"{what} failed: {msg}" if isinstance(exc, ValueError) else f"{what} failed: {type(exc).__name__}: {msg}"


class JobRunner(QObject):
    """One generator job at a time on a worker thread, reported on ``bar`` and ``label``."""

    started = Signal()
    stopped = Signal(str)  # "returned", "aborted" or "errored"

    def __init__(self, bar: QProgressBar, label: QLabel, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.bar, self.label = bar, label
        self.worker: GeneratorWorker | None = None

    @property
    def busy(self) -> bool:
        return self.worker is not None

    def run(self, what: str, job: Callable[..., Generator[dict, None, Any]], *args: Any,
            on_yield: Callable[[dict], None] | None = None, on_return: Callable[[Any], None] | None = None,
            on_stop: Callable[[str], None] | None = None, **kwargs: Any) -> GeneratorWorker:
        """Start ``job(*args, **kwargs)``; ``on_stop(outcome)`` runs after returned/aborted/errored."""
        if self.worker is not None:
            raise RuntimeError("a job is already running: cancel it first")
        worker = create_worker(job, *args, _start_thread=False, _ignore_errors=True, **kwargs)
        outcome = {"v": "aborted"}

        def yielded(p: dict) -> None:
            value, maximum, text = describe(p)
            self.bar.setMaximum(maximum)
            self.bar.setValue(value)
            self.label.setText(text)
            if on_yield is not None:
                on_yield(p)

        def returned(result: Any) -> None:
            if worker.abort_requested:  # Cancel pressed after the last yield: still nothing is shown
                return
            outcome["v"] = "returned"
            if on_return is not None:
                try:
                    on_return(result)
                except Exception as e:  # noqa: BLE001 - showing the result must never crash napari
                    outcome["v"] = "errored"
                    log.exception("showing the result of %s failed", what)
                    show_error(error_text(what, e))

        def errored(exc: BaseException) -> None:
            outcome["v"] = "errored"
            log.error("%s failed", what, exc_info=exc)
            show_error(error_text(what, exc))

        def finished() -> None:
            self.worker = None
            self.bar.setMaximum(1)
            self.bar.setValue(1 if outcome["v"] == "returned" else 0)
            self.label.setText({"returned": f"{what}: done", "aborted": f"{what}: cancelled",
                                "errored": f"{what}: failed (see notification)"}[outcome["v"]])
            if on_stop is not None:
                on_stop(outcome["v"])
            self.stopped.emit(outcome["v"])

        worker.yielded.connect(yielded)
        worker.returned.connect(returned)
        worker.errored.connect(errored)
        worker.finished.connect(finished)
        self.worker = worker
        self.bar.setMaximum(0)
        self.label.setText(f"{what}…")
        worker.start()
        self.started.emit()
        return worker

    def guarded(self, what: str, start: Callable[[], Any]) -> Any:
        """``start()`` unless a job is running; a ValueError from it becomes an error notification (→ None)."""
        if self.busy:
            show_error(f"{what}: a run is in progress; cancel it first")
            return None
        try:
            return start()
        except ValueError as e:
            show_error(error_text(what, e))
            return None

    def cancel(self) -> None:
        """Ask the running job to stop at its next yield (nothing is added to the viewer)."""
        if self.worker is not None:
            self.label.setText("cancelling…")
            self.worker.quit()
