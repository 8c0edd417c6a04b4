"""Starting a new task from an existing one: ``add_tasks(init_from=...)`` and ``task_losses``/``closest_task``."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import METHODS, make_adapted

from peft_talora.training.transfer import closest_task, task_losses

torch.manual_seed(0)


def _batch(vocab: int = 100, rows: int = 3, length: int = 9, answer: int = 2):
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, vocab, (rows, length), generator=g)
    labels = torch.full_like(input_ids, -100)
    labels[:, -answer:] = input_ids[:, -answer:]
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


@pytest.mark.parametrize("method", METHODS)
def test_a_task_started_from_another_answers_exactly_like_it_and_old_tasks_do_not_move(method):
    model = make_adapted(method, task_names=["a", "b", "c"])
    model.eval()
    batch = _batch()
    ids = batch["input_ids"]
    before = {t: model(input_ids=ids, task_ids=[t] * 3).logits for t in ("a", "b", "c")}
    assert model.add_tasks(["d", "e"], init_from=["b", "c"]) == [3, 4]
    with torch.no_grad():
        for old in ("a", "b", "c"):
            torch.testing.assert_close(model(input_ids=ids, task_ids=[old] * 3).logits, before[old], rtol=0, atol=0)
        torch.testing.assert_close(model(input_ids=ids, task_ids=["d"] * 3).logits, before["b"], rtol=0, atol=0)
        torch.testing.assert_close(model(input_ids=ids, task_ids=["e"] * 3).logits, before["c"], rtol=0, atol=0)
    # a copy, not a view: training the new task leaves its source alone
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable
    loss = model(**batch, task_ids=["d"] * 3).loss
    loss.backward()
    torch.optim.SGD(trainable, lr=1.0).step()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, task_ids=["b"] * 3).logits, before["b"], rtol=0, atol=0)
        assert not torch.equal(model(input_ids=ids, task_ids=["d"] * 3).logits, before["b"])


@pytest.mark.parametrize(
    "init_from, start, moving",
    [
        (None, "base", {"c"}),  # c = 0: no prefix, so only the gate scale gets a gradient at first
        (None, "shared_prompt", {"v", "c"}),  # v = 0: u gets none at first
        ("a", "base", {"u", "v", "c"}),  # a copy takes its source's u, v and c: everything trains at once
    ],
)
def test_which_task_parameters_get_gradients_at_the_first_step(init_from, start, moving):
    model = make_adapted("talora", num_tasks=None, task_names=["a", "b"], new_task_start=start)
    model.add_tasks(["new"], init_from=init_from)
    model(**_batch(), task_ids=["new"] * 3).loss.backward()
    bank = model.base_model.talora_banks["default"]
    blocks = {"u": bank.task_u_blocks, "v": bank.task_v_blocks, "c": bank.task_gate_blocks}
    assert {name: bool(b[-1].grad.abs().sum() > 0) for name, b in blocks.items()} == {n: n in moving for n in blocks}


def test_one_source_for_several_new_tasks_and_bad_init_from_leave_the_adapter_unchanged():
    model = make_adapted("talora", num_tasks=None, task_names=["a", "b"])
    model.add_tasks(["c", "d"], init_from="a")
    bank = model.base_model.talora_banks["default"]
    for new in (2, 3):
        torch.testing.assert_close(bank.task_u[:, new], bank.task_u[:, 0], rtol=0, atol=0)
    config = model.peft_config["default"]
    with pytest.raises(ValueError, match="Unknown task name 'zz'"):
        model.add_tasks(["e"], init_from="zz")
    with pytest.raises(ValueError, match="2 tasks in init_from for 1 new tasks"):
        model.add_tasks(["e"], init_from=["a", "b"])
    assert config.task_names == ["a", "b", "c", "d"] and config.num_tasks == 4 and bank.num_tasks == 4


@pytest.mark.parametrize("method", METHODS)
def test_task_losses_equal_the_mean_label_loss_computed_one_task_at_a_time(method):
    model = make_adapted(method, task_names=["a", "b", "c"])
    batch = _batch(rows=5)
    model.train()
    losses = task_losses(model, batch, chunk_size=4)  # chunks cut across tasks
    assert model.training  # put back
    assert list(losses) == ["a", "b", "c"]
    model.eval()
    with torch.no_grad():
        for task, value in losses.items():
            logits = model(input_ids=batch["input_ids"], task_ids=[task] * 5).logits[:, :-1]
            targets = batch["labels"][:, 1:]
            per_token = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
            expected = (per_token.sum(1) / (targets != -100).sum(1)).mean()
            assert value == pytest.approx(float(expected), rel=1e-5)
    assert closest_task(model, batch) == min(losses, key=losses.get)
    assert list(task_losses(model, batch, ["c", 0])) == ["c", "a"]


def test_task_losses_refuses_rows_without_labels_and_models_without_tasks():
    model = make_adapted("talora", num_tasks=None, task_names=["a", "b"])
    batch = _batch()
    batch["labels"][1] = -100
    with pytest.raises(ValueError, match="no label tokens"):
        task_losses(model, batch)
    with pytest.raises(TypeError, match="needs a PeftModel with an active TA-LoRA or MTL-LoRA adapter"):
        task_losses(model.base_model.model, _batch())


@pytest.mark.parametrize("method", METHODS)
def test_a_new_tasks_training_batch_routed_only_to_frozen_tasks_warns_that_nothing_trains(method):
    """The easy mistake: task_ids encoded with a list of the new tasks alone route to old task 0."""
    model = make_adapted(method, task_names=["a", "b", "c"])
    model.add_tasks(["new"])
    model.train()
    batch = _batch()
    with pytest.warns(UserWarning, match=r"only the tasks \['new'\] train, but this training batch routes every "):
        model(**batch, task_ids=[0, 0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**batch, task_ids=[0, 3, 1])  # one example of the new task: it trains
        with torch.no_grad():
            model(**batch, task_ids=[0, 0, 1])  # evaluating old tasks is fine
        model.eval()
        model(**batch, task_ids=[0, 0, 1])
        model.train()
        model.set_training_stage("multi_task")
        model(**batch, task_ids=[0, 0, 1])
