"""KeepBestCallback: a few-shot new task ends at its best held-out point, the start (the base model) included."""

import pytest
import torch
from conftest import cpu_training_args, perturb, tiny_model
from datasets import Dataset
from peft import get_peft_model
from talora_text import ids, tiny_tokenizer
from transformers import TrainingArguments

from peft_talora import TALoraConfig
from peft_talora.training import KeepBestCallback, build_trainer, tokenize_for_causal_lm

PROMPTS = [f"question w{i}" for i in range(4)]


def with_new_task(seed=0):
    """A trained (here: perturbed) two-task adapter that gained ``new`` (freeze mode, gate scale ``c = 0``: the
    base model)."""
    torch.manual_seed(seed)
    model = get_peft_model(
        tiny_model(), TALoraConfig(task_type="CAUSAL_LM", task_names=["a", "b"], num_virtual_tokens=4, r=4)
    )
    perturb(model, scale=0.5)  # open gates: with tanh(g) = 0 a new task has no gradient at all
    model.add_tasks(["new"])
    return model


def rows(answer: str, model):
    data = Dataset.from_dict({"prompt": PROMPTS, "completion": [answer] * 4, "task_ids": ["new"] * 4})
    return tokenize_for_causal_lm(data, tiny_tokenizer(), task_names=model, add_eos=False)


def trained(tmp_path, train_answer, eval_answer, lr=0.1, **overrides):
    model, callback = with_new_task(), KeepBestCallback()
    args = dict(learning_rate=lr, max_steps=12, eval_strategy="steps", eval_steps=4, eval_on_start=True)
    trainer = build_trainer(
        model,
        cpu_training_args(TrainingArguments, tmp_path, **{**args, **overrides}),
        train_dataset=rows(train_answer, model),
        eval_dataset=rows(eval_answer, model),
        processing_class=tiny_tokenizer(),
        callbacks=[callback],
    )
    trainer.train()
    return model, trainer, callback


def eval_losses(trainer) -> dict[int, float]:
    return {log["step"]: log["eval_loss"] for log in trainer.state.log_history if "eval_loss" in log}


def test_when_the_start_is_best_training_ends_exactly_at_the_base_model(tmp_path):
    """Judged by the opposite of the training objective (the highest held-out loss is "best"), every step makes
    things worse: the new task ends at its start, the base model, bit for bit."""
    model, trainer, callback = trained(tmp_path, "A", "A", metric_for_best_model="loss", greater_is_better=True)
    curve = eval_losses(trainer)
    assert sorted(curve) == [0, 4, 8, 12] and max(curve.values()) == curve[0] > curve[12]  # training moved it
    assert callback.best_step == 0 and callback.best_metric == curve[0]
    input_ids = torch.tensor([ids(*p.split()) for p in PROMPTS])
    with torch.no_grad():
        adapted = model(input_ids=input_ids, task_ids=["new"] * 4).logits
        with model.disable_adapter():
            base = model(input_ids=input_ids).logits
    assert torch.equal(adapted, base)


def test_training_that_helps_ends_at_the_best_evaluation_and_scores_its_loss_again(tmp_path):
    model, trainer, callback = trained(tmp_path, train_answer="A", eval_answer="A", lr=0.2)
    curve = eval_losses(trainer)
    best_step = min(curve, key=lambda step: (curve[step], step))
    assert 0 < best_step < 12 and callback.best_step == best_step  # neither the start nor the last step
    assert callback.history == curve
    assert trainer.evaluate()["eval_loss"] == pytest.approx(curve[best_step], rel=1e-6)  # the restored weights


def speed(split: str) -> dict:
    """Trainer's own speed metrics of an evaluation under ``split`` ("eval", "eval_<dataset>")."""
    return {f"{split}_runtime": 1.0, f"{split}_samples_per_second": 9.0}


