"""TA-LoRA and MTL-LoRA through the real TRL (``SFTTrainer``, ``DPOTrainer``) on tiny models, on CPU.

Routing proofs: two tasks share every prompt and differ only in the answer (SFT) or in which
answer is preferred (DPO), so both tasks can be learned only if each example's task reaches the
adapter through TRL's data pipeline. The recipes of ``docs/trl.md`` run here as written.
"""

import functools
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import trl
from conftest import cpu_training_args, perturb, tiny_model
from datasets import Dataset
from talora_text import ids, tiny_tokenizer
from trl import DPOConfig, SFTConfig, SFTTrainer

from peft_talora import MTLLoraConfig, TALoraConfig
from peft_talora.training.trl_trainers import MultiTaskDPOTrainer, MultiTaskSFTTrainer, TaskIdsCollator

DOCS = Path(__file__).resolve().parents[1] / "docs" / "trl.md"
TASKS = ["first", "second"]
ANSWERS = {"first": "A", "second": "B"}  # same prompts; task "first" answers A, "second" answers B
WORDS = [f"w{i}" for i in range(4)]
# A chat template in the tiny tokenizer's words, with {% generation %} markers for assistant-only loss.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}question {{ m['content'] }} answer "
    "{% else %}{% generation %}{{ m['content'] }} [EOS]{% endgeneration %} {% endif %}{% endfor %}"
)


def tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def adapter_config(method, **overrides):
    if method == "ta-lora":
        return TALoraConfig(task_type="CAUSAL_LM", task_names=TASKS, num_virtual_tokens=4, r=4, **overrides)
    return MTLLoraConfig(task_type="CAUSAL_LM", task_names=TASKS, r=4, lora_dropout=0.0, **overrides)


def sft_rows(fmt, task=lambda name: name):
    """Every (word, task) pair once, in TRL's ``fmt`` dataset format, with a ``task_ids`` column."""
    rows = []
    for name in TASKS:
        for word in WORDS:
            answer = ANSWERS[name]
            if fmt == "prompt-completion":
                row = {"prompt": f"question {word} answer", "completion": f" {answer}"}
            elif fmt == "conversational":
                row = {
                    "prompt": [{"role": "user", "content": word}],
                    "completion": [{"role": "assistant", "content": answer}],
                }
            else:
                row = {"messages": [{"role": "user", "content": word}, {"role": "assistant", "content": answer}]}
            rows.append({**row, "task_ids": task(name)})
    return Dataset.from_list(rows)


def sft_args(tmp_path, **overrides):
    return cpu_training_args(SFTConfig, tmp_path, **{"bf16": False, "learning_rate": 0.2, "max_steps": 20, **overrides})


def answer_logits(model, task):
    """Next-token logits of the two answers after each prompt ``question <w> answer``, under ``task``: ``(4, 2)``."""
    model.eval()
    prompts = torch.tensor([ids("question", w, "answer") for w in WORDS])
    with torch.no_grad():
        last = model(input_ids=prompts, task_ids=[task] * len(WORDS)).logits[:, -1]
    return last[:, ids("A", "B")]


def assert_each_task_prefers_its_answer(model):
    first, second = answer_logits(model, "first"), answer_logits(model, "second")
    assert (first[:, 0] > first[:, 1]).all(), first  # A under "first"
    assert (second[:, 1] > second[:, 0]).all(), second  # B under "second"


def losses(trainer):
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


