"""Metric modules shipped with the package, loaded by path with ``evaluate`` (the Hub is never used).

from peft_talora.metrics import load_metric
accuracy = load_metric("accuracy")
f1 = load_metric("f1")
f1.compute(predictions=[...], references=[...], average="macro")
"""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent
AVAILABLE = ("accuracy", "f1")


def metric_path(name: str) -> str:
    """Path of the metric script ``name`` shipped in this package."""
    if name not in AVAILABLE:
        raise ValueError(f"Unknown metric {name!r}; the package ships {list(AVAILABLE)}.")
    return str(METRICS_DIR / f"{name}.py")


def load_metric(name: str, **kwargs):
    """``evaluate.load`` of a shipped metric by its file path; ``kwargs`` go to ``evaluate.load``."""
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)


__all__ = ["AVAILABLE", "load_metric", "metric_path"]
