"""Fuzzing the user-facing surface of both methods with bad inputs, generated from fixed seeds.

Four kinds of input (issue 13): configs, task ids, adapter files, call sequences. Every case
asserts one of two outcomes: a ``ValueError``/``TypeError`` whose message names the offending
argument (or file), or a result equal to the well-formed equivalent's. Saves that fail must leave
every file saved before byte-identical. Each generated input is its own test case; their number is
reported in ``docs/faq.md`` and checked by :func:`test_docs_report_the_number_of_cases`.
"""

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import peft.peft_model
import pytest
import torch
from conftest import batch, tiny_model
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_talora import MTLLoraConfig, TALoraConfig

METHODS = ("ta-lora", "mtl-lora")
TASKS = ["a", "b", "c"]
ROOT = Path(__file__).resolve().parents[1]
NAN, INF = float("nan"), float("inf")


def make_config(method: str, **kwargs):
    base = dict(task_type="CAUSAL_LM", task_names=TASKS)
    if method == "ta-lora":
        return TALoraConfig(**{**base, "num_virtual_tokens": 4, "r": 4, **kwargs})
    return MTLLoraConfig(**{**base, "r": 4, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"], **kwargs})


def make_model(method: str, seed: int = 0, **kwargs):
    """An adapted tiny Llama whose adapter weights are random (seeded), in eval mode."""
    model = get_peft_model(tiny_model(), make_config(method, **kwargs)).eval()
    randomize(model, seed)
    return model


def randomize(model, seed: int, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "talora_banks" in name or "mtllora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def outputs(model, task_ids=("c", "a", "b")):
    input_ids, mask = batch(batch_size=len(task_ids))
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask, task_ids=list(task_ids)).logits


def snapshot(folder) -> dict:
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_names(error: BaseException, *names: str) -> None:
    message = str(error)
    assert any(name in message for name in names), f"{names} not named in: {message}"


# ------------------------------------------------------------------ configs
# For each field: bad values and the error each must raise. The field is named in every message.

COMMON_FIELDS = {
    "num_tasks": [
        (0, ValueError),
        (-1, ValueError),
        (2.0, TypeError),
        (2.5, TypeError),
        ("3", TypeError),
        (True, TypeError),
        ([3], TypeError),
        (NAN, TypeError),
        (np.float64(3.0), TypeError),
    ],
    "task_names": [
        ("trec", TypeError),
        (["a", "a"], ValueError),
        (["a", ""], ValueError),
        (["a", 1], TypeError),
        ([None], TypeError),
        ({"a", "b"}, TypeError),
        (5, TypeError),
        ([], ValueError),
        ({"a": 0}, TypeError),
    ],
    "inference_mode": [("yes", TypeError), (1, TypeError), (None, TypeError)],
    "base_model_name_or_path": [(5, TypeError), (["model"], TypeError)],
    "revision": [(3, TypeError)],
}
INT, POSITIVE, NON_NEGATIVE = "int", "positive", "non-negative"
BAD = {
    INT: [
        (0, ValueError),
        (-3, ValueError),
        (2.0, TypeError),
        (1.5, TypeError),
        ("10", TypeError),
        (True, TypeError),
        (None, TypeError),
        ([4], TypeError),
        (NAN, TypeError),
        (np.float32(4.0), TypeError),
    ],
    POSITIVE: [
        (0, ValueError),
        (-1.0, ValueError),
        (NAN, ValueError),
        (INF, ValueError),
        (-INF, ValueError),
        ("1.0", TypeError),
        (True, TypeError),
        (None, TypeError),
        ([1.0], TypeError),
        (1j, TypeError),
    ],
    NON_NEGATIVE: [
        (-1e-3, ValueError),
        (NAN, ValueError),
        (INF, ValueError),
        ("0", TypeError),
        (False, TypeError),
        (None, TypeError),
    ],
}
METHOD_FIELDS = {
    "ta-lora": {
        "num_virtual_tokens": BAD[INT],
        "r": BAD[INT],
        "alpha": BAD[POSITIVE],
        "orthogonality_weight": BAD[NON_NEGATIVE],
        "prompt_init_std": BAD[NON_NEGATIVE],
        "adapter_layers": [
            (1, TypeError),
            ([0.7], TypeError),
            ([], ValueError),
            ([0, 0], ValueError),
            ("0", TypeError),
            ([True], TypeError),
            ([None], TypeError),
            ((0.5,), TypeError),
            ({0: 1}, TypeError),
        ],
    },
    "mtl-lora": {
        "r": BAD[INT],
        "num_up_projections": BAD[INT],
        "lora_alpha": BAD[POSITIVE],
        "temperature": BAD[POSITIVE],
        "lora_dropout": BAD[NON_NEGATIVE] + [(1.0, ValueError), (1, ValueError)],
        "target_modules": [
            ("", ValueError),
            ([], ValueError),
            (["q_proj", 3], TypeError),
            (5, TypeError),
            ([""], ValueError),
            ({"q_proj": 1}, TypeError),
        ],
        "exclude_modules": [(5, TypeError), ([3], TypeError), ("", ValueError)],
        "layers_to_transform": [
            ([0.5], TypeError),
            (-1, ValueError),
            ([-1], ValueError),
            ("1", TypeError),
            (True, TypeError),
            (1.0, TypeError),
        ],
        "layers_pattern": [(5, TypeError), ([1], TypeError)],
        "modules_to_save": [("lm_head", TypeError), ([1], TypeError), (3, TypeError)],
    },
}
CONFIG_CASES = [
    (method, name, value, error)
    for method in METHODS
    for name, values in {**COMMON_FIELDS, **METHOD_FIELDS[method]}.items()
    for value, error in values
]


@pytest.mark.parametrize(
    "method, name, value, error", CONFIG_CASES, ids=[f"{m}-{n}={v!r}" for m, n, v, _ in CONFIG_CASES]
)
def test_bad_config_field(method, name, value, error):
    extra = {"num_tasks": None} if name == "task_names" else {}
    if name == "num_tasks":
        extra = {"task_names": None}
    if name == "layers_pattern":
        extra = {"layers_to_transform": [0]}
    with pytest.raises(error) as info:
        make_config(method, **{name: value, **extra})
    assert_names(info.value, name)
    assert repr(value)[:20] in str(info.value) or name in ("task_names",), "the message shows the value"


# Well-formed equivalents: numpy scalars, ints for floats, tuples and sets for lists.
EQUIVALENT_CONFIGS = [
    ("ta-lora", dict(r=np.int64(4), num_virtual_tokens=np.int32(4)), dict(r=4, num_virtual_tokens=4)),
    (
        "ta-lora",
        dict(alpha=8, orthogonality_weight=0, prompt_init_std=1),
        dict(alpha=8.0, orthogonality_weight=0.0, prompt_init_std=1.0),
    ),
    ("ta-lora", dict(adapter_layers=(np.int64(0), -1)), dict(adapter_layers=[0, -1])),
    ("ta-lora", dict(task_names=tuple(TASKS), num_tasks=np.int64(3)), dict(task_names=TASKS)),
    ("ta-lora", dict(alpha=np.float32(2.0)), dict(alpha=2.0)),
    ("mtl-lora", dict(r=np.int64(4), num_up_projections=np.int16(3)), dict(r=4, num_up_projections=3)),
    (
        "mtl-lora",
        dict(lora_alpha=16, temperature=1, lora_dropout=0),
        dict(lora_alpha=16.0, temperature=1.0, lora_dropout=0.0),
    ),
    ("mtl-lora", dict(target_modules=("v_proj", "q_proj")), dict(target_modules=["q_proj", "v_proj"])),
    ("mtl-lora", dict(target_modules={"q_proj", "v_proj"}), dict(target_modules=["q_proj", "v_proj"])),
    (
        "mtl-lora",
        dict(target_modules=["q_proj"], layers_to_transform=(np.int64(1),)),
        dict(target_modules=["q_proj"], layers_to_transform=[1]),
    ),
    ("mtl-lora", dict(task_names=tuple(TASKS)), dict(task_names=TASKS)),
]


@pytest.mark.parametrize("method, odd, plain", EQUIVALENT_CONFIGS, ids=[str(i) for i in range(len(EQUIVALENT_CONFIGS))])
def test_equivalent_config(method, odd, plain, tmp_path):
    odd_config, plain_config = make_config(method, **odd), make_config(method, **plain)
    assert odd_config.to_dict() == plain_config.to_dict()
    odd_config.save_pretrained(tmp_path)  # it serialises (numpy scalars would not) and loads back equal
    assert type(plain_config).from_pretrained(tmp_path).to_dict() == plain_config.to_dict()


# ------------------------------------------------------------------ task ids
# Generated from a seed: bad task ids for a 3-task adapter and a batch of 3, and equivalent spellings.


def _bad_task_ids(rng: random.Random) -> list:
    fixed = [
        None,
        3,
        -1,
        7,
        [0, 1, 3],
        [0, -1, 2],
        "d",
        "A",
        ["a", "b", "d"],
        ["a", "b"],
        [0, 1],
        [0, 1, 2, 0],
        [[0, 1, 2]],
        [0.0, 1.0, 2.0],
        1.0,
        [True, False, True],
        torch.tensor([0.0, 1.0, 2.0]),
        torch.tensor([[0, 1, 2]]),
        torch.tensor([0, 1]),
        torch.tensor([True, False, True]),
        np.array([0.5, 1, 2]),
        np.array([[0, 1, 2]]),
        {"a": 0},
        {0, 1, 2},
        object(),
        [None, 0, 1],
        ["a", None, "b"],
        [],
        "",
        [1j, 0, 1],
        torch.tensor([0, 1, 5]),
        np.int64(9),
        [np.int64(0), np.int64(3), 1],
    ]
    generated = []
    for _ in range(16):
        ids = [rng.randrange(3) for _ in range(3)]
        spot = rng.randrange(3)
        kind = rng.choice(["range", "name", "float", "length"])
        if kind == "range":
            ids[spot] = rng.choice([3, 4, 100, -1, -7])
        elif kind == "name":
            ids = [TASKS[i] for i in ids]
            ids[spot] = rng.choice(["d", "A", " a", "a ", "task 0", "0"])
        elif kind == "float":
            ids[spot] = ids[spot] + rng.choice([0.5, 0.0])
            ids = torch.tensor(ids, dtype=torch.float32) if rng.random() < 0.5 else ids
        else:
            ids = ids + [0] * rng.randint(1, 3) if rng.random() < 0.5 else ids[: rng.randint(1, 2)]
        generated.append(ids)
    return fixed + generated


def _equivalents(rng: random.Random) -> list[tuple]:
    """(spelling, canonical ids): each spelling must route exactly as ``torch.tensor(canonical)``."""
    cases = []
    for _ in range(14):
        ids = [rng.randrange(3) for _ in range(3)]
        spell = rng.choice(["int32", "list", "tuple", "numpy", "numpy-scalars", "names", "mixed", "numpy-names"])
        spelled = {
            "int32": torch.tensor(ids, dtype=torch.int32),
            "list": list(ids),
            "tuple": tuple(ids),
            "numpy": np.array(ids),
            "numpy-scalars": [np.int64(i) for i in ids],
            "names": [TASKS[i] for i in ids],
            "mixed": [TASKS[i] if k % 2 else i for k, i in enumerate(ids)],
            "numpy-names": np.array([TASKS[i] for i in ids]),
        }[spell]
        cases.append((spelled, ids))
    for task in range(3):  # one id or name for the whole batch
        cases += [(task, [task] * 3), (TASKS[task], [task] * 3), (np.int64(task), [task] * 3)]
    return cases


BAD_TASK_IDS = [(m, ids) for m in METHODS for ids in _bad_task_ids(random.Random(f"ids-{m}"))]
EQUIVALENT_TASK_IDS = [(m, *case) for m in METHODS for case in _equivalents(random.Random(f"same-{m}"))]


@pytest.fixture(scope="module")
def models():
    return {method: make_model(method, seed=3) for method in METHODS}


@pytest.mark.parametrize("method, task_ids", BAD_TASK_IDS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(BAD_TASK_IDS)])
def test_bad_task_ids(models, method, task_ids):
    model = models[method]
    reference = outputs(model)
    input_ids, mask = batch(batch_size=3)
    with pytest.raises((ValueError, TypeError)) as info:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=mask, task_ids=task_ids)
    assert_names(info.value, "task_ids", "task id", "task name")
    assert torch.equal(outputs(model), reference), "a failed call leaves nothing behind"


