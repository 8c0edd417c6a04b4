"""The benchmark harness (``benchmarks/run.py``) runs every code path in ``--quick`` mode and writes a
report of the right structure. The numbers of a tiny random model mean nothing, so only the
structure is checked: sections, every method row, the targets, the JSON keys, the plots, resuming."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

SECTIONS = [
    "# Benchmark results",
    "## How to read the numbers",
    "## Targets",
    "## Test sets",
    "## Quality: unseen data",
    "## Quality: unseen tasks",
    "## Ablations (TA-LoRA)",
    "## Trainable parameters",
    "## Speed and memory",
    "## Protocol",
]
HEADER = ["**Command:**", "**Date (UTC):**", "**Machine:**", "**Packages:**", "torch ", "transformers ", "peft "]
TARGETS = [
    "best of PT, MPT, AdaptionPrompt + 2 points",
    "within 1 point of LoRA",
    "20x fewer per-task parameters",
    "k=16: TA-LoRA above PT and MPT",
    "0.97x the base model's tokens/s",
    "64 distinct tasks",
]


def run_quick(out: Path, *args: str) -> str:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--output-dir", str(out), *args],
        cwd=out.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    return result.stdout


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tmp"
    stdout = run_quick(out)
    return out, stdout


def section(text: str, title: str) -> str:
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    return text[start:] if end < 0 else text[start:end]


def test_report_structure(quick):
    import methods

    out, stdout = quick
    report = (out / "RESULTS.md").read_text()
    for title in SECTIONS:
        assert title in report, title
    for field in HEADER:
        assert field in report, field
    assert "python benchmarks/run.py --quick --output-dir" in report

    main_rows = [m for k, m in methods.METHODS.items() if k != "mtl-lora" or methods.mtl_lora_available()]
    for title in ("## Quality: unseen data", "## Quality: unseen tasks", "## Trainable parameters"):
        body = section(report, title)
        for method in main_rows:
            assert f"| {method.label} |" in body, (title, method.label)
    assert "| Base model, zero-shot |" in section(report, "## Quality: unseen data")
    ablations = section(report, "## Ablations (TA-LoRA)")
    for method in methods.ABLATIONS.values():
        assert f"| {method.label} |" in ablations, method.label
    if not methods.mtl_lora_available():
        assert "MTL-LoRA skipped" in report

    targets = section(report, "## Targets")
    rows = [line for line in targets.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(TARGETS)
    for row, name in zip(rows, TARGETS):
        assert name in row
        assert any(verdict in row for verdict in ("**met**", "**missed**", "not measured"))
    speed = section(report, "## Speed and memory")
    for ratio in ("TA-LoRA / LoRA", "TA-LoRA / AdaptionPrompt", "TA-LoRA / base tokens/s", "64 tasks / 1 task"):
        assert ratio in speed
    assert "Targets:" in stdout and "expected time" in stdout

    # macro-F1 leads, accuracy beside it; every average has its row interval; a test-set row per task
    unseen = section(report, "## Quality: unseen data")
    assert "| method | macro-F1 | accuracy | TA-LoRA - this (macro-F1) |" in unseen
    assert "Interval over seeds only" not in report and "†" not in report  # fresh runs store their rows
    ta_row = next(line for line in unseen.splitlines() if line.startswith("| TA-LoRA |"))
    assert ta_row.count("[") == 2 + 2  # two averages and the two tasks' macro-F1 cells
    tests = section(report, "## Test sets")
    for task in ("sms_spam", "trec", "pubmedqa"):
        assert f"| {task} | " in tests and "| 4 | " in tests and "| 25.0 | no: raise --eval-per-task to 100 |" in tests
    for line in section(report, "## Targets").splitlines():
        if line.startswith("| Unseen data"):
            assert "macro-F1" in line and "accuracy" in line and "[" in line


def test_json_and_plots(quick):
    import methods

    out, _ = quick
    data = json.loads((out / "results.json").read_text())
    for key in (
        "meta",
        "plan",
        "methods",
        "parameters",
        "runs",
        "quality",
        "ablations",
        "zero_shot",
        "speed",
        "targets",
    ):
        assert key in data, key
    for key in ("command", "date", "machine", "versions", "settings", "elapsed_s"):
        assert key in data["meta"], key
    assert data["meta"]["machine"]["cpu_count"] >= 1 and data["meta"]["versions"]["peft"]
    errors = {k: r["error"] for k, r in data["runs"].items() if "error" in r}
    assert not errors, errors
    expected = [*methods.METHODS, *methods.ABLATIONS]
    if not methods.mtl_lora_available():
        expected.remove("mtl-lora")
    assert data["plan"]["methods"] == expected
    for key in expected:
        entry = data["quality"]["unseen_data"][key]
        assert entry["n"] == 1 and entry["rows"] and entry["tasks"] == ["sms_spam", "trec"]
        for metric in ("macro_f1", "accuracy"):
            interval = entry[metric]["interval"]
            assert interval["resampled"] == "rows" and interval["low"] <= entry[metric]["mean"] <= interval["high"]
        shots = data["plan"]["shots"] if "/" not in key else data["plan"]["ablation_shots"]
        for shot in shots:
            assert data["quality"]["unseen_tasks"][key][shot]["n"] == 1
    for key, run in data["runs"].items():  # every evaluation keeps its rows for the bootstrap
        for record in run.get("tasks", {}).values():
            assert len(record["predictions"]) == len(record["references"]) == record["n"] == 4, key
    paired = data["differences"]["unseen_data"]["pt"]["macro_f1"]
    ta, pt = (data["quality"]["unseen_data"][k]["macro_f1"]["mean"] for k in ("ta-lora", "pt"))
    assert paired["resampled"] == "rows" and paired["estimate"] == pytest.approx(ta - pt)
    assert data["ablations"]["ta-lora/equal-lr"]["delta_vs_ta_lora"]["macro_f1"]["resampled"] == "rows"
    for task in ("sms_spam", "trec", "pubmedqa"):
        entry = data["test_sets"][task]
        assert entry["rows"] == 4 and entry["split_rows"] >= 100 and sum(entry["labels"].values()) == 4
    assert '"predictions": [' in (out / "results.json").read_text()  # lists of numbers on one line
    for key in ("ta-lora", "lora", "pt", "mpt", "poly", "adaption-prompt"):
        p = data["parameters"][key]
        assert p["total"] > 0 and p["per_task"] > 0 and p["shared"] >= 0
    assert data["parameters"]["lora"]["shared"] == 0  # single-task convention
    assert data["parameters"]["ta-lora"]["per_task"] < data["parameters"]["lora"]["per_task"]
    for part in ("train_step", "generation", "task_batch"):
        assert data["speed"][part]["ratios"]
    assert len(data["targets"]) == len(TARGETS)
    for name in ("quality.png", "ablations.png", "speed.png"):
        assert (out / name).stat().st_size > 1000, name


def test_rerun_resumes_from_the_cache(quick):
    out, _ = quick
    before = json.loads((out / "results.json").read_text())["runs"]
    stdout = run_quick(out, "--skip-speed")
    assert "training" not in stdout and "unseen data:" not in stdout  # nothing retrained or re-evaluated
    data = json.loads((out / "results.json").read_text())
    assert data["runs"] == before
    assert "speed" in data  # the earlier speed results are still reported
    assert "## Speed and memory" in (out / "RESULTS.md").read_text()


def test_flags_learning_rates_and_fingerprints():
    import methods
    import run

    args = run.parse(["--quick", "--lr", "2e-3", "lora=5e-4", "ta-lora=3e-2"])
    assert run.learning_rate(args, "lora") == 5e-4
    assert run.learning_rate(args, "pt") == 2e-3
    assert run.learning_rate(args, "ta-lora/equal-lr") == 3e-2  # ta-lora= also sets its ablations
    assert run.learning_rate(args, "ta-lora/lr-3e-3") == 3e-3  # ... but a learning-rate variant keeps its own
    assert run.learning_rate(run.parse(["--quick", "--lr", "ta-lora/lr-3e-3=1e-4"]), "ta-lora/lr-3e-3") == 1e-4
    assert run.learning_rate(default := run.parse(["--quick"]), "ta-lora/lr-3e-2") == 3e-2
    assert "ta-lora/prompt-std-0.25" not in default.methods  # variants run only when named
    config = methods.make_config("ta-lora/prompt-std-0.25", ["a", "b"], 2, counting=True)
    assert config.prompt_init_std == 0.25
    assert run.learning_rate(default, "pt") == 1e-2 and run.learning_rate(default, "poly") == 1e-3
    longer = run.parse(["--quick", "--steps", "3"])
    keys = ["ta-lora", "lora"]
    a, b = run.plan(default, keys), run.plan(longer, keys)
    assert a.keys() == b.keys()
    assert a["ta-lora|seed0|unseen_data"] != b["ta-lora|seed0|unseen_data"]  # a new budget reruns
    assert a["zero-shot|trec"] == b["zero-shot|trec"]  # ... but not what it does not affect
    with pytest.raises(SystemExit):
        run.parse(["--shots", "0"])


def test_report_regenerates_from_results_cached_without_rows():
    """The committed results.json predates per-row predictions: the report still renders, leads with macro-F1,
    gives seeds-only intervals marked † and says so."""
    import report

    data = json.loads((ROOT / "benchmarks" / "results.json").read_text())
    for run in data["runs"].values():  # as cached before this change, whatever the file holds now
        for record in run.get("tasks", {}).values():
            for key in ("predictions", "references", "num_labels", "macro_f1_interval", "accuracy_interval"):
                record.pop(key, None)
    data.pop("test_sets", None)
    report.summarize(data)
    text = report.render(data, [])
    assert "Interval over seeds only" in text and "†" in text
    seeds = len(data["plan"]["seeds"])
    entry = data["quality"]["unseen_data"]["ta-lora"]
    assert entry["n"] == seeds and not entry["rows"]
    if seeds > 1:
        assert entry["macro_f1"]["interval"]["resampled"] == "seeds"
    unseen = section(text, "## Quality: unseen data")
    assert "| method | macro-F1 | accuracy |" in unseen
    n = data["meta"]["settings"]["eval_per_task"]
    assert f"| {n} | " in section(text, "## Test sets") and f"{100 / n:.1f}" in section(text, "## Test sets")
    for target in data["targets"]:
        assert target["resolved"] is not True  # seeds-only intervals cannot resolve anything


def test_aggregate_and_compare_pair_seeds_and_rows():
    import report

    from peft_talora.suite.intervals import TaskRuns, bootstrap_interval, paired_difference

    def record(predictions, references):
        accuracy = sum(p == r for p, r in zip(predictions, references)) / len(references)
        return {
            "predictions": predictions,
            "references": references,
            "num_labels": 2,
            "n": len(references),
            "accuracy": accuracy,
            "macro_f1": 0.0,
        }

    refs = [0, 1, 1, 0, 1]
    a = [(0, {"x": record([0, 1, 1, 1, 1], refs)}), (1, {"x": record([0, 1, 0, 0, 1], refs)})]
    b = [(0, {"x": record([1, 1, 1, 1, 1], refs)}), (1, {"x": record([0, 0, 0, 0, 1], refs)})]
    for _, seed_records in (*a, *b):  # the stored macro-F1 of each record, from the package's metric
        r = seed_records["x"]
        r["macro_f1"] = bootstrap_interval([TaskRuns(r["references"], r["predictions"], 2)]).estimate
    entry = report.aggregate([r for _, r in a], ["x"])
    runs_a = TaskRuns(refs, [r["x"]["predictions"] for _, r in a], 2)
    runs_b = TaskRuns(refs, [r["x"]["predictions"] for _, r in b], 2)
    assert entry["macro_f1"]["interval"] == bootstrap_interval([runs_a]).as_dict()
    assert entry["macro_f1"]["interval"]["resampled"] == "rows and seeds"
    assert report.compare(a, b, ["x"])["accuracy"] == paired_difference([runs_a], [runs_b], "accuracy").as_dict()
    assert report.compare(a, list(reversed(b)), ["x"]) == report.compare(a, b, ["x"])  # paired by seed, not order
    legacy = [(s, {"x": {k: v for k, v in r["x"].items() if k not in ("predictions", "references")}}) for s, r in a]
    assert report.aggregate([r for _, r in legacy], ["x"])["accuracy"]["interval"]["resampled"] == "seeds"


# ----------------------------------------------------------------------------- benchmarks/new_tasks.py
def run_new_tasks(out: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "benchmarks" / "new_tasks.py"), "--tiny", "--output-dir", str(out)]
    small = ["--shots", "2", "--steps", "2", "--eval-every", "1", "--val-rows", "6", "--test-rows", "8"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [*command, "--scratch", str(out.parent / "scratch"), *small, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_new_task_benchmark_picks_lr_and_step_on_validation_and_resumes(tmp_path):
    out = tmp_path / "new_tasks"
    methods = ["--tasks", "pubmedqa", "--methods", "base", "ta-lora/closest", "lora"]
    first = run_new_tasks(out, *methods)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    record = json.loads((out / "pubmedqa.json").read_text())
    assert record["settings"]["shots"] == 2 and record["settings"]["steps"] == 2
    assert record["base"]["test"]["n"] == 8
    for method in ("ta-lora/closest", "lora"):
        entry = record[method]
        assert len(entry["grid"]) == 3  # the same grid size for every method
        # the chosen (lr, step) is the best validation macro-F1 over the whole grid, earliest step on ties
        points = [
            (point["macro_f1"], -int(step), float(lr), int(step))
            for lr, run in entry["grid"].items()
            for step, point in run["validation"].items()
        ]
        best = max(points)
        assert entry["validation_macro_f1"] == best[0] and entry["step"] == best[3]
        assert len(entry["test"]["predictions"]) == 8
        assert all(len(run["train_loss"]) == 2 for run in entry["grid"].values())
    assert record["ta-lora/closest"]["grid"]["0.01"]["init_from"] in (
        "movie_sentiment tweet_sentiment amazon_sentiment nyt_sentiment sms_spam trec bbc_topic boolq".split()
    )
    assert "| pubmedqa | 8 |" in first.stdout and "ta-lora/closest - base (paired)" in first.stdout

    again = run_new_tasks(out, *methods)  # everything is done: nothing trains again
    assert again.returncode == 0 and "== pubmedqa" not in again.stdout
    other = run_new_tasks(out, *methods, "--seed", "1")
    assert other.returncode != 0 and "made with other settings" in other.stdout + other.stderr
