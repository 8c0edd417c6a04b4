"""The package's own ``evaluate`` metrics load by path with the Hub and the network unreachable."""

import socket

import evaluate
import huggingface_hub.constants
import pytest

from peft_talora.metrics import load_metric, metric_path


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 (also in the constants read at import time) and no socket may connect."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_accuracy_loads_offline_and_computes():
    accuracy = load_metric("accuracy")
    assert isinstance(accuracy, evaluate.Metric) and accuracy.name == "accuracy"
    assert accuracy.compute(predictions=[0, 1, 1, 2], references=[0, 1, 0, 1]) == {"accuracy": 0.5}
    assert accuracy.compute(predictions=[0, 1, 1, 2], references=[0, 1, 0, 1], normalize=False) == {"accuracy": 2.0}
    weighted = accuracy.compute(predictions=[0, 1, 1], references=[0, 1, 0], sample_weight=[1, 1, 2])
    assert weighted["accuracy"] == pytest.approx(0.5)
    masked = accuracy.compute(predictions=[5, 7, 9], references=[5, -100, 8], ignore_index=-100)
    assert masked == {"accuracy": 0.5}
    # incremental use, as in an evaluation loop
    accuracy.add_batch(predictions=[1, 1], references=[1, 0])
    accuracy.add_batch(predictions=[2], references=[2])
    assert accuracy.compute()["accuracy"] == pytest.approx(2 / 3)
    assert evaluate.load(metric_path("accuracy")).compute(predictions=[3], references=[3]) == {"accuracy": 1.0}


def test_f1_averages_match_hand_computed_values():
    f1 = load_metric("f1")
    predictions, references = [0, 1, 2, 2, 0, 1], [0, 1, 1, 2, 2, 1]
    # class 0: tp 1, pred 2, true 1 -> 2/3; class 1: tp 2, pred 2, true 3 -> 4/5; class 2: tp 1, pred 2, true 2 -> 1/2
    per_class = [2 / 3, 4 / 5, 1 / 2]
    assert f1.compute(predictions=predictions, references=references, average=None)["f1"] == pytest.approx(per_class)
    macro = f1.compute(predictions=predictions, references=references, average="macro")["f1"]
    assert macro == pytest.approx(sum(per_class) / 3)
    assert f1.compute(predictions=predictions, references=references, average="micro")["f1"] == pytest.approx(4 / 6)
    weighted = (1 * 2 / 3 + 3 * 4 / 5 + 2 * 1 / 2) / 6
    assert f1.compute(predictions=predictions, references=references, average="weighted")["f1"] == pytest.approx(weighted)
    # binary: positive class 1 -> tp 1, pred 2, true 1
    assert f1.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])["f1"] == pytest.approx(2 / 3)
    assert f1.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0], pos_label=0)["f1"] == pytest.approx(0.8)
    # a label that never occurs scores 0 and drags the macro average down
    assert f1.compute(predictions=[0, 1], references=[0, 1], average="macro", labels=[0, 1, 2])["f1"] == pytest.approx(2 / 3)


def test_metric_errors():
    with pytest.raises(ValueError, match=r"average='binary' needs at most 2 classes, found 3"):
        load_metric("f1").compute(predictions=[0, 1, 2], references=[0, 1, 1])
    with pytest.raises(ValueError, match=r"average must be one of"):
        load_metric("f1").compute(predictions=[0], references=[0], average="samples")
    with pytest.raises(ValueError, match=r"Unknown metric 'bleu'; the package ships \['accuracy', 'f1'\]"):
        load_metric("bleu")
