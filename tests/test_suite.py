"""The multi-task data suite: packaged tasks, dedup/split/cache, bring-your-own tasks, prompts, evaluation."""

import re
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from conftest import perturb, tiny_model
from datasets import Dataset, DatasetDict
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
from talora_text import BOS_CHAT_TEMPLATE, ids, tiny_tokenizer

from peft_talora import TALoraConfig
from peft_talora.suite import (
    MIDDLE_MARKER,
    SOURCE_TASKS,
    SPLITS,
    TARGET_TASKS,
    PromptFormatter,
    RegisteredTask,
    TaskSpec,
    deduplicate,
    evaluate_task,
    evaluating,
    format_split,
    generate_answers,
    get_task,
    load_suite,
    load_task,
    match_label,
    register_task,
    registered_task,
    score_choices,
    stratified_split,
    subsample,
    suite_cache_dir,
    task_stats,
    truncate_middle,
    unregister_task,
)
from peft_talora.suite.evaluation import _plain_cache
from peft_talora.training.collator import TaskIdEncoder, tokenize_for_causal_lm

BUILTIN_NAMES = {
    "movie_sentiment", "tweet_sentiment", "amazon_sentiment", "nyt_sentiment", "sms_spam", "trec", "bbc_topic",
    "boolq", "drug_sentiment", "reuters_r8", "pubmedqa", "inews_sentiment",
}  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two real packaged tasks built once into a temporary cache: TREC (many duplicates) and PubMedQA (3 labels)."""
    cache = tmp_path_factory.mktemp("suite")
    return cache, load_suite(["trec", "pubmedqa"], cache_dir=cache, progress=False)


@pytest.fixture
def own_tasks():
    """Register tasks in a test and have them removed afterwards."""
    names = []

    def register(spec, source, **kwargs):
        task = register_task(spec, source, **kwargs)
        names.append(spec.name)
        return task

    yield register
    for name in names:
        unregister_task(name)


def yes_no_dataset(rows_per_label=10, text_column="text", label_column="label", labels=("no", "yes")):
    texts = [f"example {label} number {i}" for label in labels for i in range(rows_per_label)]
    words = [label for label in labels for _ in range(rows_per_label)]
    return Dataset.from_dict({text_column: texts, label_column: words})


YES_NO = TaskSpec(name="my_yes_no", instruction="Answer yes or no.", label_names=["no", "yes"])


# ----------------------------------------------------------------------------- built-in specs (no data read)
def test_the_twelve_builtin_tasks_are_registered_with_well_formed_specs():
    assert len(SOURCE_TASKS) == 8 and len(TARGET_TASKS) == 4
    assert set(SOURCE_TASKS) | set(TARGET_TASKS) == BUILTIN_NAMES
    for name in BUILTIN_NAMES:
        spec, task = get_task(name), registered_task(name)
        assert spec.name == name and callable(task.source)
        assert spec.instruction.strip() and spec.text_field.strip() and spec.description.strip()
        words = [w.lower() for w in spec.label_names]
        assert len(words) >= 2 and len(set(words)) == len(words), name
        # a generated answer maps to one label only: no label word starts another one
        assert not [(a, b) for a in words for b in words if a != b and b.startswith(a)], name
    assert get_task("trec").label_names == ("abbreviation", "entity", "description", "human", "location", "number")
    assert get_task("inews_sentiment").label_names == ("negative", "neutral", "positive")


def test_unknown_task_name_lists_the_registered_tasks():
    with pytest.raises(ValueError, match=r"Unknown task 'sst2'; registered tasks are \[.*'movie_sentiment'"):
        load_task("sst2")


# ----------------------------------------------------------------------------- real packaged data
def test_real_tasks_are_deduplicated_with_disjoint_splits(built):
    _, suite = built
    for name, splits in suite.items():
        assert isinstance(splits, DatasetDict) and list(splits) == list(SPLITS)
        keys = {split: [" ".join(t.split()).casefold() for t in splits[split]["text"][:]] for split in SPLITS}
        for split in SPLITS:
            assert len(set(keys[split])) == len(keys[split]), f"{name}/{split} holds duplicate texts"
        assert not set(keys["train"]) & set(keys["validation"])
        assert not set(keys["train"]) & set(keys["test"])
        assert not set(keys["validation"]) & set(keys["test"])
        spec = get_task(name)
        train = splits["train"]
        assert train.features["label"].names == list(spec.label_names)
        assert set(train["task"][:]) == {name}
        assert train["label_word"][:] == [spec.label_names[i] for i in train["label"][:]]
    trec = suite["trec"]
    assert sum(len(trec[s]) for s in SPLITS) == 5380  # 15,452 lines, mostly repeats
    stats = task_stats("trec", built[0])
    assert stats["rows_read"] == 15452 and stats["duplicates_dropped"] > 10000
    assert sum(len(suite["pubmedqa"][s]) for s in SPLITS) == 500


def test_splits_are_stratified(built):
    _, suite = built
    for name, splits in suite.items():
        num_labels = get_task(name).num_labels
        shares = {s: np.bincount(splits[s]["label"][:], minlength=num_labels) / len(splits[s]) for s in SPLITS}
        for split in ("validation", "test"):
            assert np.abs(shares[split] - shares["train"]).max() < 0.02, (name, split)
        sizes = np.array([len(splits[s]) for s in SPLITS]) / sum(len(splits[s]) for s in SPLITS)
        assert np.allclose(sizes, [0.7, 0.1, 0.2], atol=0.01)


def test_fixed_seed_gives_identical_splits_and_another_seed_does_not(built, tmp_path):
    cache, suite = built
    again = load_task("pubmedqa", cache_dir=tmp_path, progress=False)  # a fresh build elsewhere
    for split in SPLITS:
        assert again[split]["text"][:] == suite["pubmedqa"][split]["text"][:]
    other = load_task("pubmedqa", cache_dir=tmp_path, seed=1, progress=False)
    assert other["test"]["text"][:] != suite["pubmedqa"]["test"]["text"][:]
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    first, second = stratified_split(labels, seed=3), stratified_split(labels, seed=3)
    assert all(np.array_equal(first[s], second[s]) for s in SPLITS)


def test_second_load_reads_the_cache_not_the_source(built, monkeypatch):
    cache, suite = built

    def no_reading(self):
        raise AssertionError(f"the source of {self.name} was read again")

    monkeypatch.setattr(RegisteredTask, "read", no_reading)
    again = load_task("trec", cache_dir=cache, progress=False)
    assert again["test"]["text"][:] == suite["trec"]["test"]["text"][:]
    assert (cache / "trec" / "suite_task.json").is_file()
    with pytest.raises(AssertionError, match="read again"):  # another seed is another build
        load_task("trec", cache_dir=cache, seed=5, progress=False)


def test_default_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFT_TALORA_CACHE", str(tmp_path))
    assert suite_cache_dir() == tmp_path / "suite" / "v2"
    assert suite_cache_dir(tmp_path / "mine") == tmp_path / "mine"


def test_an_interrupted_build_leaves_no_cache_behind(own_tasks, tmp_path, monkeypatch):
    own_tasks(YES_NO, yes_no_dataset())
    original = DatasetDict.save_to_disk

    def crash_half_way(self, path, **kwargs):
        original(self, path, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(DatasetDict, "save_to_disk", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        load_task("my_yes_no", cache_dir=tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(DatasetDict, "save_to_disk", original)
    assert len(load_task("my_yes_no", cache_dir=tmp_path, progress=False)["train"]) == 14


# ----------------------------------------------------------------------------- bring your own task
def test_register_a_dataset_with_string_or_int_labels(own_tasks, tmp_path):
    words = yes_no_dataset(text_column="body", label_column="answer")
    own_tasks(YES_NO, words, text_column="body", label_column="answer")
    splits = load_task("my_yes_no", cache_dir=tmp_path, progress=False)
    assert {len(splits[s]) for s in SPLITS} == {14, 2, 4}
    row = splits["train"][0]
    assert row["label_word"] == ["no", "yes"][row["label"]] and row["text"].startswith(f"example {row['label_word']}")

    ints = Dataset.from_dict({"text": [f"t{i}" for i in range(12)], "label": [0, 1, 2] * 4})
    spec = TaskSpec(name="my_ints", instruction="Which colour?", label_names=["red", "green", "blue"])
    own_tasks(spec, ints)
    assert load_task("my_ints", cache_dir=tmp_path, progress=False)["train"].features["label"].names == [
        "red",
        "green",
        "blue",
    ]

    raw = Dataset.from_dict({"text": [f"t{i}" for i in range(12)], "label": ["Y", "N"] * 6})
    own_tasks(TaskSpec("my_mapped", "Answer yes or no.", ["no", "yes"]), raw, label_map={"Y": "yes", "N": "no"})
    assert sorted(load_task("my_mapped", cache_dir=tmp_path, progress=False)["train"]["label_word"][:])[-1] == "yes"


def test_a_class_label_source_in_another_order_keeps_each_rows_word(own_tasks, tmp_path):
    """A ClassLabel column whose names are the label words in another order: each row keeps its word."""
    texts = [f"good film {i}" for i in range(6)] + [f"bad film {i}" for i in range(6)]
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["Positive", "negative"])}
    )
    raw = Dataset.from_dict({"text": texts, "label": [0] * 6 + [1] * 6}, features=features)
    spec = TaskSpec(name="my_order", instruction="Sentiment?", label_names=["negative", "positive"])
    own_tasks(spec, raw)
    splits = load_task("my_order", cache_dir=tmp_path, progress=False)
    rows = [row for split in SPLITS for row in splits[split]]
    assert len(rows) == 12
    assert all(row["label_word"] == ("positive" if row["text"].startswith("good") else "negative") for row in rows)


def test_rows_whose_labels_are_not_ids_of_the_task_are_refused():
    tokenizer = tiny_tokenizer()
    unlabelled = Dataset.from_dict({"text": ["red", "blue"], "label": [1, -1], "task": ["boolq", "boolq"]})
    with pytest.raises(
        ValueError, match=r"Row 1 has label -1, not an id of task 'boolq'.s 2 labels \(0\.\.1: no, yes\)"
    ):
        format_split(unlabelled, tokenizer)
    model = tiny_model()
    with pytest.raises(ValueError, match=r"Labels \['-1'\] are not ids of task 'boolq'.s 2 labels"):
        evaluate_task(model, tokenizer, unlabelled)
    trec_rows = Dataset.from_dict({"text": ["red"], "label": [4], "task": ["trec"]})
    with pytest.raises(ValueError, match=r"task column names \['trec'\], but the rows are scored as task 'boolq'"):
        evaluate_task(model, tokenizer, trec_rows, task="boolq")
    with pytest.raises(ValueError, match=r"The boolq split has no rows"):
        evaluate_task(model, tokenizer, unlabelled.select([]), task="boolq")


def test_register_a_csv_and_a_jsonl_file(own_tasks, tmp_path):
    frame = yes_no_dataset(rows_per_label=6, text_column="message", label_column="is_it").to_pandas()
    frame.loc[0, "message"] = "NA, with a comma"  # read verbatim, not as a missing value
    frame.to_csv(tmp_path / "mine.csv", index=False)
    own_tasks(YES_NO, tmp_path / "mine.csv", text_column="message", label_column="is_it")
    splits = load_task("my_yes_no", cache_dir=tmp_path / "cache", progress=False)
    texts = [t for s in SPLITS for t in splits[s]["text"][:]]
    assert len(texts) == 12 and "NA, with a comma" in texts

    frame["is_it"] = (frame["is_it"] == "yes").astype(int)
    frame.to_json(tmp_path / "mine.jsonl", orient="records", lines=True)
    own_tasks(
        TaskSpec("my_jsonl", "Answer yes or no.", ["no", "yes"]),
        str(tmp_path / "mine.jsonl"),
        text_column="message",
        label_column="is_it",
    )
    assert sum(len(s) for s in load_task("my_jsonl", cache_dir=tmp_path / "cache", progress=False).values()) == 12


def test_label_maps_and_file_cells_give_each_row_its_own_word(own_tasks, tmp_path):
    """Raw labels as users write them: ClassLabel names mapped by name, csv cells as text (a ``label_map`` for
    ``"1"``/``"True"`` matches them, numeric label words are words, ids written as text still work), and the
    maps or ids that would pick words silently are refused."""

    def words(name):
        splits = load_task(name, cache_dir=tmp_path / "cache", progress=False)
        return {row["text"]: row["label_word"] for split in SPLITS for row in splits[split]}

    spam = [f"win money {i}" for i in range(6)]
    ham = [f"hi mom {i}" for i in range(6)]
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["pos", "neg", "mixed"])}
    )
    classes = Dataset.from_dict({"text": spam + ham, "label": [0] * 6 + [1] * 6}, features=features)
    spec = TaskSpec("my_classes", "Sentiment?", ["negative", "positive"])
    own_tasks(spec, classes, label_map={"pos": "positive", "neg": "negative", "mixed": "negative"})
    assert set(words("my_classes").items()) == {*((t, "positive") for t in spam), *((t, "negative") for t in ham)}

    csv = tmp_path / "spam.csv"
    csv.write_text("text,label\n" + "".join(f"{t},1\n" for t in spam) + "".join(f"{t},0\n" for t in ham))
    own_tasks(TaskSpec("my_spam", "Spam?", ["spam", "ham"]), csv, label_map={"1": "spam", "0": "ham"})
    assert set(words("my_spam").items()) == {*((t, "spam") for t in spam), *((t, "ham") for t in ham)}
    own_tasks(TaskSpec("my_spam_ids", "Spam?", ["ham", "spam"]), csv)  # ids written as text
    assert set(words("my_spam_ids").items()) == {*((t, "spam") for t in spam), *((t, "ham") for t in ham)}

    stars = tmp_path / "stars.csv"
    stars.write_text("text,label\n" + "".join(f"{t},2\n" for t in spam) + "".join(f"{t},1\n" for t in ham))
    own_tasks(TaskSpec("my_stars", "Stars?", ["1", "2", "3"]), stars)
    assert set(words("my_stars").items()) == {*((t, "2") for t in spam), *((t, "1") for t in ham)}

    flags = tmp_path / "flags.csv"
    flags.write_text("text,label\n" + "".join(f"{t},True\n" for t in spam) + "".join(f"{t},False\n" for t in ham))
    own_tasks(TaskSpec("my_flags", "Spam?", ["no", "yes"]), flags, label_map={"True": "yes", "False": "no"})
    assert set(words("my_flags").items()) == {*((t, "yes") for t in spam), *((t, "no") for t in ham)}

    with pytest.raises(ValueError, match=r"no key of label_map \('Y'\) is a value of the label column 'label'"):
        own_tasks(
            TaskSpec("my_unused", "Spam?", ["no", "yes"]),
            Dataset.from_dict({"text": ham, "label": [0, 1] * 3}),
            label_map={"Y": "yes"},
        )
    own_tasks(TaskSpec("my_bools", "Spam?", ["no", "yes"]), flags, label_map={True: "yes", False: "no"})
    assert set(words("my_bools").items()) == {*((t, "yes") for t in spam), *((t, "no") for t in ham)}
    cased = Dataset.from_dict({"text": spam + ham, "label": [" SPAM"] * 6 + ["Ham"] * 6})  # case and spaces aside
    own_tasks(TaskSpec("my_cased", "Spam?", ["ham", "spam"]), cased)
    assert set(words("my_cased").items()) == {*((t, "spam") for t in spam), *((t, "ham") for t in ham)}
    ints = Dataset.from_dict({"text": spam + ham, "label": [2] * 6 + [1] * 6})  # words "1", "2": an int is ambiguous
    with pytest.raises(ValueError, match=r"holds 2, 1, which could be the label word or the id"):
        own_tasks(TaskSpec("my_int_stars", "Stars?", ["1", "2"]), ints)  # (the csv of the same labels reads words)
    own_tasks(TaskSpec("my_int_stars", "Stars?", ["1", "2"]), ints, label_map={1: "1", 2: "2"})
    assert set(words("my_int_stars").items()) == {*((t, "2") for t in spam), *((t, "1") for t in ham)}

    with pytest.raises(ValueError, match=r"no key of label_map \('Y'\) is a value of the label column 'label'"):
        own_tasks(TaskSpec("my_unused", "Spam?", ["no", "yes"]), Dataset.from_dict({"text": ham, "label": [0, 1] * 3}),
                  label_map={"Y": "yes"})  # fmt: skip
    zero_based = tmp_path / "zero_based.csv"
    zero_based.write_text("text,label\n" + "".join(f"{t},0\n" for t in spam) + "".join(f"{t},1\n" for t in ham))
    own_tasks(TaskSpec("my_ambiguous", "Stars?", ["1", "2"]), zero_based)  # a file is read when loaded
    with pytest.raises(ValueError, match=r"holds '0', which could be the label word or the id"):
        words("my_ambiguous")
    partial = Dataset.from_dict({"text": spam + ham, "label": [0] * 6 + [1] * 6}, features=features)
    with pytest.raises(ValueError, match=r"holds 'neg', which is not among label_names"):  # a class nothing maps
        own_tasks(TaskSpec("my_partial", "Sentiment?", ["negative", "positive"]), partial, label_map={0: "positive"})


def test_duplicates_are_dropped_and_conflicting_texts_removed():
    texts = ["Good film", "good   FILM ", "bad film", "Bad film", "meh", "", "  "]
    labels = [1, 1, 0, 1, 0, 0, 1]
    kept, kept_labels, stats = deduplicate(texts, labels)
    assert kept == ["Good film", "meh"] and kept_labels.tolist() == [1, 0]
    assert stats == {
        "rows_read": 7, "empty_dropped": 2, "duplicates_dropped": 1, "conflicting_texts_dropped": 1,
        "conflicting_rows_dropped": 2, "rows_kept": 2,
    }  # fmt: skip


def test_bad_input_raises_clear_errors(own_tasks, tmp_path):
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Task 'my_yes_no': the label column 'label' holds 'maybe', which is not among label_names ['no', 'yes']"
        ),
    ):
        own_tasks(YES_NO, yes_no_dataset(labels=("no", "yes", "maybe")))
    with pytest.raises(
        ValueError, match=re.escape("Task 'my_yes_no': the label column 'label' holds 2, -1, which are not among")
    ):
        own_tasks(YES_NO, Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 2, -1]}))
    with pytest.raises(
        ValueError,
        match=re.escape("Task 'my_yes_no': the text column 'body' does not exist; columns are ['text', 'label']"),
    ):
        own_tasks(YES_NO, yes_no_dataset(), text_column="body")
    with pytest.raises(ValueError, match=re.escape("Task 'my_yes_no': the label column 'answer' does not exist")):
        own_tasks(YES_NO, yes_no_dataset(), label_column="answer")
    with pytest.raises(ValueError, match=re.escape("Task 'my_yes_no': the source dataset is empty (0 rows).")):
        own_tasks(YES_NO, Dataset.from_dict({"text": [], "label": []}))
    with pytest.raises(ValueError, match=re.escape("Task 'movie_sentiment' is already registered")):
        own_tasks(TaskSpec("movie_sentiment", "Is it positive?", ["negative", "positive"]), yes_no_dataset())
    with pytest.raises(
        ValueError,
        match=re.escape("Task 'twice': label_names must be distinct (ignoring case); repeated: ['Yes', 'yes']"),
    ):
        TaskSpec("twice", "Answer.", ["yes", "Yes"])
    with pytest.raises(ValueError, match=re.escape("Task 'my_yes_no': the source file")):
        own_tasks(YES_NO, tmp_path / "missing.csv")

    own_tasks(YES_NO, yes_no_dataset(rows_per_label=2))  # valid rows, but too few to split
    with pytest.raises(
        ValueError, match=re.escape("Task 'my_yes_no': label 'no' has 2 example(s) after deduplication")
    ):
        load_task("my_yes_no", cache_dir=tmp_path, progress=False)
    yes_no_dataset().to_pandas().rename(columns={"text": "body"}).to_csv(tmp_path / "renamed.csv", index=False)
    own_tasks(TaskSpec("my_csv", "Answer yes or no.", ["no", "yes"]), tmp_path / "renamed.csv")
    with pytest.raises(
        ValueError,
        match=re.escape("Task 'my_csv': the text column 'text' does not exist; columns are ['body', 'label']"),
    ):
        load_task("my_csv", cache_dir=tmp_path, progress=False)


def test_subsample_is_stratified_and_fixed_by_seed():
    data = Dataset.from_dict({"text": [str(i) for i in range(100)], "label": [0] * 70 + [1] * 27 + [2] * 3})
    small = subsample(data, 20, seed=1)
    assert len(small) == 20 and np.bincount(small["label"][:]).tolist() == [14, 5, 1]
    assert small["text"][:] == subsample(data, 20, seed=1)["text"][:]
    assert sorted(subsample(data, 3, seed=0)["label"][:]) == [0, 1, 2]
    assert subsample(data, 500) is data


# ----------------------------------------------------------------------------- prompts
def test_middle_truncation_keeps_both_ends_and_the_marker():
    tokenizer = tiny_tokenizer()
    text = " ".join(f"w{i}" for i in range(40))
    short, cut = truncate_middle(["w1 w2 w3", text], tokenizer, max_tokens=10)
    assert short == "w1 w2 w3"
    head, tail = cut.split(MIDDLE_MARKER)
    assert head == "w0 w1 w2 w3 w4" and tail == "w35 w36 w37 w38 w39"
    prompt = PromptFormatter(tokenizer, max_text_tokens=10).prompts(get_task("trec"), [text])[0]
    assert "w0 w1" in prompt and "w38 w39" in prompt and MIDDLE_MARKER in prompt


def test_prompts_use_the_chat_template_when_there_is_one():
    tokenizer = tiny_tokenizer()
    spec = get_task("boolq")
    plain = PromptFormatter(tokenizer)
    assert not plain.use_chat_template
    prompt = plain.prompts(spec, ["blue sky\nQuestion: is it blue?"])[0]
    assert prompt.startswith(spec.instruction) and prompt.endswith("Answer with one of: no, yes.\nAnswer:")
    assert plain.completions(spec) == [" no", " yes"]
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    chat = PromptFormatter(tokenizer, system_prompt="Be brief.")
    prompt = chat.prompts(spec, ["blue sky"])[0]
    assert prompt.startswith("<system>Be brief.<user>" + spec.instruction) and prompt.endswith("<assistant>")
    assert chat.completions(spec) == ["no", "yes"]


def test_format_split_feeds_tokenize_for_causal_lm():
    tokenizer = tiny_tokenizer()
    data = Dataset.from_dict(
        {"text": ["red", "blue", "green"], "label": [1, 0, 2], "task": ["boolq", "boolq", "pubmedqa"]}
    )
    rows = format_split(data, tokenizer)
    assert rows.column_names == ["prompt", "completion", "task_ids", "label"]
    assert rows["completion"][:] == [" yes", " no", " maybe"] and rows["task_ids"][:] == ["boolq", "boolq", "pubmedqa"]
    tokens = tokenize_for_causal_lm(rows, tokenizer, task_names=["boolq", "pubmedqa"])
    assert tokens["task_ids"][:] == [0, 0, 1]
    assert tokens[0]["labels"][-2:] == ids("yes") + [tokenizer.eos_token_id]


# ----------------------------------------------------------------------------- evaluation
def reference_scores(model, tokenizer, prompts, choices, offset=0):
    """One unbatched forward per (prompt, choice): the sum of the choice tokens' log-probabilities."""
    scores = torch.zeros(len(prompts), len(choices))
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            for j, choice in enumerate(choices):
                p, c = tokenizer(prompt)["input_ids"], tokenizer(choice, add_special_tokens=False)["input_ids"]
                log_probs = model(input_ids=torch.tensor([p + c])).logits[0, offset:].log_softmax(-1)
                scores[i, j] = sum(log_probs[len(p) - 1 + k, t] for k, t in enumerate(c))
    return scores


