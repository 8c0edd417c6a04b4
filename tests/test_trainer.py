"""TA-LoRA with the real ``transformers.Trainer`` (default ``remove_unused_columns=True``), on CPU.

Routing proof: two tasks share every input and differ only in the answer, so both can be right
only if the task id reaches the adapter through Trainer.
"""

import inspect
import math
import re

import pytest
import torch
from conftest import cpu_training_args, perturb, tiny_model
from datasets import Dataset
from peft import LoraConfig, MultitaskPromptTuningConfig, get_peft_model
from talora_text import ids, tiny_tokenizer
from torch.utils.data import RandomSampler
from transformers import Trainer, TrainerCallback, TrainingArguments

from peft_talora import TALoraConfig
from peft_talora.metrics import load_metric
from peft_talora.training import MultiTaskSampler, MultiTaskTrainer, build_trainer
from peft_talora.training.collator import MultiTaskDataCollator, tokenize_for_causal_lm
from peft_talora.training.trainer import _next_token_entropies

TASKS = ["first", "second"]
ANSWERS = ["A", "B"]  # same prompts, task 0 answers A, task 1 answers B
PROMPTS = [f"question w{i}" for i in range(4)]


def talora(seed=0):
    torch.manual_seed(seed)  # the adapter's initialisation; the base model is always tiny_model(seed=0)
    return get_peft_model(
        tiny_model(), TALoraConfig(task_type="CAUSAL_LM", task_names=TASKS, num_virtual_tokens=4, r=4)
    )


def raw(task_as_names: bool) -> Dataset:
    rows = [(p, ANSWERS[t], TASKS[t] if task_as_names else t) for t in range(2) for p in PROMPTS]
    return Dataset.from_dict({k: list(v) for k, v in zip(("prompt", "completion", "task_ids"), zip(*rows))})


def arguments(tmp_path, **overrides):
    defaults = dict(learning_rate=0.05, per_device_eval_batch_size=8, max_steps=30)
    return cpu_training_args(TrainingArguments, tmp_path, **{**defaults, **overrides})


def adapter_state(model):
    bank = model.base_model.talora_banks[model.active_adapter]
    return {k: v.detach().clone() for k, v in bank.state_dict().items()}


def losses(trainer):
    return {log["step"]: log["loss"] for log in trainer.state.log_history if "loss" in log}


def token_accuracy(eval_pred):
    """Next-token accuracy on the target tokens, with the package's local accuracy metric."""
    predictions, labels = eval_pred.predictions[:, :-1], eval_pred.label_ids[:, 1:]
    mask = labels != -100
    return load_metric("accuracy").compute(predictions=predictions[mask], references=labels[mask])


def greedy_next_token(model, task):
    model.eval()
    with torch.no_grad():
        input_ids = torch.tensor([ids(*p.split()) for p in PROMPTS])
        return model(input_ids=input_ids, task_ids=[task] * len(PROMPTS)).logits[:, -1].argmax(-1).tolist()


def test_trainer_keeps_the_task_ids_column(tmp_path):
    model = talora()
    assert "task_ids" in inspect.signature(model.get_base_model().forward).parameters
    data = tokenize_for_causal_lm(raw(True), tiny_tokenizer(), task_names=model, remove_columns=False)
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=data)
    assert trainer.args.remove_unused_columns is True
    kept = trainer._remove_unused_columns(data)
    assert sorted(kept.column_names) == ["attention_mask", "input_ids", "labels", "task_ids"]
    batch = next(iter(trainer.get_train_dataloader()))
    assert sorted(batch["task_ids"].tolist()) == [0] * 4 + [1] * 4


