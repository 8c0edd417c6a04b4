"""The routing of a call belongs to the call (issue 11): gradient checkpointing, threads, nested and
inner-module calls, deepcopy, a second get_peft_model, and what the attention does to the prefix.

Every test runs for both multi-task methods (TA-LoRA and MTL-LoRA) where it applies.
"""

import copy
import json
import sys
import threading

import pytest
import torch
from conftest import METHODS, batch, logits, make_adapted, perturb_trainable, tiny_model
from peft import get_peft_model
from transformers import LogitsProcessor, LogitsProcessorList

from peft_talora import MTLLoraConfig, TALoraConfig
from peft_talora.talora.layer import gated_prefix_attention


def adapter_grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def enable_checkpointing(model, reentrant: bool) -> None:
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:  # reentrant checkpoints give parameters gradients only when the inputs need grad (as PEFT sets up)
        model.base_model.model.enable_input_require_grads()


def one_step(model, ids, mask):
    model(input_ids=ids, attention_mask=mask, labels=ids, task_ids=torch.tensor([0, 1, 2])).loss.backward()


def two_forwards_one_backward(model, ids, mask):
    first = model(input_ids=ids, attention_mask=mask, labels=ids, task_ids=torch.tensor([0, 1, 2])).loss
    second = model(input_ids=ids, attention_mask=mask, labels=ids, task_ids=torch.tensor([1, 1, 2])).loss
    (first + second).backward()


def reference_forward_between(model, ids, mask):
    """How DPO-style trainers compute the reference model: the adapter disabled, without grad, mid-step."""
    loss = model(input_ids=ids, attention_mask=mask, labels=ids, task_ids=torch.tensor([2, 0, 1])).loss
    with torch.no_grad(), model.disable_adapter():
        reference = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    (loss - 0.1 * reference).backward()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("steps", [one_step, two_forwards_one_backward, reference_forward_between])
