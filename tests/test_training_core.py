"""Orthogonality penalty, its Trainer log entry, and fast/slow parameter groups."""

import torch
from conftest import batch, perturb, tiny_model
from datasets import Dataset
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from peft_talora import OrthogonalityLogCallback, TALoraConfig, talora_optimizer, talora_parameter_groups

TASKS = torch.tensor([0, 1, 2])


def talora(**kwargs):
    config = dict(task_type="CAUSAL_LM", num_tasks=3, num_virtual_tokens=4, r=4)
    return get_peft_model(tiny_model("llama"), TALoraConfig(**{**config, **kwargs}))


def test_orthogonal_factors_give_exactly_zero():
    bank = talora().base_model.talora_banks["default"]
    with torch.no_grad():
        bank.task_u.normal_()
        bank.task_v.zero_()
        for t in range(3):
            bank.task_v[:, t, t] = t + 1.0  # v_t along axis t: pairwise orthogonal
    assert bank.orthogonality_penalty().item() == 0.0


def test_overlapping_factors_give_the_hand_computed_value():
    bank = talora(num_tasks=2).base_model.talora_banks["default"]  # 2 layers
    with torch.no_grad():
        bank.task_u.zero_()
        bank.task_v.zero_()
        bank.task_u[0, 0, 0], bank.task_u[0, 1, :2] = 2.0, torch.tensor([1.0, 1.0])  # |u0|^2 = 4, |u1|^2 = 2
        bank.task_v[0, 0, :2], bank.task_v[0, 1, 0] = torch.tensor([1.0, 1.0]), 3.0  # v0 . v1 = 3
        bank.task_u[1, 0, 0], bank.task_u[1, 1, 0] = 1.0, 1.0
        bank.task_v[1, 0, 0], bank.task_v[1, 1, 0] = 0.5, 0.5  # v0 . v1 = 0.25
    # sum over ordered pairs i != j (both (0,1) and (1,0)) and layers of (v_i.v_j)^2 |u_i|^2 |u_j|^2
    expected = 2 * (9 * 4 * 2) + 2 * (0.0625 * 1 * 1)
    assert bank.orthogonality_penalty().item() == expected


def test_penalty_is_added_to_the_training_loss_only():
    input_ids, mask = batch()
    losses = {}
    for weight in (0.0, 0.5):
        model = perturb(talora(orthogonality_weight=weight), scale=0.3)
        model.train()
        losses[weight] = model(input_ids=input_ids, attention_mask=mask, labels=input_ids, task_ids=TASKS).loss
        penalty = model.base_model.talora_banks["default"].orthogonality_penalty()
        model.eval()
        eval_loss = model(input_ids=input_ids, attention_mask=mask, labels=input_ids, task_ids=TASKS).loss
        torch.testing.assert_close(eval_loss, losses[0.0] if weight else losses[weight])
    torch.testing.assert_close(losses[0.5], losses[0.0] + 0.5 * penalty)


def toy_dataset():
    input_ids, mask = batch(batch_size=6, seed=3)
    return Dataset.from_dict(
        {
            "input_ids": input_ids.tolist(),
            "attention_mask": mask.tolist(),
            "labels": input_ids.tolist(),
            "task_ids": [0, 1, 2, 0, 1, 2],
        }
    )


def trainer_args(tmp_path, **kwargs):
    return TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=3,
        max_steps=4,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        **kwargs,
    )


def test_orthogonality_loss_is_its_own_trainer_log_entry(tmp_path):
    model = perturb(talora(orthogonality_weight=0.1), scale=0.3)
    trainer = Trainer(
        model=model, args=trainer_args(tmp_path), train_dataset=toy_dataset(), callbacks=[OrthogonalityLogCallback()]
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 4
    assert all(entry["orthogonality_loss"] > 0 for entry in logged)


def test_fast_and_slow_groups_and_trainer_schedule(tmp_path):
    model = talora()
    groups = talora_parameter_groups(model, lr=1e-3, fast_lr_ratio=5.0, weight_decay=0.1)
    bank = model.base_model.talora_banks["default"]
    by_name = {g["name"]: g for g in groups}
    assert {id(p) for p in by_name["fast"]["params"]} == {id(bank.task_u), id(bank.task_v)}
    slow = {id(p) for g in groups if g["name"].startswith("slow") for p in g["params"]}
    assert slow == {id(bank.shared_prompt), id(bank.shared_basis), id(bank.gate)}
    assert by_name["fast"]["lr"] == 5e-3 and by_name["slow"]["lr"] == 1e-3
    assert by_name["fast"]["weight_decay"] == 0.1

    optimizer = talora_optimizer(model, lr=1e-3, fast_lr_ratio=5.0)
    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path, lr_scheduler_type="linear"),
        train_dataset=toy_dataset(),
        optimizers=(optimizer, None),
    )
    trainer.train()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["fast"] == 5 * lrs["slow"] and lrs["slow"] < 1e-3, "the scheduler scales every group alike"