@pytest.mark.parametrize("task_as_names", [False, True], ids=["int-ids+default-collator", "names+talora-collator"])
def test_trainer_learns_two_tasks_with_identical_inputs(tmp_path, task_as_names):
    model, tokenizer = talora(), tiny_tokenizer()
    if task_as_names:
        # the names column reaches the collator untouched (Trainer keeps `task_ids`, drops the text columns)
        data = tokenize_for_causal_lm(raw(True), tokenizer, task_column=None, remove_columns=False, add_eos=False)
        assert data["task_ids"][:4] == ["first"] * 4
        collator = MultiTaskDataCollator(tokenizer=tokenizer, task_names=model)
    else:
        data = tokenize_for_causal_lm(raw(False), tokenizer, padding="longest", add_eos=False)
        collator = None  # transformers' default_data_collator
    before = greedy_next_token(model, 0)
    assert before == greedy_next_token(model, 1)  # identical inputs: untrained tasks cannot differ
    trainer = Trainer(
        model=model,
        args=arguments(tmp_path, learning_rate=0.2, max_steps=20),
        train_dataset=data,
        eval_dataset=data,
        data_collator=collator,
        compute_metrics=token_accuracy,
        preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1),
    )
    assert trainer.evaluate()["eval_accuracy"] <= 0.5  # one prediction per prompt: right for one task at most
    trainer.train()
    assert greedy_next_token(model, 0) == ids("A") * len(PROMPTS)
    assert greedy_next_token(model, "second") == ids("B") * len(PROMPTS)
    metrics = trainer.evaluate()
    assert metrics["eval_accuracy"] == 1.0  # the answers of all 8 examples (4 prompts x 2 tasks)
    logged = losses(trainer)
    assert logged[20] < logged[1] and math.isfinite(metrics["eval_loss"])