@pytest.mark.parametrize(
    "method, spelled, ids", EQUIVALENT_TASK_IDS, ids=[f"{m}-{i}" for i, (m, *_) in enumerate(EQUIVALENT_TASK_IDS)]
)
def test_equivalent_task_ids(models, method, spelled, ids):
    model = models[method]
    input_ids, mask = batch(batch_size=3)
    with torch.no_grad():
        got = model(input_ids=input_ids, attention_mask=mask, task_ids=spelled).logits
        expected = model(input_ids=input_ids, attention_mask=mask, task_ids=torch.tensor(ids)).logits
    assert torch.equal(got, expected)


# ------------------------------------------------------------------ adapter files
# Damage applied to a good saved adapter folder; each load must fail naming the problem.


def _tensors(folder):
    return load_file(folder / "adapter_model.safetensors")


def _set_tensors(folder, tensors):
    save_file(tensors, folder / "adapter_model.safetensors")


def _edit_config(**changes):
    def edit(folder):
        path = folder / "adapter_config.json"
        saved = json.loads(path.read_text())
        for key, value in changes.items():
            if value is _DROP:
                saved.pop(key, None)
            else:
                saved[key] = value
        path.write_text(json.dumps(saved))

    return edit


_DROP = object()


def _truncate(fraction):
    def damage(folder):
        path = folder / "adapter_model.safetensors"
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])

    return damage