PROMPTS = ["question red blue", "question w1 w2 w3 w4 w5 w6 answer", "answer", "question green"]
CHOICES = [" yes", " no", " red blue green", " A B"]  # one-token and several-token choices


def test_batched_rank_scores_match_one_forward_per_pair():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    expected = reference_scores(model, tokenizer, PROMPTS, CHOICES)
    scores = score_choices(model, tokenizer, PROMPTS, CHOICES, batch_size=3)
    assert torch.allclose(scores, expected, atol=1e-4)
    normalised = score_choices(model, tokenizer, PROMPTS, CHOICES, length_normalize=True)
    assert torch.allclose(normalised, expected / torch.tensor([1.0, 1.0, 3.0, 2.0]), atol=1e-4)
    # prompt tuning prepends virtual tokens to the logits: scores still line up
    tuned = get_peft_model(tiny_model(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    expected = reference_scores(tuned, tokenizer, PROMPTS, CHOICES, offset=3)
    assert torch.allclose(score_choices(tuned, tokenizer, PROMPTS, CHOICES, batch_size=2), expected, atol=1e-4)


def test_prompts_start_with_one_bos_whether_or_not_the_chat_template_writes_it():
    """Llama-3 and Gemma: the tokenizer adds BOS and the chat template writes it too. Training rows and scoring
    must see the one BOS that ``apply_chat_template(tokenize=True)`` gives, not two."""
    model, tokenizer = tiny_model(), tiny_tokenizer(add_bos=True)
    bos = tokenizer.bos_token_id
    data = Dataset.from_dict({"text": ["red", "blue"], "label": [1, 0], "task": ["boolq", "boolq"]})
    plain = format_split(data, tokenizer)  # no template: the tokenizer's BOS is the only one
    tokenizer.chat_template = BOS_CHAT_TEMPLATE
    chat = format_split(data, tokenizer)
    assert chat["prompt"][0].startswith("[BOS]<user>")
    expected = {
        "chat": [tokenizer(p, add_special_tokens=False)["input_ids"] for p in chat["prompt"]],
        "plain": [[bos, *tokenizer(p, add_special_tokens=False)["input_ids"]] for p in plain["prompt"]],
    }
    for kind, rows in (("chat", chat), ("plain", plain)):
        tokens = tokenize_for_causal_lm(rows, tokenizer, task_column=None)
        for row, prompt_ids in zip(tokens, expected[kind]):
            assert row["input_ids"][: len(prompt_ids)] == prompt_ids
            assert row["input_ids"].count(bos) == 1, kind
    # scoring reads the same ids: one forward on them gives the same label log-probabilities
    choices = [" no", " yes"]
    choice_ids = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in choices]
    scores = score_choices(model, tokenizer, chat["prompt"], choices)
    with torch.no_grad():
        for i, prompt_ids in enumerate(expected["chat"]):
            log_probs = model(input_ids=torch.tensor([prompt_ids])).logits[0, -1].log_softmax(-1)
            assert torch.allclose(scores[i], log_probs[choice_ids], atol=1e-4)


@pytest.mark.parametrize("kind", ["prompt-tuning", "multitask-prompt-tuning"])
def test_generated_answers_of_prompt_learning_are_the_greedy_next_tokens(kind):
    """Each generated token is the argmax of a forward over the prompt and the tokens before it (PEFT's cached
    decoding of prompt learning does not give that with transformers 5, so it decodes without a cache)."""
    model, _ = _shared_prompt_model(kind)
    model.eval()
    tokenizer = tiny_tokenizer()
    task = 0 if kind == "multitask-prompt-tuning" else None
    answers = generate_answers(model, tokenizer, PROMPTS[:2], task_id=task, max_new_tokens=4)
    routing = {} if task is None else {"task_ids": torch.tensor([task])}
    for prompt, answer in zip(PROMPTS[:2], answers):
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            for _ in range(4):
                ids.append(int(model(input_ids=torch.tensor([ids]), **routing).logits[0, -1].argmax()))
        expected = tokenizer.decode(ids[len(tokenizer(prompt)["input_ids"]) :], skip_special_tokens=True)
        assert answer == expected
    prefix = get_peft_model(tiny_model(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(ValueError, match=r"prefix tuning .*use method='rank'"):
        generate_answers(prefix, tokenizer, PROMPTS[:1])


def test_a_choice_that_extends_another_is_refused_where_it_could_never_win():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    choices = [" red", " red blue"]
    with pytest.raises(ValueError, match=r"Choice ' red blue' starts with the tokens of choice ' red'"):
        score_choices(model, tokenizer, PROMPTS, choices)
    scores = score_choices(model, tokenizer, PROMPTS, choices, length_normalize=True)  # a mean can be higher
    assert scores.shape == (4, 2)
    unknown = [" red", " zzqx", " qqzx"]  # the tiny word-level tokenizer maps both unknown words to one token
    assert (
        tokenizer(unknown[1:], add_special_tokens=False)["input_ids"][0]
        == tokenizer(unknown[2:], add_special_tokens=False)["input_ids"][0]
    )
    with pytest.raises(ValueError, match=r"Choices ' zzqx' and ' qqzx' tokenise to the same tokens"):
        score_choices(model, tokenizer, PROMPTS, unknown)


def _trained_like(model, seed: int = 0):
    """Every trainable tensor drawn at random (zero-initialised gates and LoRA ``B`` open), as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.5)
    return model


def _shared_prompt_model(kind: str):
    """``(model, task id per prompt or None)`` for the prompt-sharing test."""
    from peft import AdaptionPromptConfig, LoraConfig, MultitaskPromptTuningConfig

    from peft_talora import MTLLoraConfig

    names = ["red", "blue"]
    routed = [0, 1, 1, 0]
    if kind in ("llama", "gpt2", "gemma3_text"):
        return tiny_model(kind), None
    if kind == "prompt-tuning":
        return get_peft_model(tiny_model(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)), None
    if kind == "multitask-prompt-tuning":
        config = MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, num_tasks=2, num_ranks=1)
        return _trained_like(get_peft_model(tiny_model(), config)), routed
    if kind == "adaption-prompt":
        config = AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=3, adapter_layers=2)
        return _trained_like(get_peft_model(tiny_model(), config)), None
    if kind == "lora":
        config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"])
        return _trained_like(get_peft_model(tiny_model(), config)), None
    if kind == "ta-lora":
        config = TALoraConfig(task_type="CAUSAL_LM", task_names=names, num_virtual_tokens=3, r=2)
        return perturb(get_peft_model(tiny_model(), config)), [names[t] for t in routed]
    config = MTLLoraConfig(task_type="CAUSAL_LM", task_names=names, r=4, target_modules=["q_proj", "v_proj"])
    return _trained_like(get_peft_model(tiny_model(), config)), [names[t] for t in routed]


SHARED_PROMPT_MODELS = (
    "llama",
    "gpt2",
    "gemma3_text",  # sliding-window cache: falls back to a pass per pair
    "prompt-tuning",
    "multitask-prompt-tuning",
    "adaption-prompt",
    "lora",
    "ta-lora",
    "mtl-lora",
)


@pytest.mark.parametrize("kind", SHARED_PROMPT_MODELS)
def test_continuing_the_prompt_cache_scores_like_one_forward_per_pair(kind):
    """Multi-token labels read from a continuation of each prompt's key/value cache (right padding masked, the
    cache repeated per label, task ids per row) score as an unbatched forward of prompt + label, for every kind
    of adapter; models whose cache cannot be continued fall back to the pair passes."""
    model, task_ids = _shared_prompt_model(kind)
    model.eval()  # no dropout in the reference either
    tokenizer = tiny_tokenizer()
    offset = 3 if "prompt-tuning" in kind else 0  # virtual tokens in the sequence (not inside the attention)
    expected = torch.zeros(len(PROMPTS), len(CHOICES))
    encoder = TaskIdEncoder.from_config(model) if task_ids and isinstance(task_ids[0], str) else None
    encoder = encoder or SimpleNamespace(encode=lambda ids: ids)  # ids already
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            routing = {} if task_ids is None else {"task_ids": torch.tensor(encoder.encode([task_ids[i]]))}
            for j, choice in enumerate(CHOICES):
                p, c = tokenizer(prompt)["input_ids"], tokenizer(choice, add_special_tokens=False)["input_ids"]
                log_probs = model(input_ids=torch.tensor([p + c]), **routing).logits[0, offset:].log_softmax(-1)
                expected[i, j] = sum(log_probs[len(p) - 1 + k, t] for k, t in enumerate(c))
    shared = score_choices(model, tokenizer, PROMPTS, CHOICES, task_id=task_ids, batch_size=3)
    pairs = score_choices(model, tokenizer, PROMPTS, CHOICES, task_id=task_ids, batch_size=3, share_prompt=False)
    assert torch.allclose(shared, expected, atol=1e-4), (shared - expected).abs().max()
    assert torch.allclose(pairs, expected, atol=1e-4)
    if kind in ("llama", "gemma3_text"):  # gemma3's sliding-window layers cannot be continued: pairs scored it
        with torch.no_grad():
            output = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
        assert _plain_cache(getattr(output, "cache", None) or output.past_key_values) == (kind == "llama")
    if kind == "gemma3_text":  # no pass is wasted finding that out: the first batch's prompt pass scores its
        calls = []  # one-token labels; then one pass per batch of the other prompts and of the (prompt, label) pairs
        handle = model.register_forward_hook(lambda module, args, output: calls.append(1))
        again = score_choices(model, tokenizer, PROMPTS, CHOICES, batch_size=3)
        handle.remove()
        multi = sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) > 1 for c in CHOICES)
        assert len(calls) == 1 + 1 + -(-len(PROMPTS) * multi // 3) and torch.equal(again, shared)


def forced_model(word: str):
    """A tiny llama whose next token is always ``word`` (zero output weights, a bias on its id)."""
    model = tiny_model()
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[ids(word)[0]] = 10.0
    model.lm_head = head
    return model


def test_rank_classification_and_generation_pick_the_forced_label():
    tokenizer = tiny_tokenizer()
    data = Dataset.from_dict({"text": ["red", "blue", "green", "w1"], "label": [1, 0, 1, 1], "task": ["boolq"] * 4})
    for word, label in (("yes", 1), ("no", 0)):
        model = forced_model(word)
        ranked = evaluate_task(model, tokenizer, data, method="rank")
        assert ranked.predictions == [label] * 4 and ranked.scores.shape == (4, 2)
        assert ranked.accuracy == pytest.approx(np.mean(np.array([1, 0, 1, 1]) == label))
        generated = evaluate_task(model, tokenizer, data, method="generate", max_new_tokens=2)
        assert generated.predictions == [label] * 4 and generated.answers[0].split()[0] == word
    record = ranked.metrics()
    assert list(record)[:2] == ["macro_f1", "macro_f1_interval"]  # macro-F1 leads, accuracy beside it
    assert record["macro_f1"] == pytest.approx(0.2) and record["accuracy"] == 0.25
    assert {k: record[k] for k in ("n", "unmatched", "num_labels", "predictions", "references")} == {
        "n": 4, "unmatched": 0, "num_labels": 2, "predictions": [0, 0, 0, 0], "references": [1, 0, 1, 1]
    }  # fmt: skip
    # always "no": a row is right iff it is the one "no" row, so accuracy's bootstrap is Binomial(4, 1/4)/4
    low, high = record["accuracy_interval"]
    assert (low, high) == (0.0, 0.75) and low <= record["macro_f1_interval"][0] <= record["macro_f1"]
    assert ranked.interval("accuracy").as_dict()["resampled"] == "rows"
    summary = ranked.summary()
    assert summary.startswith("macro-F1 20.0 [") and "accuracy 25.0 [" in summary
    assert "4 test rows: one row = 25.0 accuracy points" in summary


def test_match_label_reads_the_answer_word():
    names = ["negative", "neutral", "positive"]
    assert match_label(" Positive.", names) == 2
    assert match_label("**neutral**", names) == 1
    assert match_label("The sentiment of this review is negative.", names) == 0
    assert match_label("I cannot tell", names) == -1
    assert match_label("yes, it is", ["no", "yes"]) == 1 and match_label("nonsense", ["no", "yes"]) == -1
    # two label words found at the same place inside the answer: the longer one is what it says
    assert match_label("It is world news", ["world", "world news"]) == 1
    assert match_label("It is world, news", ["world", "world news"]) == 0


def test_task_id_routes_a_talora_model_and_is_left_out_otherwise():
    tokenizer = tiny_tokenizer()
    data = Dataset.from_dict({"text": ["red", "blue", "green"], "label": [1, 0, 1], "task": ["boolq"] * 3})
    base = tiny_model()
    assert evaluate_task(base, tokenizer, data).scores.shape == (3, 2)  # no task_ids reach the base model
    peft_model = perturb(
        get_peft_model(tiny_model(), TALoraConfig(task_type="CAUSAL_LM", num_tasks=2, num_virtual_tokens=4, r=4))
    )
    with pytest.raises(ValueError, match=r"routes each example to one of its 2 tasks: pass task_id= .* e.g. task_id=0"):
        evaluate_task(peft_model, tokenizer, data)
    with pytest.raises(ValueError, match=r"task_id=1 was given, but LlamaForCausalLM does not route by task"):
        evaluate_task(base, tokenizer, data, task_id=1)  # it would be ignored
    with peft_model.disable_adapter():  # the base model runs: no task needed
        disabled = evaluate_task(peft_model, tokenizer, data).scores
    assert torch.allclose(disabled, evaluate_task(base, tokenizer, data).scores, atol=1e-6)
    numpy_id = evaluate_task(peft_model, tokenizer, data, task_id=np.int64(1)).scores
    first = evaluate_task(peft_model, tokenizer, data, task_id=0).scores
    second = evaluate_task(peft_model, tokenizer, data, task_id=1).scores
    per_row = evaluate_task(peft_model, tokenizer, data, task_id=[0, 1, 0]).scores
    assert not torch.allclose(first, second) and torch.equal(numpy_id, second)
    assert torch.allclose(per_row[[0, 2]], first[[0, 2]], atol=1e-5) and torch.allclose(
        per_row[1], second[1], atol=1e-5
    )
    answers = evaluate_task(peft_model, tokenizer, data, method="generate", task_id=1, max_new_tokens=2).answers
    assert len(answers) == 3


def test_evaluation_restores_each_module_training_flag():
    model = tiny_model()
    model.train()
    model.model.layers[0].eval()
    before = [m.training for m in model.modules()]
    with evaluating(model):
        assert not any(m.training for m in model.modules()) and not torch.is_grad_enabled()
    assert [m.training for m in model.modules()] == before
    evaluate_task(model, tiny_tokenizer(), Dataset.from_dict({"text": ["red"], "label": [0], "task": ["boolq"]}))
    assert [m.training for m in model.modules()] == before