class StopAt(TrainerCallback):
    """Simulates an interrupted run: stop after ``step`` optimizer steps (a checkpoint is saved there)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_from_checkpoint_continues_the_same_loss_curve(tmp_path):
    n = 3  # 8 examples, batch 4: the checkpoint falls in the middle of the second epoch
    data = tokenize_for_causal_lm(raw(False), tiny_tokenizer(), padding="longest")

    def trainer(model, folder, callbacks=()):
        args = arguments(
            tmp_path / folder, max_steps=2 * n, per_device_train_batch_size=4, save_strategy="steps", save_steps=n
        )
        return Trainer(model=model, args=args, train_dataset=data, callbacks=list(callbacks))

    whole = trainer(talora(), "whole")
    whole.train()
    interrupted = trainer(talora(), "interrupted", [StopAt(n)])
    interrupted.train()
    assert interrupted.state.global_step == n and (tmp_path / "interrupted" / f"checkpoint-{n}").is_dir()

    fresh = talora(seed=123)  # different initial adapter: everything must come from the checkpoint
    assert not torch.equal(adapter_state(fresh)["shared_prompt"], adapter_state(whole.model)["shared_prompt"])
    resumed = trainer(fresh, "interrupted")
    resumed.train(resume_from_checkpoint=str(tmp_path / "interrupted" / f"checkpoint-{n}"))

    expected, got = losses(whole), losses(resumed)  # the resumed history starts with the checkpoint's steps 1..n
    assert sorted(got) == sorted(expected) == list(range(1, 2 * n + 1))
    assert [got[s] for s in range(n + 1, 2 * n + 1)] == pytest.approx(
        [expected[s] for s in range(n + 1, 2 * n + 1)], rel=1e-5
    )
    assert [losses(interrupted)[s] for s in range(1, n + 1)] == pytest.approx(
        [expected[s] for s in range(1, n + 1)], rel=1e-6
    )
    final, reference = adapter_state(resumed.model), adapter_state(whole.model)
    for key in reference:
        torch.testing.assert_close(final[key], reference[key], rtol=1e-5, atol=1e-6)


def train_briefly(tmp_path, steps=8, **overrides):
    """Train a fresh adapter ``steps`` steps; returns the trainer, the adapter before, and what hooks saw."""
    model = talora()
    start = adapter_state(model)
    base = model.get_base_model()
    seen = {"mlp_calls": 0, "logits_dtypes": set()}
    mlp = base.model.layers[0].mlp
    mlp_forward = mlp.forward

    def counting_forward(*args, **kwargs):  # module hooks do not fire on checkpoint recomputation; this does
        seen["mlp_calls"] += 1
        return mlp_forward(*args, **kwargs)

    mlp.forward = counting_forward
    base.lm_head.register_forward_hook(lambda module, args, out: seen["logits_dtypes"].add(out.dtype))
    data = tokenize_for_causal_lm(raw(False), tiny_tokenizer(), padding="longest")
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=steps, **overrides), train_dataset=data)
    trainer.train()
    return trainer, start, seen


@pytest.mark.parametrize(
    "overrides, mlp_calls, logits_dtype",
    [
        ({}, 8, torch.float32),
        ({"bf16": True}, 8, torch.bfloat16),
        ({"gradient_checkpointing": True}, 16, torch.float32),
    ],
    ids=["fp32", "bf16-autocast", "gradient-checkpointing"],
)
def test_precision_and_memory_modes_train(tmp_path, overrides, mlp_calls, logits_dtype):
    base = {k: v.clone() for k, v in tiny_model().state_dict().items()}
    trainer, start, seen = train_briefly(tmp_path, **overrides)
    # the mode is really on: autocast computes in bf16; checkpointing recomputes every layer in backward
    assert seen["logits_dtypes"] == {logits_dtype} and seen["mlp_calls"] == mlp_calls
    logged = losses(trainer)
    assert len(logged) == 8 and all(math.isfinite(v) for v in logged.values())
    assert logged[8] < logged[1]
    model = trainer.model
    end = adapter_state(model)
    assert torch.equal(end.pop("task_gate_blocks.0"), torch.ones_like(start.pop("task_gate_blocks.0")))  # fixed
    for key in start:  # every other adapter tensor (prompt, basis, u, v, gate) was trained, and stays float32
        assert not torch.equal(start[key], end[key]), f"{key} did not change"
        assert end[key].dtype == torch.float32
    for key, value in model.get_base_model().state_dict().items():
        if "talora" not in key:
            assert torch.equal(value, base[key]), f"frozen base weight {key} changed"


def test_gradient_checkpointing_gives_the_same_training_as_without(tmp_path):
    plain, _, _ = train_briefly(tmp_path / "plain", steps=5)
    checkpointed, _, _ = train_briefly(tmp_path / "checkpointed", steps=5, gradient_checkpointing=True)
    assert list(losses(checkpointed).values()) == pytest.approx(list(losses(plain).values()), rel=1e-6)
    reference, got = adapter_state(plain.model), adapter_state(checkpointed.model)
    for key in reference:
        torch.testing.assert_close(got[key], reference[key], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- MultiTaskTrainer
def imbalanced(task_as_names=False, counts=(40, 16, 8)):
    task_ids = [t for t, n in enumerate(counts) for _ in range(n)]
    names = ["big", "mid", "small"]
    return Dataset.from_dict(
        {
            "input_ids": [[4 + t, 5, 6 + (i % 3)] for i, t in enumerate(task_ids)],
            "labels": [[-100, 5, 6 + (i % 3)] for i, t in enumerate(task_ids)],
            "task_ids": [names[t] for t in task_ids] if task_as_names else task_ids,
        }
    )


def three_task_model():
    torch.manual_seed(0)
    config = TALoraConfig(task_type="CAUSAL_LM", task_names=["big", "mid", "small"], num_virtual_tokens=2, r=2)
    return get_peft_model(tiny_model(), config)


def test_multitask_trainer_default_is_the_stock_sampler(tmp_path):
    trainer = MultiTaskTrainer(model=three_task_model(), args=arguments(tmp_path), train_dataset=imbalanced())
    assert type(trainer._get_train_sampler()) is RandomSampler and trainer.task_sampler is None
    with pytest.raises(ValueError, match="Unknown task_sampling 'uniform'"):
        MultiTaskTrainer(model=three_task_model(), args=arguments(tmp_path), task_sampling="uniform")


def test_multitask_trainer_draws_batches_from_the_temperature_sampler(tmp_path):
    data = imbalanced(task_as_names=True)
    trainer = MultiTaskTrainer(
        model=three_task_model(),
        args=arguments(tmp_path, per_device_train_batch_size=4, seed=7),
        train_dataset=data,
        data_collator=MultiTaskDataCollator(pad_token_id=0, task_names=["big", "mid", "small"]),
        task_sampling="temperature",
        task_sampling_temperature=2.0,
    )
    loader = trainer.get_train_dataloader()
    sampler = trainer.task_sampler
    assert isinstance(sampler, MultiTaskSampler) and sampler.seed == 7
    sqrt_counts = torch.tensor([40, 16, 8], dtype=torch.float64).sqrt()
    torch.testing.assert_close(sampler.probabilities, sqrt_counts / sqrt_counts.sum())
    drawn = torch.cat([batch["task_ids"] for batch in loader])
    reference = MultiTaskSampler([0] * 40 + [1] * 16 + [2] * 8, "temperature", temperature=2.0, seed=7)
    assert drawn.tolist() == reference.task_ids[torch.tensor(list(reference))].tolist()


def multitask_prompt_tuning_model():
    torch.manual_seed(0)
    config = MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, num_tasks=3)
    return get_peft_model(tiny_model(), config)


@pytest.mark.parametrize("make_model", [three_task_model, multitask_prompt_tuning_model], ids=["ta-lora", "mpt"])
def test_multitask_trainer_uncertainty_updates_from_training_batches(tmp_path, make_model):
    """Also for PEFT's MPT, whose logits put the virtual tokens first (it used to fail on the shapes)."""
    trainer = MultiTaskTrainer(
        model=make_model(),
        args=arguments(tmp_path, max_steps=4, per_device_train_batch_size=8),
        train_dataset=imbalanced(),
        data_collator=MultiTaskDataCollator(pad_token_id=0),
        task_sampling="uncertainty",
        uncertainty_refresh_every=8,
    )
    trainer.train()
    u = trainer.task_sampler.uncertainties
    # a random tiny LM is nearly uniform over its 128-token vocabulary: entropies close to (but below) 1
    assert u.shape == (3,) and bool(((u > 0.8) & (u < 1.0)).all()), u
    torch.testing.assert_close(trainer.task_sampler.probabilities, u / u.sum())