def _poison(value, which):
    def damage(folder):
        tensors = _tensors(folder)
        name = sorted(tensors)[which]
        tensors[name].view(-1)[0] = value
        _set_tensors(folder, tensors)

    return damage


def _drop_tensor(folder):
    tensors = _tensors(folder)
    del tensors[sorted(tensors)[0]]
    _set_tensors(folder, tensors)


def _extra_tensor(folder):
    tensors = _tensors(folder)
    name = sorted(tensors)[0].rsplit(".", 1)[0] + ".extra"
    _set_tensors(folder, {**tensors, name: torch.zeros(2)})


def _other_method(method):
    return "MTLLORA" if method == "ta-lora" else "TALORA"


# (name, damage(folder, method) -> None, pattern the message must match)
FILE_CASES = [
    *[
        (f"truncated-{f}", lambda d, m, f=f: _truncate(f)(d), r"adapter_model\.safetensors is truncated")
        for f in (0.0, 0.01, 0.3, 0.5, 0.9, 0.999)
    ],
    (
        "garbage-weights",
        lambda d, m: (d / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 40),
        r"adapter_model\.safetensors is truncated or not a safetensors file",
    ),
    ("no-weights", lambda d, m: (d / "adapter_model.safetensors").unlink(), r"no weights file"),
    ("no-config", lambda d, m: (d / "adapter_config.json").unlink(), r"adapter_config\.json"),
    (
        "truncated-config",
        lambda d, m: (d / "adapter_config.json").write_text('{"peft_type": "TA'),
        r"adapter_config\.json is not valid JSON",
    ),
    (
        "config-not-an-object",
        lambda d, m: (d / "adapter_config.json").write_text("[1, 2]"),
        r"adapter_config\.json holds list",
    ),
    ("peft-type-nope", lambda d, m: _edit_config(peft_type="NOPE")(d), r"'NOPE', which no installed PEFT method"),
    ("peft-type-missing", lambda d, m: _edit_config(peft_type=_DROP)(d), r"has no \"peft_type\""),
    ("relabelled-lora", lambda d, m: _edit_config(peft_type="LORA")(d), r"'LORA', but its keys"),
    ("relabelled-other-method", lambda d, m: _edit_config(peft_type=_other_method(m))(d), r"but its keys"),
    ("relabelled-prompt-tuning", lambda d, m: _edit_config(peft_type="PROMPT_TUNING")(d), r"but its keys"),
    ("nan-first-tensor", lambda d, m: _poison(NAN, 0)(d), r"non-finite values"),
    ("inf-last-tensor", lambda d, m: _poison(INF, -1)(d), r"non-finite values"),
    ("missing-tensor", lambda d, m: _drop_tensor(d), r"lacks"),
    ("unknown-tensor", lambda d, m: _extra_tensor(d), r"'extra'|extra"),
    (
        "more-tasks-in-config",
        lambda d, m: _edit_config(task_names=TASKS + ["d"], num_tasks=4)(d),
        r"does not fit this model.*tasks",
    ),
    (
        "fewer-tasks-in-config",
        lambda d, m: _edit_config(task_names=TASKS[:2], num_tasks=2)(d),
        r"does not fit this model.*tasks",
    ),
    ("config-r-float", lambda d, m: _edit_config(r=2.5)(d), r"\.r must be an int >= 1 \(got 2\.5"),
    (
        "config-names-string",
        lambda d, m: _edit_config(task_names="abc", num_tasks=_DROP)(d),
        r"task_names must be a list of names, not the string 'abc'",
    ),
    (
        "config-nan-scaling",
        lambda d, m: _edit_config(**{"alpha" if m == "ta-lora" else "lora_alpha": NAN})(d),
        r"alpha must be a finite number",
    ),
    ("config-tasks-disagree", lambda d, m: _edit_config(num_tasks=5)(d), r"num_tasks=5 disagrees"),
    (
        "config-other-base",
        lambda d, m: _edit_config(base_model_shape={"model_type": "qwen2", "num_key_value_heads": 4})(d),
        r"saved from another base model \(model_type: 'qwen2' in the file, 'llama' here; num_key_value_heads: 4",
    ),
    (
        "config-base-shape-not-a-dict",
        lambda d, m: _edit_config(base_model_shape=[64, 2])(d),
        r"base_model_shape must be None or a dict",
    ),
]
FILE_CASE_IDS = [(m, name) for m in METHODS for name, *_ in FILE_CASES]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A good adapter folder per method."""
    root = tmp_path_factory.mktemp("saved")
    for method in METHODS:
        make_model(method, seed=1).save_pretrained(root / method)
    return root


@pytest.mark.parametrize("method, case", FILE_CASE_IDS, ids=[f"{m}-{c}" for m, c in FILE_CASE_IDS])
def test_damaged_adapter_files(saved, tmp_path, method, case):
    _, damage, pattern = next(c for c in FILE_CASES if c[0] == case)
    folder = tmp_path / "adapter"
    shutil.copytree(saved / method, folder)
    damage(folder, method)
    before = snapshot(folder)
    with pytest.raises((ValueError, TypeError)) as info:
        PeftModel.from_pretrained(tiny_model(), folder)
    assert re.search(pattern, str(info.value), re.S), str(info.value)
    model = make_model(method, seed=2)
    expected = outputs(model)
    with pytest.raises((ValueError, TypeError)) as again:
        model.load_adapter(folder, adapter_name="other")
    assert re.search(pattern, str(again.value), re.S), str(again.value)
    assert list(model.peft_config) == ["default"], "a failed load_adapter leaves no half-loaded adapter behind"
    assert torch.equal(outputs(model), expected), "a failed load leaves the model's outputs as they were"
    assert snapshot(folder) == before, "loading never writes"


OTHER_BASES = {
    "width": (lambda: tiny_model("llama", hidden_size=32, intermediate_size=48), "does not fit this model"),
    "kv-heads": (lambda: tiny_model("llama", num_key_value_heads=4), "another base model|does not fit this model"),
    "family": (lambda: tiny_model("gpt2"), "another base model|Target modules .* not found"),
    "depth": (lambda: tiny_model("llama", num_hidden_layers=3), "another base model|does not fit this model"),
}
OTHER_BASE_CASES = [(m, kind) for m in METHODS for kind in OTHER_BASES]


@pytest.mark.parametrize("method, kind", OTHER_BASE_CASES, ids=[f"{m}-{k}" for m, k in OTHER_BASE_CASES])
def test_loading_onto_another_base(saved, method, kind):
    """Tensor shapes or the recorded base_model_shape tell the bases apart, KV heads and family included."""
    make_base, pattern = OTHER_BASES[kind]
    with pytest.raises(ValueError, match=pattern) as info:
        PeftModel.from_pretrained(make_base(), saved / method)
    assert re.search(r"in the file|not found in the base model", str(info.value))


# ------------------------------------------------------------------ call sequences
# Random sequences of saves (good, failing at the weights or config write, with NaN weights, exports with
# good and bad task lists), weight changes and added tasks. Invariant: the folder always holds exactly
# the last successful save, byte for byte, and loads with that save's outputs.


def _fail_weights(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"partial")
    raise OSError(28, "No space left on device")


OPS = [
    "save",
    "save",
    "fail-weights",
    "fail-config",
    "nan",
    "export",
    "bad-export",
    "numpy-export",
    "train",
    "add-task",
    "bad-add-task",
    "bad-selected",
]
SEQUENCES = [(m, seed) for m in METHODS for seed in range(5)]
CALLS_PER_SEQUENCE = 9


@pytest.mark.parametrize("method, seed", SEQUENCES, ids=[f"{m}-{s}" for m, s in SEQUENCES])
def test_call_sequence(method, seed, tmp_path, monkeypatch):
    rng = random.Random(f"{method}-{seed}")
    model = make_model(method, seed=seed)
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("user file")
    model.save_pretrained(folder)
    good = (snapshot(folder), outputs(model), list(model.peft_config["default"].task_names))

    def check():
        assert snapshot(folder) == good[0], "a file saved before changed"
        loaded = PeftModel.from_pretrained(tiny_model(), folder)
        assert loaded.peft_config["default"].task_names == good[2]
        assert torch.equal(outputs(loaded), good[1])

    for step in range(CALLS_PER_SEQUENCE):
        op = rng.choice(OPS)
        names = model.peft_config["default"].task_names
        if op == "save":
            model.save_pretrained(folder)
            good = (snapshot(folder), outputs(model), list(names))
        elif op in ("fail-weights", "fail-config"):
            with monkeypatch.context() as patch:
                if op == "fail-weights":
                    patch.setattr(peft.peft_model, "safe_save_file", _fail_weights)
                else:
                    patch.setattr(
                        type(model.peft_config["default"]),
                        "save_pretrained",
                        lambda self, d, **k: (_ for _ in ()).throw(OSError(122, "Disk quota exceeded")),
                    )
                with pytest.raises(OSError):
                    model.save_pretrained(folder, tasks=rng.choice([None, ["a"]]))
        elif op == "nan":
            param = rng.choice([p for n, p in model.named_parameters() if "talora_banks" in n or "mtllora_" in n])
            with torch.no_grad():
                kept = param.detach().clone()
                param.view(-1)[rng.randrange(param.numel())] = rng.choice([NAN, INF, -INF])
                with pytest.raises(ValueError, match="non-finite values .*Nothing was written"):
                    model.save_pretrained(folder)
                param.copy_(kept)
        elif op in ("export", "numpy-export"):
            chosen = rng.sample(range(len(names)), rng.randint(1, len(names)))
            spelled = [np.int64(i) for i in chosen] if op == "numpy-export" else [names[i] for i in chosen]
            model.save_pretrained(tmp_path / "export", tasks=spelled)
            model.save_pretrained(tmp_path / "export-plain", tasks=chosen)
            exported = snapshot(tmp_path / "export")
            plain = snapshot(tmp_path / "export-plain")
            assert exported["adapter_model.safetensors"] == plain["adapter_model.safetensors"]
            assert exported["adapter_config.json"] == plain["adapter_config.json"]
            loaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "export")
            ids = [names[i] for i in chosen]
            assert torch.equal(outputs(loaded, ids), outputs(model, ids))
        elif op == "bad-export":
            bad = rng.choice([["zz"], [len(names)], [], ["a", "a"], [0, "a"], [True], "b" * 3, [1.0], {"a": 1}])
            with pytest.raises((ValueError, TypeError)) as info:
                model.save_pretrained(folder, tasks=bad)
            assert_names(info.value, "task")
        elif op == "train":
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "talora_banks" in n or "mtllora_" in n:
                        p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(step)) * 0.01)
        elif op == "add-task":
            model.add_tasks([f"new{step}"], freeze=rng.random() < 0.5)
        elif op == "bad-add-task":
            before = list(names)
            bad = rng.choice([["a"], [""], [3], 2.5, None, ["x", "x"], "", {"x": 1}, [None]])
            with pytest.raises((ValueError, TypeError)) as info:
                model.add_tasks(bad)
            assert_names(info.value, "add_tasks", "task")
            assert model.peft_config["default"].task_names == before, "a refused add_tasks changes nothing"
        elif op == "bad-selected":
            with pytest.raises(ValueError, match="selected_adapters"):
                model.save_pretrained(folder, selected_adapters=["nope"])
        check()


def test_deleted_last_adapter_then_save_forward_generate(tmp_path):
    input_ids, mask = batch(batch_size=3)
    for method in METHODS:
        model = make_model(method)
        model.save_pretrained(tmp_path / method)
        before = snapshot(tmp_path / method)
        model.delete_adapter("default")
        with pytest.raises(ValueError, match="no adapter left to save"):
            model.save_pretrained(tmp_path / method)
        assert snapshot(tmp_path / method) == before
        for call in (
            lambda model=model: model(input_ids=input_ids, attention_mask=mask, task_ids=[0, 1, 2]),
            lambda model=model: model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=2),
        ):
            with pytest.raises(ValueError, match="no adapter left: 'default' was its last one.*add_adapter"):
                call()


# ------------------------------------------------------------------ the count reported in the docs

CASE_COUNTS = {
    "configs": len(CONFIG_CASES) + len(EQUIVALENT_CONFIGS),
    "task ids": len(BAD_TASK_IDS) + len(EQUIVALENT_TASK_IDS),
    "files": len(FILE_CASE_IDS) + len(OTHER_BASE_CASES),
    # + each sequence's first save; + save, forward and generate after deleting the last adapter
    "calls in random sequences": len(SEQUENCES) * (CALLS_PER_SEQUENCE + 1) + 3 * len(METHODS),
}


def test_docs_report_the_number_of_cases():
    faq = " ".join((ROOT / "docs" / "faq.md").read_text().split())  # line breaks as spaces
    total = sum(CASE_COUNTS.values())
    found = re.search(r"fuzz suite.*?runs (\d+) cases", faq, re.S | re.I)
    assert found, "docs/faq.md should say how many cases tests/test_fuzz.py runs"
    assert int(found.group(1)) == total, f"docs say {found.group(1)} cases, the suite runs {total}: {CASE_COUNTS}"
    for kind, count in CASE_COUNTS.items():
        assert f"{count} {kind}" in faq, f"docs/faq.md should list '{count} {kind}'"
