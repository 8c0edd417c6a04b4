"""Data helpers: task-name encoding, the causal-LM collator, tokenisation for Trainer, k-shot selection."""

import re

import datasets
import pytest
import torch
from conftest import tiny_model
from datasets import Dataset
from peft import get_peft_model
from talora_text import ids, tiny_tokenizer

from peft_talora import TALoraConfig
from peft_talora.training.collator import MultiTaskDataCollator, TaskIdEncoder, k_shot, tokenize_for_causal_lm

TASKS = ["colour", "answer", "topic"]
EOS, PAD = 2, 0


def config():
    return TALoraConfig(task_type="CAUSAL_LM", task_names=TASKS, num_virtual_tokens=2, r=2)


# ----------------------------------------------------------------------------- task ids
def test_task_id_encoder_maps_names_and_ids_from_config_and_model():
    encoder = TaskIdEncoder.from_config(config())
    assert encoder.encode(["topic", "colour", 1, "answer"]) == [2, 0, 1, 1]
    assert encoder.encode_one("answer") == 1 and encoder.encode_one(2) == 2
    model = get_peft_model(tiny_model(), config())
    assert TaskIdEncoder.from_config(model).encode(["topic"]) == [2]
    assert TaskIdEncoder.from_config(model.base_model).encode(["answer"]) == [1]


def test_unknown_task_name_error_names_it_and_the_valid_tasks():
    encoder = TaskIdEncoder.from_config(config())
    expected = "Unknown task name 'sports'; valid tasks are ids 0..2 or names ['colour', 'answer', 'topic']."
    with pytest.raises(ValueError, match=re.escape(expected)):
        encoder.encode(["colour", "sports"])
    with pytest.raises(ValueError, match=re.escape("Unknown task id(s) [3]; valid tasks are ids 0..2")):
        encoder.encode([0, 3])
    with pytest.raises(TypeError, match="TALoraConfig"):
        TaskIdEncoder.from_config(object())


def test_encode_dataset_turns_a_name_column_into_ints():
    dataset = Dataset.from_dict({"x": [1, 2, 3], "task_ids": ["topic", "colour", "answer"]})
    encoded = TaskIdEncoder.from_config(config()).encode_dataset(dataset)
    assert encoded["task_ids"][:] == [2, 0, 1] and encoded.features["task_ids"].dtype == "int64"
    with pytest.raises(ValueError, match="Unknown task name 'nope'"):
        TaskIdEncoder(TASKS).encode_dataset(Dataset.from_dict({"task_ids": ["nope"]}))


# ----------------------------------------------------------------------------- collator
def test_collator_from_text_masks_prompt_pads_right_and_keeps_task_ids():
    collate = MultiTaskDataCollator(tokenizer=tiny_tokenizer(), task_names=config())
    features = [
        {"prompt": "question red", "completion": "yes", "task_ids": "answer"},
        {"prompt": "question", "completion": "blue", "task_ids": 0},
    ]
    batch = collate(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "task_ids"}
    assert batch["input_ids"].tolist() == [ids("question", "red", "yes") + [EOS], ids("question", "blue") + [EOS, PAD]]
    assert batch["labels"].tolist() == [[-100, -100] + ids("yes") + [EOS], [-100] + ids("blue") + [EOS, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["task_ids"].dtype == torch.long and batch["task_ids"].tolist() == [1, 0]


def test_collator_from_tokens_prompt_length_labels_and_left_padding():
    collate = MultiTaskDataCollator(tokenizer=tiny_tokenizer(), padding_side="left")
    batch = collate(
        [
            {"input_ids": [5, 6, 7, 8], "prompt_length": 3, "task_ids": 2},
            {"input_ids": [9, 10], "prompt_length": 1, "task_ids": torch.tensor(0)},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [PAD, PAD, 9, 10]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 8], [-100, -100, -100, 10]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert batch["task_ids"].tolist() == [2, 0]
    given = MultiTaskDataCollator(pad_token_id=PAD, pad_to_multiple_of=4)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}]
    )
    assert given["labels"].tolist() == [[-100, 6, 7, -100]] and "task_ids" not in given


def test_collator_pads_with_eos_when_the_tokenizer_has_no_pad_token():
    batch = MultiTaskDataCollator(tokenizer=tiny_tokenizer(pad=False))(
        [{"prompt": "question", "completion": "yes no"}, {"prompt": "question", "completion": "no"}]
    )
    assert batch["input_ids"][1].tolist() == ids("question", "no") + [EOS, EOS]
    assert batch["labels"][1].tolist() == [-100] + ids("no") + [EOS, -100]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0]


def test_collator_errors_on_unknown_names_and_names_without_task_names():
    features = [{"input_ids": [5], "task_ids": "sports"}]
    with pytest.raises(ValueError, match=re.escape("Unknown task name 'sports'; valid tasks are ids 0..2 or names")):
        MultiTaskDataCollator(pad_token_id=0, task_names=TASKS)(features)
    with pytest.raises(ValueError, match="pass task_names="):
        MultiTaskDataCollator(pad_token_id=0)(features)
    with pytest.raises(ValueError, match="tokenize_for_causal_lm"):
        MultiTaskDataCollator(pad_token_id=0)([{"text": "question"}])