@pytest.mark.parametrize("remove_unused_columns", [True, False])
def test_multitask_trainer_uncertainty_updates_with_a_task_column_of_another_name(tmp_path, remove_unused_columns):
    """The dataset's task column may have any name; Trainer's column pruning keeps it (the collator reads it), and
    the collator hands the model (and the sampler's update) ``task_ids`` either way."""
    data = imbalanced().rename_column("task_ids", "task")
    trainer = MultiTaskTrainer(
        model=three_task_model(),
        args=arguments(
            tmp_path, max_steps=4, per_device_train_batch_size=8, remove_unused_columns=remove_unused_columns
        ),
        train_dataset=data,
        data_collator=MultiTaskDataCollator(pad_token_id=0, task_column="task"),
        task_sampling="uncertainty",
        task_column="task",
        uncertainty_refresh_every=8,
    )
    trainer.train()
    u = trainer.task_sampler.uncertainties
    assert bool(((u > 0.8) & (u < 1.0)).all()), u  # updated from the batches: not the initial 1.0 of every task


def test_build_trainer_default_collator_reads_a_task_column_of_another_name_and_other_methods_rows(tmp_path):
    """``build_trainer(task_column=...)`` without a collator: the default collator reads that column (names
    included); a PEFT method without tasks (LoRA) gets a collator that needs no task names."""
    data = imbalanced(task_as_names=True).rename_column("task_ids", "task")
    model = three_task_model()
    before = adapter_state(model)
    args = arguments(tmp_path, max_steps=2, per_device_train_batch_size=8)
    tokenizer = tiny_tokenizer()
    build_trainer(
        model, args, train_dataset=data, processing_class=tokenizer, task_column="task", task_sampling="proportional"
    ).train()
    assert any(not torch.equal(before[k], v) for k, v in adapter_state(model).items())
    text = raw(task_as_names=True)  # prompt/completion text: the default collator tokenises it, so Trainer keeps it
    text_trainer = build_trainer(talora(), args, train_dataset=text, processing_class=tokenizer)
    text_trainer.train()
    assert losses(text_trainer)
    with pytest.raises(ValueError, match=r"need a tokenizer: pass it as build_trainer\(processing_class=...\)"):
        build_trainer(talora(), args, train_dataset=text).train()
    masked = imbalanced().remove_columns("labels").add_column("prompt_length", [1] * 64)  # the prompt stays masked
    batch = next(
        iter(
            build_trainer(
                three_task_model(), args, train_dataset=masked, processing_class=tokenizer
            ).get_train_dataloader()
        )
    )
    assert bool((batch["labels"][:, 0] == -100).all())
    with pytest.raises(ValueError, match=r"the collator has no tokenizer; pass the tokenizer \(build_trainer"):
        build_trainer(talora(), args, train_dataset=imbalanced()).train()  # tokenised rows: padding needs it
    lora = get_peft_model(tiny_model(), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"]))
    trainer = build_trainer(
        lora, args, train_dataset=imbalanced().remove_columns("task_ids"), processing_class=tokenizer
    )
    trainer.train()
    assert losses(trainer)


def test_the_first_orthogonality_loss_of_a_run_is_its_own(tmp_path):
    """Penalties of steps after a run's last log (5 steps, a log every 4) must not mix into the next run's first
    log: at learning rate 0 every step's penalty is the adapter's, computed here independently."""
    model = perturb(three_task_model(), seed=1, scale=0.5)
    data = imbalanced()
    build_trainer(
        model,
        arguments(tmp_path, max_steps=5, logging_steps=4, per_device_train_batch_size=8),
        train_dataset=data,
        data_collator=MultiTaskDataCollator(pad_token_id=0),
    ).train()
    penalty = float(model.base_model.talora_banks["default"].orthogonality_penalty())
    second = build_trainer(
        model,
        arguments(tmp_path / "second", max_steps=1, logging_steps=1, learning_rate=0.0, per_device_train_batch_size=8),
        train_dataset=data,
        data_collator=MultiTaskDataCollator(pad_token_id=0),
    )
    second.train()
    logged = [e["orthogonality_loss"] for e in second.state.log_history if "loss" in e]
    assert logged == [pytest.approx(penalty, rel=1e-5)]


def test_a_no_grad_training_pass_adds_no_penalty_to_the_log():
    """DPO's reference pass runs in training mode under no_grad (on another adapter); it trains nothing, so its
    penalty must not enter the logged mean."""
    model = perturb(three_task_model(), seed=1, scale=0.5).train()
    running = model.base_model.orthogonality_log
    running.pop()
    input_ids = torch.tensor([[4, 5, 6]] * 3)
    with torch.no_grad():
        model(input_ids=input_ids, labels=input_ids, task_ids=[0, 1, 2])
    assert running.pop() is None
    model(input_ids=input_ids, labels=input_ids, task_ids=[0, 1, 2])
    assert running.pop() == pytest.approx(float(model.base_model.talora_banks["default"].orthogonality_penalty()))


def test_uncertainty_entropies_skip_virtual_tokens_and_read_the_target_positions_only():
    """Prompt-learning adapters return logits for their virtual tokens first: the entropies are those of the last
    positions, which line up with the labels, and only where there is a target."""
    torch.manual_seed(0)
    virtual, length, vocab = 3, 5, 11
    logits = torch.randn(2, virtual + length, vocab)
    shift_labels = torch.tensor([[-100, 4, 2, -100, -100], [-100, -100, -100, -100, -100]])
    probs = logits[0, virtual:].softmax(-1).double()
    per_position = -(probs * probs.log()).sum(-1) / math.log(vocab)
    expected = torch.tensor([per_position[[1, 2]].mean().item(), 0.0], dtype=torch.float64)
    torch.testing.assert_close(_next_token_entropies(logits, shift_labels), expected)


@pytest.mark.parametrize("optim", ["adamw_torch", "sgd", "adafactor"])
def test_build_trainer_builds_args_optim_over_the_fast_and_slow_groups(tmp_path, optim):
    """``optim``/``optim_args`` choose the optimizer as with a plain Trainer; TA-LoRA's groups keep their rates."""
    args = arguments(tmp_path, optim=optim, learning_rate=0.01, weight_decay=0.1, adam_beta2=0.99)
    trainer = build_trainer(three_task_model(), args, train_dataset=imbalanced(), fast_lr_ratio=3.0)
    expected_cls, expected_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, trainer.model)
    assert type(trainer.optimizer) is expected_cls
    groups = {group["name"]: group for group in trainer.optimizer.param_groups}
    assert groups["fast"]["lr"] == pytest.approx(0.03) and groups["slow"]["lr"] == pytest.approx(0.01)
    assert (
        groups["slow"]["weight_decay"] == 0.1 and groups.get("slow_no_decay", {"weight_decay": 0})["weight_decay"] == 0
    )
    if "betas" in expected_kwargs:
        assert groups["fast"]["betas"] == (0.9, 0.99)