def test_gradient_checkpointing_gives_the_plain_gradients(method, reentrant, steps):
    ids, mask = batch(left_pad=2)
    grads = []
    for checkpointing in (False, True):
        model = make_adapted(method)
        model.train()
        if checkpointing:
            enable_checkpointing(model, reentrant)
        steps(model, ids, mask)
        grads.append(adapter_grads(model))
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name, expected in grads[0].items():
        assert expected.abs().sum() > 0 or "gate" not in name
        torch.testing.assert_close(grads[1][name], expected, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", METHODS)
def test_two_threads_each_get_their_own_tasks(method):
    """A model shared by a threaded server: each thread's outputs equal its single-threaded outputs."""
    model = make_adapted(method)
    ids, mask = batch(batch_size=2)
    requests = {0: torch.tensor([0, 1]), 1: torch.tensor([2, 2])}
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = {
        t: (logits(model, tasks, ids, mask), model.generate(input_ids=ids, attention_mask=mask, task_ids=tasks, **gen))
        for t, tasks in requests.items()
    }
    assert not torch.equal(expected[0][0], expected[1][0])
    wrong, errors, start = [], [], threading.Barrier(2)

    def serve(thread: int):
        try:
            start.wait()
            for _ in range(8):
                got = logits(model, requests[thread], ids, mask)
                out = model.generate(input_ids=ids, attention_mask=mask, task_ids=requests[thread], **gen)
                if not (torch.equal(got, expected[thread][0]) and torch.equal(out, expected[thread][1])):
                    wrong.append(thread)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(repr(error))

    threads = [threading.Thread(target=serve, args=(t,)) for t in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and not wrong, (errors, wrong)


@pytest.mark.parametrize("method", METHODS)
def test_generate_nested_in_a_logits_processor_keeps_the_outer_routing(method):
    model = make_adapted(method)
    ids, mask = batch(batch_size=2)
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    tasks = torch.tensor([0, 1])
    expected = model.generate(input_ids=ids, attention_mask=mask, task_ids=tasks, **gen)

    class CallsTheModelWithOtherTasks(LogitsProcessor):
        def __call__(self, input_ids, scores):
            model(input_ids=input_ids, task_ids=torch.full((input_ids.shape[0],), 2))
            return scores

    got = model.generate(
        input_ids=ids,
        attention_mask=mask,
        task_ids=tasks,
        logits_processor=LogitsProcessorList([CallsTheModelWithOtherTasks()]),
        **gen,
    )
    assert torch.equal(got, expected)


@pytest.mark.parametrize("method", METHODS)
def test_a_set_adapter_during_generate_leaves_the_call_in_flight_alone(method):
    """The adapter a call started with serves the whole call: a LogitsProcessor (or another thread) switching the
    active adapter mid-generate changes the next call, not this one."""
    model = make_adapted(method).eval()
    config = type(model.peft_config["default"])
    extra = dict(num_virtual_tokens=4, r=4) if method == "talora" else dict(r=4, target_modules="all-linear")
    model.add_adapter("other", config(task_type="CAUSAL_LM", num_tasks=2, **extra))
    perturb_trainable(model, seed=5)  # the other adapter differs from the base model too
    model.set_adapter("default")
    ids, mask = batch(batch_size=2)
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    tasks = torch.tensor([2, 0])  # task 2 exists only in "default"
    expected = model.generate(input_ids=ids, attention_mask=mask, task_ids=tasks, **gen)

    class SwitchesTheAdapter(LogitsProcessor):
        def __call__(self, input_ids, scores):
            model.set_adapter("other")
            return scores

    switch = LogitsProcessorList([SwitchesTheAdapter()])
    got = model.generate(input_ids=ids, attention_mask=mask, task_ids=tasks, logits_processor=switch, **gen)
    assert torch.equal(got, expected)
    assert model.active_adapter == "other"  # and the switch took effect for the calls after it
    other = model.generate(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([1, 0]), **gen)
    model.set_adapter("default")
    assert not torch.equal(
        other, model.generate(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([1, 0]), **gen)
    )


@pytest.mark.parametrize("method", METHODS)
def test_generate_takes_its_inputs_under_any_of_its_names(method):
    """``inputs=`` (the name of generate's first parameter), positional and ``input_ids=`` give the same tokens."""
    model = make_adapted(method).eval()
    ids, mask = batch(batch_size=2)
    gen = dict(attention_mask=mask, task_ids=torch.tensor([0, 2]), max_new_tokens=4)
    gen.update(do_sample=False, pad_token_id=0)
    expected = model.generate(input_ids=ids, **gen)
    assert torch.equal(model.generate(inputs=ids, **gen), expected)
    assert torch.equal(model.generate(ids, **gen), expected)


@pytest.mark.parametrize("method", METHODS)
def test_the_wrapped_causal_lm_routes_and_an_inner_module_call_raises(method):
    model = make_adapted(method)
    ids, mask = batch()
    tasks = torch.tensor([2, 0, 1])
    expected = logits(model, tasks, ids, mask)
    with torch.no_grad():
        direct = model.get_base_model()(input_ids=ids, attention_mask=mask, task_ids=tasks).logits
    assert torch.equal(direct, expected)
    with pytest.raises(RuntimeError, match=r"called directly\. Call the PEFT model, or the causal LM it wraps"):
        model.get_base_model().model(input_ids=ids, attention_mask=mask)
    assert torch.equal(logits(model, tasks, ids, mask), expected), "a failed inner call leaves nothing behind"


@pytest.mark.parametrize("method", METHODS)
def test_deepcopy_after_a_training_forward(method):
    model = make_adapted(method)
    model.train()
    ids, mask = batch()
    tasks = torch.tensor([0, 2, 1])
    model(input_ids=ids, attention_mask=mask, labels=ids, task_ids=tasks).loss.backward()
    clone = copy.deepcopy(model)
    model.eval()
    clone.eval()
    assert torch.equal(logits(clone, tasks, ids, mask), logits(model, tasks, ids, mask))
    with torch.no_grad():
        for param in clone.parameters():
            if param.requires_grad:
                param.add_(1.0)
    assert not torch.equal(logits(clone, tasks, ids, mask), logits(model, tasks, ids, mask)), (
        "the copy runs its own weights"
    )


def test_the_base_attention_function_sees_its_own_implementation_name():
    """transformers' flash attention picks its kernel by ``module.config._attn_implementation``; inside the wrapped
    base function that must be the model's own implementation, not TA-LoRA's routed name."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen = []

    def recording_sdpa(module, *args, **kwargs):  # stands in for a kernel chosen by the config's name
        seen.append(module.config._attn_implementation)
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("recording_sdpa", recording_sdpa)
    config = TALoraConfig(task_type="CAUSAL_LM", num_tasks=3, num_virtual_tokens=4, r=4)
    torch.manual_seed(0)
    recorded = perturb_trainable(get_peft_model(tiny_model(attn="recording_sdpa"), config))
    torch.manual_seed(0)
    reference = perturb_trainable(get_peft_model(tiny_model(attn="sdpa"), config))
    tasks = torch.tensor([0, 2, 1])
    seen.clear()
    torch.testing.assert_close(logits(recorded, tasks), logits(reference, tasks))
    assert seen and set(seen) == {"recording_sdpa"}
    assert recorded.base_model.model.model.layers[0].self_attn.config._attn_implementation.startswith("talora")


@pytest.mark.parametrize("method", METHODS)
def test_data_parallel_is_refused_by_name_and_unload_takes_the_refusal_off(method):
    """nn.DataParallel's copies would run the original model's forward wrapper and routing hook: its copy step
    raises with the fix (DDP, or one GPU) instead; after unload the plain model replicates as usual."""
    model = make_adapted(method)
    wrapped = model.base_model.model
    with pytest.raises(RuntimeError, match=r"do not run under torch\.nn\.DataParallel.*torchrun or accelerate launch"):
        wrapped._replicate_for_data_parallel()
    plain = model.unload() if method == "mtllora" else model.base_model.unload()
    assert type(plain._replicate_for_data_parallel()) is type(plain)


@pytest.mark.parametrize("first", METHODS)
@pytest.mark.parametrize("second", METHODS)
def test_a_second_get_peft_model_on_an_adapted_base_refuses_and_the_first_keeps_working(first, second):
    model = make_adapted(first)
    ids, mask = batch()
    tasks = torch.tensor([0, 2, 1])
    expected = logits(model, tasks, ids, mask)
    config = (
        TALoraConfig(task_type="CAUSAL_LM", num_tasks=2)
        if second == "talora"
        else MTLLoraConfig(task_type="CAUSAL_LM", num_tasks=2)
    )
    with pytest.raises(ValueError, match=r"already carries a .*adapter.*add_adapter"):
        get_peft_model(model.get_base_model(), config)
    assert torch.equal(logits(model, tasks, ids, mask), expected)


def test_gated_prefix_attention_equals_the_formula_with_softcap_and_groups():
    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(shape, generator=g) * 3 for shape in [(2, 4, 5, 8), (2, 2, 3, 8), (2, 2, 3, 8)])
    gate = torch.randn(4, generator=g)
    for softcap in (None, 2.0):
        got = gated_prefix_attention(query, key, value, gate, 0.3, softcap=softcap)  # (B, q, H, hd)
        for h in range(4):
            scores = query[:, h] @ key[:, h // 2].transpose(-1, -2) * 0.3
            if softcap:
                scores = softcap * torch.tanh(scores / softcap)
            want = torch.tanh(gate[h]) * torch.softmax(scores, -1) @ value[:, h // 2]
            torch.testing.assert_close(got[:, :, h], want, rtol=1e-5, atol=1e-6)


def test_the_base_attention_dropout_and_softcap_reach_the_prefix(monkeypatch):
    """Gemma 2 passes its logit softcap and, in training, its dropout to the attention call; the prefix gets both."""
    import peft_talora.talora.attention as attention

    seen = []
    original = attention.gated_prefix_attention
    monkeypatch.setattr(
        attention,
        "gated_prefix_attention",
        lambda *a, **kw: seen.append((kw["dropout"], kw["softcap"])) or original(*a, **kw),
    )
    base = tiny_model("gemma2", "eager", attn_logit_softcapping=7.0, attention_dropout=0.25)
    model = get_peft_model(base, TALoraConfig(task_type="CAUSAL_LM", num_tasks=2, num_virtual_tokens=4, r=4))
    ids, mask = batch(batch_size=2)
    model.eval()
    logits(model, torch.tensor([0, 1]), ids, mask)
    assert seen == [(0.0, 7.0)] * 2
    seen.clear()
    model.train()
    model(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 1]))
    assert seen == [(0.25, 7.0)] * 2


def test_prefix_computation_happens_inside_each_layer_forward(monkeypatch):
    """Each layer projects its prefix while that layer runs (where FSDP/offloading have its weights)."""
    from peft_talora.talora.attention import AttentionSite

    model = make_adapted("talora")
    running, order = [], []
    for i, layer in enumerate(model.get_base_model().model.layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: running.append(i))
        layer.register_forward_hook(lambda m, a, o: [running.pop(), None][1])
    original = AttentionSite.project_prefix
    monkeypatch.setattr(
        AttentionSite, "project_prefix", lambda self, h: order.append((self.layer, list(running))) or original(self, h)
    )
    ids, mask = batch()
    logits(model, torch.tensor([0, 1, 2]), ids, mask)
    assert order == [(0, [0]), (1, [1])]


def test_add_tasks_unfrozen_in_the_new_tasks_stage_keeps_the_earlier_new_block_training():
    model = make_adapted("talora")
    model.add_tasks(2)  # freeze: the new_tasks stage, block 1 trains
    model.add_tasks(1, freeze=False)  # the stage stays: blocks 1 and 2 train, block 0 stays frozen
    bank = model.base_model.talora_banks["default"]
    assert [b.requires_grad for b in bank.task_u_blocks] == [False, True, True]
    assert [b.requires_grad for b in bank.task_v_blocks] == [False, True, True]
    assert not bank.shared_prompt.requires_grad and not bank.gate.requires_grad


def test_a_deleted_adapters_stage_does_not_stick_to_its_name():
    model = make_adapted("talora")
    model.set_training_stage("shared_warmup")
    model.add_adapter("other", TALoraConfig(task_type="CAUSAL_LM", num_tasks=2, num_virtual_tokens=4, r=4))
    model.set_adapter("other")
    model.delete_adapter("default")
    model.add_adapter("default", TALoraConfig(task_type="CAUSAL_LM", num_tasks=2, num_virtual_tokens=4, r=4))
    assert model.base_model.training_stage("default") == "multi_task"


def test_merge_and_unload_on_ta_lora_says_why_not():
    model = make_adapted("talora")
    with pytest.raises(NotImplementedError, match="cannot be merged.*unload\\(\\)"):
        model.merge_and_unload()


def test_torch_requirement_admits_only_releases_with_enable_gqa():
    """``gated_prefix_attention`` passes ``enable_gqa`` to SDPA, which torch has since 2.5."""
    import configparser
    from pathlib import Path

    setup = configparser.ConfigParser()
    setup.read(Path(__file__).parents[1] / "setup.cfg")
    requirement = next(r for r in setup["options"]["install_requires"].split("\n") if r.strip().startswith("torch"))
    assert requirement.strip() == "torch>=2.5"


def test_new_tasks_stage_from_the_command_line(tmp_path):
    """``python -m peft_talora.training --training_stage new_tasks --adapter_path ...`` adds and trains the new tasks."""
    import subprocess

    from safetensors.torch import load_file
    from talora_text import tiny_tokenizer

    tiny_model().save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")

    def data(name, rows):
        with open(tmp_path / name, "w") as f:
            for prompt, completion, task in rows:
                f.write(json.dumps({"prompt": prompt, "completion": completion, "task": task}) + "\n")

    data("source.jsonl", [("question w1", "A", "first"), ("question w2", "B", "second")])
    data("target.jsonl", [("question w3", "C", "third"), ("question w4", "A", "third")])
    common = [
        "--model_name_or_path",
        str(tmp_path / "model"),
        "--max_steps",
        "2",
        "--use_cpu",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--learning_rate",
        "0.05",
        "--per_device_train_batch_size",
        "2",
        "--disable_tqdm",
        "true",
    ]

    def train(*args):
        result = subprocess.run(
            [sys.executable, "-m", "peft_talora.training", *common, *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env={"OMP_NUM_THREADS": "1", **__import__("os").environ},
        )
        assert result.returncode == 0, result.stderr[-4000:]

    train(
        "--train_file",
        str(tmp_path / "source.jsonl"),
        "--output_dir",
        str(tmp_path / "source"),
        "--num_virtual_tokens",
        "4",
        "--rank",
        "4",
    )
    train(  # the layout (4 virtual tokens, rank 4) comes from the saved adapter
        "--train_file",
        str(tmp_path / "target.jsonl"),
        "--output_dir",
        str(tmp_path / "target"),
        "--adapter_path",
        str(tmp_path / "source"),
        "--training_stage",
        "new_tasks",
    )
    config = json.loads((tmp_path / "target" / "adapter_config.json").read_text())
    assert config["task_names"] == ["first", "second", "third"]
    before, after = (
        load_file(tmp_path / "source" / "adapter_model.safetensors"),
        load_file(tmp_path / "target" / "adapter_model.safetensors"),
    )
    for key in ("task_u", "task_v"):
        name = f"base_model.talora_banks.{key}"
        assert torch.equal(after[name][:, :2], before[name][:, :2]), "the source tasks stay bit-identical"
        assert not torch.equal(after[name][:, 2], before[name][:, 0]), "the new task trained"
    for key in ("shared_prompt", "shared_basis", "gate"):
        assert torch.equal(after[f"base_model.talora_banks.{key}"], before[f"base_model.talora_banks.{key}"])


@pytest.fixture
def cli_workspace(tmp_path):
    """A tiny model folder and a two-task data file for in-process ``peft_talora.training.cli.main`` runs."""
    from talora_text import tiny_tokenizer

    tiny_model().save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    with open(tmp_path / "train.jsonl", "w") as f:
        for prompt, completion, task in [("question w1", "A", "first"), ("question w2", "B", "second")] * 2:
            f.write(json.dumps({"prompt": prompt, "completion": completion, "task": task}) + "\n")

    def args(output_dir, *extra):
        common = ["--model_name_or_path", str(tmp_path / "model"), "--train_file", str(tmp_path / "train.jsonl")]
        common += ["--use_cpu", "--report_to", "none", "--per_device_train_batch_size", "2", "--disable_tqdm", "true"]
        return [*common, "--output_dir", str(tmp_path / output_dir), "--learning_rate", "0.05", *extra]

    return tmp_path, args


def test_the_command_line_refuses_flags_it_would_ignore(cli_workspace):
    from peft_talora.training.cli import main

    folder, args = cli_workspace
    main(args("source", "--max_steps", "1", "--save_strategy", "no", "--rank", "4"))
    with pytest.raises(ValueError, match=r"--rank, --alpha set the layout of a new adapter, but --adapter_path"):
        main(args("next", "--max_steps", "1", "--adapter_path", str(folder / "source"), "--rank", "4", "--alpha", "2"))
    with pytest.raises(ValueError, match=r"--new_tasks adds tasks in the new_tasks stage: pass --training_stage"):
        main(args("next", "--max_steps", "1", "--adapter_path", str(folder / "source"), "--new_tasks", "third"))
    # a training hyperparameter is not layout: it overrides the saved one
    main(args("next", "--max_steps", "1", "--save_strategy", "no", "--adapter_path", str(folder / "source"),
              "--orthogonality_weight", "0.5"))  # fmt: skip
    saved = json.loads((folder / "next" / "adapter_config.json").read_text())
    assert saved["orthogonality_weight"] == 0.5 and saved["r"] == 4
    with pytest.raises(ValueError, match=r"--orthogonality_weight.* must be >= 0"):  # the saved adapter would not load
        main(args("bad", "--max_steps", "1", "--adapter_path", str(folder / "source"), "--orthogonality_weight", "-5"))
    assert not (folder / "bad").exists()
    from peft import get_peft_model

    from peft_talora import MTLLoraConfig

    mtl = get_peft_model(tiny_model(), MTLLoraConfig(task_type="CAUSAL_LM", task_names=["first", "second"], r=2))
    mtl.save_pretrained(folder / "mtl")
    with pytest.raises(
        ValueError, match=r"--orthogonality_weight is TA-LoRA's penalty; the adapter at .* is MTLLoraConfig"
    ):
        main(
            args("mtl_next", "--max_steps", "1", "--adapter_path", str(folder / "mtl"), "--orthogonality_weight", "0.5")
        )


def test_the_command_line_reads_numeric_csv_answers_as_text_and_evaluates_an_eval_file(cli_workspace, capsys):
    from peft_talora.training.cli import main

    folder, args = cli_workspace
    with open(folder / "numbers.csv", "w") as f:
        f.write("prompt,completion,task\n" + "question w1,1,first\nquestion w2,0,second\n" * 2)
    main([*args("numbers", "--max_steps", "1", "--save_strategy", "no"), "--train_file", str(folder / "numbers.csv"),
          "--eval_file", str(folder / "numbers.csv")])  # fmt: skip
    assert "eval_loss" in capsys.readouterr().out  # evaluated once at the end (no --eval_strategy)


def test_the_command_line_resumes_from_the_checkpoint_it_is_given(cli_workspace):
    from safetensors.torch import load_file

    from peft_talora.training.cli import main

    folder, args = cli_workspace
    main(args("first", "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1"))
    checkpoint = folder / "first" / "checkpoint-2"
    # a new output_dir: only --resume_from_checkpoint can point at the finished run, which then trains no more
    # steps (a fresh run at this learning rate would end elsewhere)
    resume = ["--resume_from_checkpoint", str(checkpoint), "--learning_rate", "0.5"]
    main(args("second", "--max_steps", "2", "--save_strategy", "no", *resume))
    resumed, done = (load_file(f / "adapter_model.safetensors") for f in (folder / "second", checkpoint))
    assert resumed.keys() == done.keys() and all(torch.equal(resumed[k], done[k]) for k in done)


@pytest.mark.parametrize("method", METHODS)
def test_an_empty_batch_gets_a_clear_error(method):
    model = make_adapted(method)
    ids, mask = batch()
    empty = dict(input_ids=ids[:0], attention_mask=mask[:0], task_ids=torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match=r"The batch is empty \(input shape \(0, 7\)\)"):
        model(**empty)
    with pytest.raises(ValueError, match=r"The batch is empty"):
        model.generate(**empty, max_new_tokens=2)


def test_a_rotary_embedding_that_is_not_a_cos_sin_pair_is_refused_at_get_peft_model():
    class Rotary:
        """Some other rotary form, e.g. a complex-valued frequency tensor."""

    base = tiny_model()
    for layer in base.model.layers:
        layer.self_attn.register_forward_pre_hook(
            lambda m, args, kwargs: (args, {**kwargs, "position_embeddings": Rotary()}), with_kwargs=True
        )
    with pytest.raises(ValueError, match=r"rotary embedding that is not a \(cos, sin\) pair .*got Rotary"):
        get_peft_model(base, TALoraConfig(task_type="CAUSAL_LM", num_tasks=2))
    assert not any(hasattr(m, "_talora_site") for m in base.modules()), "a refused model is left as it was"


def test_layers_with_different_head_counts_are_refused_with_a_clear_error():
    model = make_adapted("talora")
    model.base_model._sites[1].num_heads = 8  # as a model with 4 heads in layer 0 and 8 in layer 1 would read
    with pytest.raises(ValueError, match=r"same number of heads in every adapted layer, found \[4, 8\]"):
        model.add_adapter("other", TALoraConfig(task_type="CAUSAL_LM", num_tasks=2, num_virtual_tokens=4, r=4))
    assert "other" not in model.peft_config
