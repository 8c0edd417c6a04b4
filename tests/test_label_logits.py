"""Training logits only at label positions (``MultiTaskTrainer(label_logits_only=True)``, the default).

The loss and gradients must equal those of the full logits on every architecture and both methods, a
whole training run must end at the same adapter, and the models it cannot apply to must be left alone.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHITECTURES, ATTN_IMPLEMENTATIONS, VOCAB, cpu_training_args, make_adapted, tiny_model
from datasets import Dataset
from peft import PromptTuningConfig, get_peft_model
from transformers import TrainingArguments

from peft_talora import TALoraConfig
from peft_talora.training import MultiTaskTrainer
from peft_talora.training.collator import MultiTaskDataCollator
from peft_talora.training.label_logits import label_positions, supports_label_logits


def rows(n: int = 6, seed: int = 0) -> list[dict]:
    """Prompts of 3-7 tokens and answers of 1-2 tokens: label positions differ from row to row."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(3, VOCAB, (3 + i % 5,), generator=g).tolist()
        answer = torch.randint(3, VOCAB, (1 + i % 2,), generator=g).tolist()
        out.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer, "task_ids": i % 3})
    return out


def batch(n: int = 6) -> dict:
    return MultiTaskDataCollator(pad_token_id=0)(rows(n))


def trainer_for(model, tmp_path, **kwargs) -> MultiTaskTrainer:
    args = cpu_training_args(
        TrainingArguments, tmp_path, learning_rate=0.05, max_steps=3, per_device_train_batch_size=3
    )
    data = Dataset.from_list(rows(9))
    return MultiTaskTrainer(
        model=model, args=args, train_dataset=data, data_collator=MultiTaskDataCollator(pad_token_id=0), **kwargs
    )


def test_label_positions_are_the_union_of_the_rows_next_token_labels():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, -100]])
    positions, shift_labels = label_positions(labels)
    assert positions.tolist() == [0, 1, 2]  # position i predicts token i + 1
    assert shift_labels.tolist() == [[-100, 5, 6], [7, -100, -100]]
    assert label_positions(torch.full((2, 4), -100)) is None


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("method", ["talora", "mtllora"])
def test_loss_and_gradients_equal_the_full_logits(tmp_path, arch, method):
    model = make_adapted(method, arch, ATTN_IMPLEMENTATIONS[arch][-1]).train()
    trainer = trainer_for(model, tmp_path)
    inputs = batch()
    assert trainer._keeps_label_logits_only(model, inputs["labels"])
    items = (inputs["labels"][:, 1:] != -100).sum()

    def loss_and_grads(compute):
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks (GPT-2 has dropout on by default)
        loss = compute()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    kept, kept_grads = loss_and_grads(lambda: trainer.compute_loss(model, dict(inputs), num_items_in_batch=items))
    full, full_grads = loss_and_grads(lambda: model(**inputs, num_items_in_batch=items).loss)  # transformers' own loss
    torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in full_grads.values())
    for name in full_grads:
        torch.testing.assert_close(kept_grads[name], full_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_loss_is_the_cross_entropy_of_the_label_tokens_by_hand(tmp_path):
    torch.manual_seed(0)
    config = TALoraConfig(task_type="CAUSAL_LM", num_tasks=3, num_virtual_tokens=4, r=4, orthogonality_weight=0.0)
    model = get_peft_model(tiny_model(), config)
    model.base_model.talora_banks["default"].gate.data.fill_(0.5)  # the prefix counts
    model.train()
    inputs = batch()
    loss = trainer_for(model, tmp_path).compute_loss(model, dict(inputs))
    with torch.no_grad():
        logits = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], task_ids=inputs["task_ids"]
        ).logits
    targets = inputs["labels"][:, 1:]
    keep = targets != -100
    by_hand = F.cross_entropy(logits[:, :-1][keep], targets[keep])
    torch.testing.assert_close(loss.detach(), by_hand, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampling", [None, "uncertainty"])
def test_training_ends_at_the_same_adapter_as_with_every_position(tmp_path, sampling):
    def train(label_logits_only):
        model = make_adapted("talora", trained=False)
        trainer = trainer_for(
            model, tmp_path / str(label_logits_only), task_sampling=sampling, label_logits_only=label_logits_only
        )
        trainer.train()
        state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        return state, losses, trainer.task_sampler

    kept, kept_losses, kept_sampler = train(True)
    full, full_losses, full_sampler = train(False)
    assert kept_losses == pytest.approx(full_losses, rel=1e-5)
    for name in full:
        torch.testing.assert_close(kept[name], full[name], rtol=1e-4, atol=1e-6, msg=name)
    if sampling == "uncertainty":  # its entropies come from the kept logits
        assert (full_sampler.uncertainties < 1).all()
        torch.testing.assert_close(kept_sampler.uncertainties, full_sampler.uncertainties)


def test_left_alone_where_it_cannot_apply(tmp_path):
    prompt = get_peft_model(tiny_model(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert not supports_label_logits(prompt)  # the virtual tokens move every position
    assert supports_label_logits(make_adapted("talora")) and supports_label_logits(tiny_model())
    labels = batch()["labels"]
    prompt.train()
    assert not trainer_for(prompt, tmp_path / "pt")._keeps_label_logits_only(prompt, labels)
    model = make_adapted("talora").train()
    smoothing = cpu_training_args(TrainingArguments, tmp_path / "ls", label_smoothing_factor=0.1)
    assert not MultiTaskTrainer(model=model, args=smoothing)._keeps_label_logits_only(model, labels)
    assert not trainer_for(model, tmp_path / "off", label_logits_only=False)._keeps_label_logits_only(model, labels)
    model.eval()  # evaluation keeps every position's logits (compute_metrics may read them)
    assert not trainer_for(model, tmp_path / "eval")._keeps_label_logits_only(model, labels)
