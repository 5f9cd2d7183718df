"""Run logging shared by the trainers: metrics to JSONL and TensorBoard, progress, NaN guard.

Every run directory holds ``metrics.jsonl`` (one JSON object per logged step: ``step``,
``time`` in seconds since the epoch, and the metric values) and TensorBoard event files
(``tensorboardX``), so runs can be compared with plain Python or with ``tensorboard
--logdir``. Metrics are fetched from the device only at log intervals, outside the jitted
step.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import numpy as np

__all__ = ["MetricsWriter", "NonFiniteError", "check_finite", "progress", "set_metrics", "read_metrics"]


class NonFiniteError(RuntimeError):
    """A logged metric (usually the loss) became NaN or infinite."""


def _to_python(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        arr = np.asarray(v)
        if arr.size != 1:
            raise ValueError(f"metric {k!r} must be a scalar, got shape {arr.shape}")
        out[k] = float(arr.reshape(()))
    return out


def check_finite(metrics: Mapping[str, Any], step: int) -> dict[str, float]:
    """Returns ``metrics`` as Python floats; raises ``NonFiniteError`` naming any NaN/inf.

    Args:
      metrics: name -> scalar (device arrays are fetched).
      step: the step the metrics belong to, for the message.
    """
    values = _to_python(metrics)
    bad = sorted(k for k, v in values.items() if not math.isfinite(v))
    if bad:
        raise NonFiniteError(
            f"non-finite metric(s) {bad} at step {step}: "
            + ", ".join(f"{k}={values[k]}" for k in bad)
        )
    return values


class MetricsWriter:
    """Appends scalar metrics to ``<logdir>/metrics.jsonl`` and TensorBoard event files.

    Args:
      logdir: directory (created).
      tensorboard: also write TensorBoard events (``tensorboardX``).
    """

    def __init__(self, logdir: str | os.PathLike, tensorboard: bool = True) -> None:
        self.logdir = os.fspath(logdir)
        os.makedirs(self.logdir, exist_ok=True)
        self._jsonl = open(os.path.join(self.logdir, "metrics.jsonl"), "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: heavy

            self._tb = SummaryWriter(self.logdir)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Writes one record of scalar metrics at ``step``."""
        values = _to_python(metrics)
        record = {"step": int(step), "time": time.time(), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_metrics(logdir: str | os.PathLike) -> list[dict[str, float]]:
    """Reads back the records of ``<logdir>/metrics.jsonl``."""
    path = os.path.join(os.fspath(logdir), "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def progress(total: int, initial: int = 0, desc: str = "", disable: bool | None = None) -> Any:
    """A ``tqdm`` bar over steps; call ``bar.update(n)`` and ``set_metrics(bar, m)``.

    The bar's rate shows steps/s; :func:`set_metrics` puts the loss beside it.

    Args:
      total: the final step.
      initial: the step a resumed run starts from.
      desc: label (e.g. the stage name).
      disable: True hides the bar; None hides it when stderr is not a terminal (tqdm).
    """
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=disable,
                dynamic_ncols=True, mininterval=1.0)


def set_metrics(bar: Any, metrics: Mapping[str, float]) -> None:
    """Shows a few metrics (loss first) after the bar."""
    keys = sorted(metrics, key=lambda k: (k != "loss", k))[:4]
    bar.set_postfix({k: f"{metrics[k]:.4g}" for k in keys}, refresh=False)