def test_build_trainer_refuses_optimizers_that_take_the_model_or_their_own_groups(tmp_path, monkeypatch):
    """GaLore, LOMO and the like pick their parameters themselves: they cannot take the fast/slow groups."""
    for extra in ({"model": None}, {"params": []}, {"optimizer_dict": {}}):
        monkeypatch.setattr(
            Trainer, "get_optimizer_cls_and_kwargs", lambda args, model=None, extra=extra: (torch.optim.SGD, extra)
        )
        with pytest.raises(ValueError, match="chooses its own parameter groups, so it cannot take TA-LoRA's fast/slow"):
            build_trainer(three_task_model(), arguments(tmp_path), train_dataset=imbalanced())


def test_a_resumed_uncertainty_run_draws_the_batches_the_uninterrupted_run_drew(tmp_path):
    """The sampler's uncertainties (and the ones each chunk of the epoch in progress was drawn with) are part
    of the checkpoint: after a resume the same tasks come in the same order."""

    class Recording(MultiTaskTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            self.drawn.append(inputs["task_ids"].tolist())
            return super().training_step(model, inputs, *args, **kwargs)

    class Skew(TrainerCallback):  # a strong preference that the slow momentum keeps, set once at the very start
        def on_train_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:
                trainer.task_sampler.uncertainties = torch.tensor([1.0, 0.01, 0.01], dtype=torch.float64)

    runs = []
    for resume in (None, True):
        trainer = Recording(
            model=three_task_model(),
            args=arguments(tmp_path, max_steps=10, per_device_train_batch_size=4, save_steps=5, save_strategy="steps"),
            train_dataset=imbalanced(counts=(8, 16, 40)),
            data_collator=MultiTaskDataCollator(pad_token_id=0),
            task_sampling="uncertainty",
            uncertainty_momentum=0.999,
            uncertainty_refresh_every=4,
            callbacks=[Skew()],
        )
        trainer.drawn = []
        trainer.train(resume_from_checkpoint=tmp_path / "checkpoint-5" if resume else None)
        runs.append((trainer.drawn[-5:], trainer.task_sampler.uncertainties.clone()))
    (first, first_u), (resumed, resumed_u) = runs
    assert sum(t == 0 for batch in first for t in batch) >= 15  # the skew shows: task 0 dominates
    assert resumed == first
    torch.testing.assert_close(resumed_u, first_u)
    with pytest.raises(
        ValueError, match="used strategy 'uncertainty' over 3 tasks; this run uses 'temperature' over 3"
    ):
        MultiTaskSampler([0, 1, 2], "temperature").load_state_dict(trainer.task_sampler.state_dict())


def test_task_sampling_refuses_what_would_skip_or_override_it(tmp_path):
    stream = imbalanced().to_iterable_dataset()
    with pytest.raises(ValueError, match=r"task_sampling='temperature' needs a map-style training set"):
        MultiTaskTrainer(
            model=three_task_model(), args=arguments(tmp_path), train_dataset=stream, task_sampling="temperature"
        )
    args = arguments(tmp_path, train_sampling_strategy="group_by_length")
    with pytest.raises(ValueError, match=r"train_sampling_strategy='group_by_length' both choose the training order"):
        MultiTaskTrainer(model=three_task_model(), args=args, train_dataset=imbalanced(), task_sampling="temperature")


def test_orthogonality_loss_reaches_the_report_to_loggers(tmp_path):
    """Trainer runs its report_to integrations before the callbacks it is given; the entry must be in the logs
    they see, so it is added before any callback runs."""

    class FirstLogger(TrainerCallback):  # sits where the report_to integrations sit: before every other callback
        seen = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.seen.append(dict(logs))

    trainer = build_trainer(
        three_task_model(),
        arguments(tmp_path, max_steps=2, per_device_train_batch_size=8, logging_steps=1),
        train_dataset=imbalanced(),
        data_collator=MultiTaskDataCollator(pad_token_id=0),
    )
    trainer.callback_handler.callbacks.insert(0, FirstLogger())
    trainer.train()
    logged = [entry for entry in FirstLogger.seen if "loss" in entry]
    assert len(logged) == 2 and all(entry["orthogonality_loss"] >= 0 for entry in logged)
    assert [e["orthogonality_loss"] for e in logged] == [
        e["orthogonality_loss"] for e in trainer.state.log_history if "loss" in e
    ]


@pytest.mark.parametrize("custom", ["label_smoothing", "compute_loss_func"])
def test_the_orthogonality_penalty_counts_with_label_smoothing_or_a_custom_loss(tmp_path, custom):
    """Trainer takes the labels away from the model for these, so the model returns no loss to add the penalty
    to; MultiTaskTrainer adds it to the loss Trainer computes, once per step."""
    torch.manual_seed(0)
    model = three_task_model()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))  # factors that are not orthogonal: a penalty well above 0
    batch = MultiTaskDataCollator(pad_token_id=0)([imbalanced()[i] for i in (0, 45, 60)])
    overrides = {"label_smoothing_factor": 1e-9} if custom == "label_smoothing" else {}

    def cross_entropy(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1].flatten(0, 1)
        return torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100)

    extra = {"compute_loss_func": cross_entropy} if custom == "compute_loss_func" else {}
    trainer = MultiTaskTrainer(model=model, args=arguments(tmp_path, **overrides), **extra)
    plain = MultiTaskTrainer(model=model, args=arguments(tmp_path))
    model.train()
    with torch.no_grad():
        got = trainer.compute_loss(model, dict(batch))
        expected = plain.compute_loss(model, dict(batch))  # the model's own loss, its penalty included
        penalty = model.base_model.orthogonality_term()
    assert float(penalty) > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "other_config, meaning",
    [
        (dict(task_names=[*TASKS, "third"]), "tasks (num_tasks / task_names): 2 in the file, 3 here"),
        (dict(task_names=TASKS, r=2), "r: 4 in the file, 2 here"),
        (dict(task_names=TASKS, num_virtual_tokens=6), "num_virtual_tokens: 4 in the file, 6 here"),
        (
            dict(task_names=list(reversed(TASKS))),
            f"task_names: {TASKS} in the file, {list(reversed(TASKS))} here",
        ),  # the same shapes: only the names tell
    ],
    ids=["tasks", "rank", "virtual-tokens", "task-names"],
)
def test_resume_from_a_checkpoint_of_another_config_is_a_clear_error(tmp_path, other_config, meaning):
    data = tokenize_for_causal_lm(raw(False), tiny_tokenizer(), padding="longest")
    args = arguments(tmp_path / "run", max_steps=2, per_device_train_batch_size=4, save_strategy="steps", save_steps=2)
    Trainer(model=talora(), args=args, train_dataset=data).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    saved = {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()}

    config = {"num_virtual_tokens": 4, "r": 4, **other_config}
    other = get_peft_model(tiny_model(), TALoraConfig(task_type="CAUSAL_LM", **config))
    with pytest.raises(ValueError, match=re.escape(meaning)) as info:
        Trainer(model=other, args=args, train_dataset=data).train(resume_from_checkpoint=str(checkpoint))
    assert "built with the TALoraConfig it was saved with" in str(info.value)
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()} == saved