@pytest.mark.parametrize("value", [1.7, True, 1.0], ids=["float", "bool", "integral-float"])
def test_collator_refuses_task_ids_that_are_not_ints(value):
    """A float or bool task id is refused (as forward refuses it), not truncated to another task."""
    features = [{"input_ids": [5, 6], "task_ids": 0}, {"input_ids": [7], "task_ids": value}]
    with pytest.raises(ValueError, match=rf"task_ids must be int task ids .*got {value!r} \({type(value).__name__}\)"):
        MultiTaskDataCollator(pad_token_id=0)(features)
    assert MultiTaskDataCollator(pad_token_id=0)([features[0]])["task_ids"].tolist() == [0]


def test_task_id_encoder_refuses_a_count_that_disagrees_with_the_names():
    with pytest.raises(ValueError, match=r"num_tasks=5 and 3 task_names; give one of them"):
        TaskIdEncoder(task_names=TASKS, num_tasks=5)


# ----------------------------------------------------------------------------- tokenisation
def raw_dataset():
    return Dataset.from_dict(
        {
            "prompt": ["question red", "question", "question blue green"],
            "completion": ["yes", "no no", "A"],
            "task_ids": ["answer", "topic", "colour"],
            "extra": [1, 2, 3],
        }
    )


def test_tokenize_for_causal_lm_columns_labels_and_task_ids():
    out = tokenize_for_causal_lm(raw_dataset(), tiny_tokenizer(), task_names=TASKS)
    assert sorted(out.column_names) == ["attention_mask", "input_ids", "labels", "task_ids"]
    assert out["input_ids"][:] == [
        ids("question", "red", "yes") + [EOS],
        ids("question", "no", "no") + [EOS],
        ids("question", "blue", "green", "A") + [EOS],
    ]
    assert out["labels"][:] == [
        [-100, -100] + ids("yes") + [EOS],
        [-100] + ids("no", "no") + [EOS],
        [-100] * 3 + ids("A") + [EOS],
    ]
    assert out["task_ids"][:] == [1, 2, 0]
    padded = tokenize_for_causal_lm(raw_dataset(), tiny_tokenizer(), task_names=TASKS, padding="longest")
    assert {len(r) for r in padded["input_ids"]} == {5}
    assert padded["labels"][0] == [-100, -100] + ids("yes") + [EOS, -100]
    assert padded["attention_mask"][1] == [1, 1, 1, 1, 0]
    with pytest.warns(UserWarning, match=r"1 of 3 examples lost every target token to max_length=3"):
        kept = tokenize_for_causal_lm(
            raw_dataset(), tiny_tokenizer(), task_names=TASKS, remove_columns=False, max_length=3
        )
    assert kept["extra"][:] == [1, 2, 3] and kept["task_ids"][:] == [1, 2, 0]
    assert kept["input_ids"][2] == ids("question", "blue", "green") and kept["labels"][2] == [-100] * 3
    # task names stored as large strings (what datasets 5 reads from a CSV): the ids come out as ints all the same
    names = raw_dataset().cast_column("task_ids", datasets.Value("large_string"))
    for remove in (True, False):
        out = tokenize_for_causal_lm(names, tiny_tokenizer(), task_names=TASKS, remove_columns=remove)
        assert out.features["task_ids"].dtype == "int64" and out["task_ids"][:] == [1, 2, 0]


def test_tokenize_for_causal_lm_rejects_unknown_task_names():
    bad = raw_dataset().map(lambda row: {"task_ids": "sports" if row["extra"] == 2 else row["task_ids"]})
    with pytest.raises(ValueError, match=re.escape("Unknown task name 'sports'; valid tasks are ids 0..2 or names")):
        tokenize_for_causal_lm(bad, tiny_tokenizer(), task_names=TASKS)
    with pytest.raises(ValueError, match="has no 'completion' column"):
        tokenize_for_causal_lm(raw_dataset().remove_columns("completion"), tiny_tokenizer())


# ----------------------------------------------------------------------------- k-shot
def labelled(n_per_label=(10, 6, 3)):
    labels = [label for label, n in enumerate(n_per_label) for _ in range(n)]
    return Dataset.from_dict({"text": [f"t{i}" for i in range(len(labels))], "label": labels})


def test_k_shot_is_deterministic_and_stratified():
    data = labelled()
    first, again = k_shot(data, 3, seed=7), k_shot(data, 3, seed=7)
    assert first["text"][:] == again["text"][:]
    assert first["label"][:] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len(set(first["text"][:])) == 9
    others = {tuple(k_shot(data, 3, seed=s)["text"][:]) for s in range(5)}
    assert len(others) > 1  # the seed matters
    as_list = k_shot([{"y": "b"}, {"y": "a"}, {"y": "b"}, {"y": "a"}], 1, label_column="y", seed=0)
    assert [row["y"] for row in as_list] == ["a", "b"]


def test_k_shot_error_names_short_labels():
    with pytest.raises(ValueError, match=re.escape("these labels have fewer: 1 (6), 2 (3).")):
        k_shot(labelled(), 8)
    with pytest.raises(ValueError, match="has no 'label' column"):
        k_shot(labelled().rename_column("label", "y"), 2)