def test_greater_is_better_metrics_and_a_missing_metric(tmp_path):
    callback = KeepBestCallback()
    args = cpu_training_args(TrainingArguments, tmp_path, metric_for_best_model="accuracy", greater_is_better=True)
    model = torch.nn.Linear(2, 1)

    class State:
        global_step = 0

    callback.on_evaluate(args, State, None, metrics={"eval_accuracy": 0.5}, model=model)
    State.global_step = 4
    callback.on_evaluate(args, State, None, metrics={"eval_accuracy": 0.7}, model=model)
    State.global_step = 8
    callback.on_evaluate(args, State, None, metrics={"eval_accuracy": 0.6}, model=model)
    assert (callback.best_step, callback.best_metric) == (4, 0.7)
    with pytest.raises(KeyError, match="needs 'eval_accuracy' in the evaluation metrics, which hold \\['eval_loss'\\]"):
        callback.on_evaluate(args, State, None, metrics={"eval_loss": 1.0}, model=model)


def test_evaluations_of_another_split_are_left_alone_and_a_second_restore_is_warned_about(tmp_path):
    """A test set evaluated after training (prefix "test") and the other datasets of a dict eval_dataset do not
    stop training; the evaluation under the metric's own prefix still must carry it. load_best_model_at_end=True
    beside the callback is warned about (the callback's choice replaces Trainer's)."""
    model, trainer, callback = trained(tmp_path, "A", "A")
    history = dict(callback.history)
    metrics = trainer.evaluate(trainer.eval_dataset, metric_key_prefix="test")  # not a KeyError
    assert "test_loss" in metrics and callback.history == history == eval_losses(trainer)

    callback = KeepBestCallback()
    args = cpu_training_args(TrainingArguments, tmp_path, metric_for_best_model="eval_a_loss")
    linear = torch.nn.Linear(2, 1)

    class State:
        global_step = 4

    callback.on_evaluate(args, State, None, metrics={"eval_b_loss": 0.1, **speed("eval_b")}, model=linear)
    assert callback.history == {}  # dataset b: not the metric's
    callback.on_evaluate(args, State, None, metrics={"eval_a_loss": 0.5, **speed("eval_a")}, model=linear)
    assert callback.history == {4: 0.5}
    prefixed = KeepBestCallback()  # dataset "a" beside "a_b": eval_a_loss is not eval_a_b_loss
    args_ab = cpu_training_args(TrainingArguments, tmp_path, metric_for_best_model="eval_a_b_loss")
    prefixed.on_evaluate(args_ab, State, None, metrics={"eval_a_loss": 0.2, **speed("eval_a")}, model=linear)
    prefixed.on_evaluate(args_ab, State, None, metrics={"eval_a_b_loss": 0.3, **speed("eval_a_b")}, model=linear)
    assert prefixed.history == {4: 0.3}
    with pytest.raises(KeyError, match="needs 'eval_a_loss'"):
        callback.on_evaluate(args, State, None, metrics={"eval_a_accuracy": 0.5, **speed("eval_a")}, model=linear)
    timed = KeepBestCallback()  # a compute_metrics key ending in "_runtime" comes first and names no split
    timed.on_evaluate(
        args, State, None, metrics={"eval_generation_runtime": 3.0, "eval_a_loss": 0.4, **speed("eval")}, model=linear
    )
    assert timed.history == {4: 0.4}
    with pytest.warns(UserWarning, match="load_best_model_at_end=True both restore a best point"):
        trained(tmp_path / "both", "A", "A", load_best_model_at_end=True, save_strategy="steps", save_steps=4)


def test_a_margin_keeps_the_best_unless_a_later_point_beats_it_by_more(tmp_path):
    """``min_improvement``: a lower loss replaces the best only when it is lower by more than the margin."""
    args = cpu_training_args(TrainingArguments, tmp_path)
    model = torch.nn.Linear(2, 1)
    curve = {0: 1.0, 4: 0.8, 8: 0.75, 12: 0.9}

    class State:
        global_step = 0

    def best(margin):
        callback = KeepBestCallback(min_improvement=margin)
        for State.global_step, loss in curve.items():
            callback.on_evaluate(args, State, None, metrics={"eval_loss": loss}, model=model)
        return callback.best_step, callback.best_metric

    assert best(0.0) == (8, 0.75)
    assert best(0.1) == (4, 0.8)  # 0.75 is within 0.1 of 0.8: the shorter-trained point stays
    assert best(0.3) == (0, 1.0)  # nothing beats the start by more than 0.3: the start (the base model) is kept
    with pytest.raises(ValueError, match="must be >= 0, got -0.1"):
        KeepBestCallback(min_improvement=-0.1)