def test_training_helper_with_gradient_accumulation_matches_one_big_batch(tmp_path):
    """The orthogonality penalty counts once per optimizer step however the batch is split."""

    data = tokenize_for_causal_lm(raw(False), tiny_tokenizer())  # ragged: the collator pads
    finals = []
    for batch_size, accumulation in ((8, 1), (4, 2)):
        model = get_peft_model(
            tiny_model(),
            TALoraConfig(task_type="CAUSAL_LM", task_names=TASKS, num_virtual_tokens=4, r=4, orthogonality_weight=10.0),
        )
        torch.manual_seed(0)
        args = arguments(
            tmp_path / str(batch_size),
            max_steps=4,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            learning_rate=0.05,
        )
        trainer = build_trainer(model, args, train_dataset=data, processing_class=tiny_tokenizer())
        trainer.train()
        assert {g["name"] for g in trainer.optimizer.param_groups} >= {"fast", "slow"}
        assert any("orthogonality_loss" in log for log in trainer.state.log_history)
        finals.append(adapter_state(model))
    assert finals[0]["task_v_blocks.0"].abs().min() > 0  # the factors moved, so the penalty was active
    for key in finals[0]:
        torch.testing.assert_close(finals[1][key], finals[0][key], rtol=1e-4, atol=1e-6)