# ----------------------------------------------------------------------------- SFT
@pytest.mark.parametrize("fmt", ["prompt-completion", "conversational", "messages"])
@pytest.mark.parametrize("method", ["ta-lora", "mtl-lora"])
def test_sft_learns_two_tasks_with_identical_prompts(tmp_path, method, fmt):
    # messages: TRL's assistant-only loss (the template's generation block); prompt/completion: completion-only loss
    args = sft_args(tmp_path, assistant_only_loss=fmt == "messages", learning_rate=0.2 if method == "ta-lora" else 0.05)
    task = (lambda name: TASKS.index(name)) if fmt == "conversational" else (lambda name: name)  # ids or names
    trainer = MultiTaskSFTTrainer(
        model=tiny_model(),
        args=args,
        train_dataset=sft_rows(fmt, task),
        processing_class=tokenizer(),
        peft_config=adapter_config(method),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert sorted(batch) == ["attention_mask", "input_ids", "labels", "task_ids"]
    for row, labels, task_id in zip(batch["input_ids"], batch["labels"], batch["task_ids"]):
        answer = ANSWERS[TASKS[task_id]]
        assert row[0] == ids("question")[0] and row[2:4].tolist() == ids("answer", answer)  # question <w> answer A
        # the prompt is out of the loss: only the answer and [EOS] count
        assert labels.tolist() == [-100] * 3 + ids(answer) + [2] + [-100] * (len(labels) - 5)
    model = trainer.model
    assert torch.equal(answer_logits(model, "first"), answer_logits(model, "second"))  # untrained: tasks identical
    trainer.train()
    logged = losses(trainer)
    assert len(logged) == 20 and all(math.isfinite(v) for v in logged) and logged[-1] < logged[0]
    assert_each_task_prefers_its_answer(model)


@pytest.mark.parametrize("option", ["packing", "padding_free", "eval_packing"])
def test_sft_rejects_options_that_mix_examples_in_a_row(tmp_path, option):
    base = tiny_model()
    with pytest.raises(ValueError, match=f"does not support {option}=True.*one row.*wrong routes.*packing=False"):
        MultiTaskSFTTrainer(
            model=base,
            args=sft_args(tmp_path, max_length=16, **{option: True}),
            train_dataset=sft_rows("messages"),
            processing_class=tokenizer(),
            peft_config=adapter_config("ta-lora"),
        )
    assert not hasattr(base, "peft_config")  # raised before the model was touched


def test_sft_checks_the_task_column_before_preparing_data(tmp_path):
    kwargs = dict(model=tiny_model(), args=sft_args(tmp_path), processing_class=tokenizer())
    without = sft_rows("messages").remove_columns("task_ids")
    with pytest.raises(ValueError, match=r"train dataset has no 'task_ids' column.*2 task\(s\).*\['first', 'second'\]"):
        MultiTaskSFTTrainer(**kwargs, train_dataset=without, peft_config=adapter_config("ta-lora"))
    with pytest.raises(ValueError, match=r"eval dataset's 'task_ids' column: Unknown task name 'third'"):
        MultiTaskSFTTrainer(
            **kwargs,
            train_dataset=sft_rows("messages"),
            eval_dataset=sft_rows("messages", lambda name: "third"),
            peft_config=adapter_config("ta-lora"),
        )
    from peft import LoraConfig

    with pytest.raises(TypeError, match="TA-LoRA/MTL-LoRA.*LoraConfig"):
        MultiTaskSFTTrainer(**kwargs, train_dataset=sft_rows("messages"), peft_config=LoraConfig(task_type="CAUSAL_LM"))


def test_sft_single_task_adapter_needs_no_task_column(tmp_path):
    data = sft_rows("prompt-completion").filter(lambda row: row["task_ids"] == "first").remove_columns("task_ids")
    config = TALoraConfig(task_type="CAUSAL_LM", task_names=["first"], num_virtual_tokens=4, r=4)
    trainer = MultiTaskSFTTrainer(
        model=tiny_model(),
        args=sft_args(tmp_path, max_steps=3),
        train_dataset=data,
        processing_class=tokenizer(),
        peft_config=config,
    )
    assert "task_ids" not in next(iter(trainer.get_train_dataloader()))
    trainer.train()
    assert len(losses(trainer)) == 3 and all(math.isfinite(v) for v in losses(trainer))


def test_sft_task_column_may_have_another_name(tmp_path):
    data = sft_rows("prompt-completion").rename_column("task_ids", "task")
    trainer = MultiTaskSFTTrainer(
        model=tiny_model(),
        args=sft_args(tmp_path),
        train_dataset=data,
        processing_class=tokenizer(),
        peft_config=adapter_config("mtl-lora"),
        task_column="task",
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert "task" not in batch and sorted(batch["task_ids"].tolist()) == [0] * 4 + [1] * 4


@pytest.mark.parametrize("trainer_class", ["sft", "dpo"])
def test_task_sampling_draws_the_training_order_from_the_multitask_sampler(tmp_path, trainer_class):
    """An imbalanced set (12 "first", 3 "second"): with task_sampling="temperature" the batches' tasks follow
    MultiTaskSampler's order for the same counts and seed, through TRL's own data preparation."""
    from peft_talora.training.sampling import MultiTaskSampler

    if trainer_class == "sft":
        rows = sft_rows("prompt-completion")
        config_class, trainer_type = SFTConfig, MultiTaskSFTTrainer
    else:
        rows = dpo_rows()
        config_class, trainer_type = DPOConfig, MultiTaskDPOTrainer
    first = [i for i, name in enumerate(rows["task_ids"]) if name == "first"]
    second = [i for i, name in enumerate(rows["task_ids"]) if name == "second"]
    data = rows.select([*first, *first, *first, *second[:3]])  # 12 first, 3 second
    args = cpu_training_args(config_class, tmp_path, bf16=False, per_device_train_batch_size=5, seed=3)

    def make(sampling):
        return trainer_type(
            model=tiny_model(),
            args=args,
            train_dataset=data,
            processing_class=tokenizer(),
            peft_config=adapter_config("ta-lora"),
            task_sampling=sampling,
            task_sampling_temperature=2.0,
        )

    trainer = make("temperature")
    batches = list(trainer.get_train_dataloader())
    rows_per_example = 1 if trainer_class == "sft" else 2
    drawn = torch.cat([batch["task_ids"][: len(batch["task_ids"]) // rows_per_example] for batch in batches])
    reference = MultiTaskSampler([0] * 12 + [1] * 3, "temperature", temperature=2.0, seed=3)
    assert trainer.task_sampler is not None and trainer.task_sampler.seed == 3
    torch.testing.assert_close(trainer.task_sampler.probabilities, reference.probabilities)
    assert drawn.tolist() == reference.task_ids[torch.tensor(list(reference))].tolist()
    with pytest.raises(ValueError, match="'uncertainty' needs the model's predictions"):
        make("uncertainty")
    args = cpu_training_args(config_class, tmp_path, bf16=False, train_sampling_strategy="group_by_length")
    with pytest.raises(ValueError, match="train_sampling_strategy='group_by_length' both choose the training order"):
        make("temperature")


def test_sft_loss_includes_the_orthogonality_penalty(tmp_path):
    """TRL's loss comes from log-probabilities, not the model's ``loss``: the trainer adds ``lambda * R`` itself."""
    trainer = MultiTaskSFTTrainer(
        model=tiny_model(),
        args=sft_args(tmp_path),
        train_dataset=sft_rows("prompt-completion"),
        processing_class=tokenizer(),
        peft_config=adapter_config("ta-lora", orthogonality_weight=0.5),
    )
    model = perturb(trainer.model, scale=0.1).train()  # task factors start at zero, where the penalty is 0
    inputs = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        ours = trainer.compute_loss(model, dict(inputs))
        trl_only = SFTTrainer.compute_loss(trainer, model, dict(inputs))
        penalty = model.base_model.active_bank.orthogonality_penalty()
    assert penalty > 0
    torch.testing.assert_close(ours - trl_only, 0.5 * penalty)
    model.eval()
    with torch.no_grad():  # not in evaluation, as with Trainer
        torch.testing.assert_close(
            trainer.compute_loss(model, dict(inputs)), SFTTrainer.compute_loss(trainer, model, dict(inputs))
        )


def test_task_ids_collator_maps_names_ids_and_repeats_rows():
    def pair_collator(features):  # DPO-like: chosen rows, then rejected rows
        return {"input_ids": torch.zeros(2 * len(features), 3, dtype=torch.long), "seen": [sorted(f) for f in features]}

    collator = TaskIdsCollator(pair_collator, TASKS, rows_per_example=2)
    batch = collator([{"x": 1, "task_ids": "second"}, {"x": 2, "task_ids": torch.tensor(0)}, {"x": 3, "task_ids": 1}])
    assert batch["task_ids"].tolist() == [1, 0, 1, 1, 0, 1] and batch["seen"] == [["x"]] * 3
    with pytest.raises(ValueError, match="1 of 2 examples have no 'task_ids'"):
        collator([{"x": 1, "task_ids": 0}, {"x": 2}])
    with pytest.raises(ValueError, match=r"Unknown task id\(s\) \[2\]"):
        collator([{"task_ids": 2}])
    packed = TaskIdsCollator(lambda features: {"input_ids": torch.zeros(1, 9)}, TASKS)
    with pytest.raises(ValueError, match="made 1 rows from 2 examples"):
        packed([{"task_ids": 0}, {"task_ids": 1}])


# ----------------------------------------------------------------------------- DPO
def dpo_rows():
    """Same prompts for both tasks; task "first" prefers A over B, task "second" the reverse."""
    rows = []
    for name in TASKS:
        chosen, rejected = ANSWERS[name], ANSWERS[TASKS[1 - TASKS.index(name)]]
        for word in WORDS:
            rows.append(
                {
                    "prompt": f"question {word} answer",
                    "chosen": f" {chosen}",
                    "rejected": f" {rejected}",
                    "task_ids": name,
                }
            )
    return Dataset.from_list(rows)


def train_dpo(tmp_path, gradient_checkpointing, method="ta-lora"):
    args = cpu_training_args(
        DPOConfig,
        tmp_path,
        bf16=False,
        learning_rate=0.2 if method == "ta-lora" else 0.05,
        max_steps=12,
        beta=1.0,
        gradient_checkpointing=gradient_checkpointing,
    )
    trainer = MultiTaskDPOTrainer(
        model=tiny_model(),
        args=args,
        train_dataset=dpo_rows(),
        processing_class=tokenizer(),
        peft_config=adapter_config(method),
    )
    trainer.train()
    return trainer


def dpo_loss_by_hand(trainer, inputs):
    """Sigmoid DPO loss of one batch with the reference = the untouched base model (``tiny_model()``)."""
    model, base = trainer.model, tiny_model()
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)

    def sequence_logps(logits):
        logps = torch.gather(F.log_softmax(logits[:, :-1].float(), -1), 2, labels[:, 1:].clamp(min=0)[..., None])[
            ..., 0
        ]
        return (logps * (labels[:, 1:] != -100)).sum(-1).chunk(2)

    with torch.no_grad():
        mask = inputs["attention_mask"]
        chosen, rejected = sequence_logps(
            model(input_ids=inputs["input_ids"], attention_mask=mask, task_ids=inputs["task_ids"]).logits
        )
        ref_chosen, ref_rejected = sequence_logps(base(input_ids=inputs["input_ids"], attention_mask=mask).logits)
    margin = trainer.beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return -F.logsigmoid(margin).mean()


@pytest.mark.parametrize("method", ["ta-lora", "mtl-lora"])
def test_dpo_learns_opposite_preferences_against_the_disabled_adapter(tmp_path, method):
    trainer = train_dpo(tmp_path, gradient_checkpointing=False, method=method)
    logged = losses(trainer)
    assert len(logged) == 12 and logged[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at init
    assert logged[-1] < 0.7 * logged[0]
    assert trainer.ref_model is None  # the reference is the model with its adapter disabled
    assert_each_task_prefers_its_answer(trainer.model)

    inputs = next(iter(trainer.get_train_dataloader()))
    n = inputs["completion_mask"].shape[0] // 2
    assert torch.equal(inputs["task_ids"][:n], inputs["task_ids"][n:])  # chosen and rejected rows of one example
    model = trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(inputs))
        penalty = 0.0  # MTL-LoRA has none
        if method == "ta-lora":
            penalty = (
                model.base_model.peft_config["default"].orthogonality_weight
                * model.base_model.active_bank.orthogonality_penalty()
            )
    torch.testing.assert_close(loss, dpo_loss_by_hand(trainer, inputs) + penalty)


@pytest.mark.parametrize("precompute", [False, True], ids=["live-reference", "precomputed-reference"])
@pytest.mark.parametrize("method", ["ta-lora", "mtl-lora"])
def test_dpo_on_a_trained_peft_model_starts_with_the_reference_equal_to_the_policy(tmp_path, method, precompute):
    """A PEFT model with a trained adapter: TRL adds a "ref" adapter that must be a copy of it (for MTL-LoRA, whose
    parameter names end in ``.default``, TRL's own copy missed every tensor and the reference was the base model).
    With precompute_ref_log_probs the reference runs inside TRL's __init__, with the task ids too."""
    from conftest import perturb_trainable
    from peft import get_peft_model

    model = perturb_trainable(get_peft_model(tiny_model(), adapter_config(method)), seed=3)
    args = cpu_training_args(
        DPOConfig, tmp_path, bf16=False, max_steps=1, beta=1.0, precompute_ref_log_probs=precompute
    )
    trainer = MultiTaskDPOTrainer(model=model, args=args, train_dataset=dpo_rows(), processing_class=tokenizer())
    params = dict(model.named_parameters())
    copies = {n: n.replace(".default", ".ref") for n in params if ".default" in n}
    assert copies and all(torch.equal(params[n], params[ref]) for n, ref in copies.items())
    inputs = next(iter(trainer.get_train_dataloader()))
    model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(inputs))
        if method == "ta-lora":
            loss = (
                loss
                - adapter_config(method).orthogonality_weight * model.base_model.active_bank.orthogonality_penalty()
            )
    assert float(loss) == pytest.approx(math.log(2), abs=1e-5)


def test_dpo_with_gradient_checkpointing_trains_as_without(tmp_path):
    """The reference forward (adapter off) runs between the policy forward and the backward that recomputes it."""
    plain = train_dpo(tmp_path / "plain", gradient_checkpointing=False)
    checkpointed = train_dpo(tmp_path / "checkpointed", gradient_checkpointing=True)
    assert checkpointed.model.get_base_model().is_gradient_checkpointing
    assert not plain.model.get_base_model().is_gradient_checkpointing
    assert losses(checkpointed) == pytest.approx(losses(plain), rel=1e-5)
    assert_each_task_prefers_its_answer(checkpointed.model)


# ----------------------------------------------------------------------------- the documented recipes
def doc_snippets():
    """``{heading: python code}`` of docs/trl.md (the first python block under each ``##``/``###`` heading)."""
    snippets, heading = {}, None
    for block in re.split(r"^(#{2,3} .*)$", DOCS.read_text(), flags=re.M):
        if re.match(r"#{2,3} ", block):
            heading = block.lstrip("# ").strip()
            continue
        code = re.search(r"```python\n(.*?)```", block, flags=re.S)
        if heading and code:
            snippets[heading] = code.group(1)
    return snippets


@pytest.mark.parametrize(
    "headings",
    [
        ["SFT with TA-LoRA"],
        ["SFT with TA-LoRA", "Fast and slow learning rates"],
        ["SFT with MTL-LoRA, conversational data"],
        ["DPO"],
    ],
    ids=["sft-ta-lora", "fast-slow", "sft-mtl-lora-conversational", "dpo"],
)
def test_documented_recipe_runs(tmp_path, monkeypatch, headings):
    """Each recipe runs as written on a tiny model; ``base`` and ``tokenizer`` stand for the user's own."""
    monkeypatch.chdir(tmp_path)
    for name in ("SFTConfig", "DPOConfig"):  # TRL's defaults (bf16, gradient checkpointing) kept; CPU forced
        monkeypatch.setattr(trl, name, functools.partial(getattr(trl, name), use_cpu=True))
    scope = {"tokenizer": tokenizer()}
    for heading in headings:  # a later recipe may use what an earlier one defined (its dataset)
        scope["base"] = tiny_model()
        exec(compile(doc_snippets()[heading], f"docs/trl.md ({heading})", "exec"), scope)
        trainer = scope["trainer"]
        assert trainer.state.global_step > 0 and all(math.isfinite(v) for v in losses(trainer))
        assert (tmp_path / trainer.args.output_dir / "adapter_config.json").is_file()  # trainer.save_model()
    if "Fast and slow learning rates" in headings:
        rates = sorted({group["initial_lr"] for group in trainer.optimizer.param_groups})
        assert rates == pytest.approx([1e-2, 4e-2])
