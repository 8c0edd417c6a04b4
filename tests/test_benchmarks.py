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
    for ratio in (
        "TA-LoRA / LoRA",
        "TA-LoRA / AdaptionPrompt",
        "TA-LoRA, logits at label positions only / every position",
        "TA-LoRA / base tokens/s",
        "64 tasks / 1 task",
    ):
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
    step = data["speed"]["train_step"]  # the label-logits step is measured beside the full one
    assert step["ratios"]["ta-lora label logits / ta-lora"] == pytest.approx(
        step["median_s"]["ta-lora label logits"] / step["median_s"]["ta-lora"]
    )
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
    shapes = {
        key: (c.r, c.num_virtual_tokens)
        for key in ("ta-lora", "ta-lora/r-4", "ta-lora/r-16", "ta-lora/tokens-5", "ta-lora/tokens-20")
        for c in [methods.make_config(key, ["a", "b"], 2, counting=True)]
    }
    assert shapes == {
        "ta-lora": (8, 10),
        "ta-lora/r-4": (4, 10),
        "ta-lora/r-16": (16, 10),
        "ta-lora/tokens-5": (8, 5),
        "ta-lora/tokens-20": (8, 20),
    }
    assert run.learning_rate(default, "pt") == 1e-2 and run.learning_rate(default, "poly") == 1e-3
    longer = run.parse(["--quick", "--steps", "3"])
    keys = ["ta-lora", "lora"]
    a, b = run.plan(default, keys), run.plan(longer, keys)
    assert a.keys() == b.keys()
    assert a["ta-lora|seed0|unseen_data"] != b["ta-lora|seed0|unseen_data"]  # a new budget reruns
    assert a["zero-shot|trec"] == b["zero-shot|trec"]  # ... but not what it does not affect
    with pytest.raises(SystemExit):
        run.parse(["--shots", "0"])
    import report  # reads keys from results.json without importing methods.py (and torch)

    assert {key: report.is_variant(key) for key in methods.ALL} == {key: run.is_variant(key) for key in methods.ALL}


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

    # a partial run: seed 1 has not reached task "y" yet. The average keeps both tasks over the seed that has
    # them (not task "x" alone over both seeds), and says what it covers
    y = record([1, 1, 0, 0, 0], refs)
    y["macro_f1"] = bootstrap_interval([TaskRuns(refs, y["predictions"], 2)]).estimate
    partial = [{"x": a[0][1]["x"], "y": y}, {"x": a[1][1]["x"]}]
    entry = report.aggregate(partial, ["x", "y"], planned_seeds=3)
    assert entry["tasks"] == ["x", "y"] and entry["n"] == 1
    assert entry["accuracy"]["mean"] == pytest.approx((0.8 + 0.4) / 2)
    assert report.fmt_metric(entry).endswith(" (1 of 3 seeds)")
    assert report.fmt_metric(report.aggregate(partial[1:], ["x", "y"])).endswith(" (1 of 2 tasks)")
    assert report.compare([(0, partial[0]), (1, partial[1])], [(0, partial[0]), (1, partial[1])], ["x", "y"])[
        "tasks"
    ] == ["x", "y"]


def test_lr_choice_report_says_what_is_chosen_and_what_is_not_yet():
    """A grid's choice is made only once every learning rate of it is done; the summary line says whether a
    choice sits at an edge, and says nothing about edges while no grid is finished (a partial run)."""
    import report

    grid = [1e-3, 3e-3, 1e-2]
    runs = {
        f"pt|seed0|lr={lr:g}": {"fingerprint": f"fp{lr:g}", "validation_loss": loss}
        for lr, loss in zip(grid, [0.5, 0.4])
    }
    data = {
        "runs": runs,
        "plan": {
            "methods": ["pt"],
            "seeds": [0],
            "lr_grid": {"pt": grid},
            "runs": {k: v["fingerprint"] for k, v in runs.items()},
        },
        "meta": {"settings": {"val_per_task": 8}},
        "methods": {},
    }
    data["plan"]["runs"]["pt|seed0|lr=0.01"] = "fp0.01"

    def summary(data):
        data["lr_choice"] = report.lr_choices(data)
        return report.render_lr_choice(data)[-2], data["lr_choice"]["pt"]["0"]["chosen"]

    assert summary(data) == ("No learning rate is chosen yet (the grids are unfinished).", None)
    data["plan"]["methods"].append("lora")  # a second method whose grid is half done
    data["plan"]["lr_grid"]["lora"] = [1e-4, 3e-4]
    data["plan"]["runs"].update({"lora|seed0|lr=0.0001": "l1", "lora|seed0|lr=0.0003": "l3"})
    runs["lora|seed0|lr=0.0001"] = {"fingerprint": "l1", "validation_loss": 0.2}
    runs["pt|seed0|lr=0.01"] = {"fingerprint": "fp0.01", "validation_loss": 0.45}
    assert summary(data) == ("No choice is at an edge (1 grid not finished yet).", "0.003")
    runs["pt|seed0|lr=0.01"]["validation_loss"] = 0.3
    assert summary(data) == ("Chosen at an edge of the grid: pt (seed 0: 1e-2) (1 grid not finished yet).", "0.01")
    runs["lora|seed0|lr=0.0003"] = {"fingerprint": "l3", "validation_loss": 0.1}
    assert summary(data)[0] == "Chosen at an edge of the grid: pt (seed 0: 1e-2); lora (seed 0: 3e-4)."


def test_report_names_the_methods_of_a_grid_only_when_a_method_has_its_own():
    import report

    methods = {"pt": ("PT", "prompt"), "mpt": ("MPT", "prompt"), "lora": ("LoRA", "lora")}
    data = {"methods": {k: {"label": name, "family": family} for k, (name, family) in methods.items()}}
    family = {"pt": [1e-2, 3e-2], "mpt": [1e-2, 3e-2], "lora": [1e-3, 3e-3]}
    assert report._grids_text(data, family) == "1e-3 / 3e-3; 1e-2 / 3e-2"
    own = {**family, "mpt": [3e-2, 1e-1]}
    assert report._grids_text(data, own) == "LoRA: 1e-3 / 3e-3; PT: 1e-2 / 3e-2; MPT: 3e-2 / 1e-1"


# ----------------------------------------------------------------------------- learning-rate grid, curves, shards
GRID = ["--methods", "ta-lora", "lora", "pt", "--lr-grid", "--skip-speed"]
GRID_METHODS = ("ta-lora", "lora", "pt")


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid") / "tmp"
    stdout = run_quick(out, *GRID)
    return out, stdout


def test_lr_grid_trains_every_lr_and_chooses_the_lowest_validation_loss(grid, quick):
    import run
    import torch

    out, stdout = grid
    data = json.loads((out / "results.json").read_text())
    args = run.parse(["--quick", *GRID])
    assert args.eval_every == 1  # curves are on with the grid (every steps/4 steps, at least 1)
    for key in GRID_METHODS:
        family = args.prompt_lr_grid if key != "lora" else args.lora_lr_grid
        assert run.lr_grid(args, key) == family and len(family) == 3  # the same grid size for every method
        losses = {}
        for lr in family:
            record = data["runs"][f"{key}|seed0|lr={lr:g}"]
            steps = [step for step, _ in record["curve"]]
            assert steps == [0, 1, 2] and record["validation_loss"] == record["curve"][-1][1]
            losses[lr] = record["validation_loss"]
        chosen = min(losses, key=losses.get)
        unseen = data["runs"][f"{key}|seed0|unseen_data"]
        assert unseen["lr"] == chosen and unseen["lr_grid"] == {f"{lr:g}": v for lr, v in losses.items()}
        assert data["runs"][f"{key}|seed0|pubmedqa|k=1"]["lr"] == chosen  # the unseen task trains at it too
        assert data["lr_choice"][key]["0"]["chosen"] == f"{chosen:g}"
        curve = data["curves"][key]["0"]
        assert curve["curve"] == data["runs"][f"{key}|seed0|lr={chosen:g}"]["curve"]
        assert curve["status"] in ("flattened", "still falling", "no drop")
    assert f"learning rate {data['runs']['lora|seed0|unseen_data']['lr']:g} chosen on validation" in stdout
    assert (out / "curves.png").stat().st_size > 1000
    report = (out / "RESULTS.md").read_text()
    for title in ("## Learning rates chosen on validation", "## Validation-loss curves"):
        body = section(report, title)
        for key in GRID_METHODS:
            assert f"| {data['methods'][key]['label']} |" in body, (title, key)
    curves = section(report, "## Validation-loss curves")
    assert "**flattened**" in curves and ("**Not flattened:**" in curves or "Every recorded curve flattened" in curves)
    assert "grid 3e-4 / 1e-3 / 3e-3; chosen per seed: " in section(report, "## Protocol")
    assert "## Validation-loss curves" in (quick[0] / "RESULTS.md").read_text()  # says "not recorded" there

    # the validation evaluations leave training untouched: LoRA (with dropout) at 1e-3 in the grid is bit-identical
    # to the default run's LoRA, trained at 1e-3 without any validation
    def adapter(folder, argv, lr=None):
        fp = run.source_fp(run.parse(["--quick", *argv]), "lora", 0, lr)
        return torch.load(folder / ".cache" / "adapters" / f"lora-seed0-{fp}.pt", weights_only=True)["state"]

    plain, gridded = adapter(quick[0], []), adapter(out, GRID, 1e-3)
    assert plain.keys() == gridded.keys() and all(torch.equal(plain[k], gridded[k]) for k in plain)


def test_two_shards_make_the_runs_of_one_process(grid, tmp_path):
    out = tmp_path / "shards"
    command = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--output-dir", str(out), *GRID]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    shards = [
        subprocess.Popen([*command, "--shard", f"{i}/2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for i in range(2)
    ]  # both write results.json at the same time
    logs = [shard.communicate(timeout=900)[0].decode() for shard in shards]
    assert [shard.returncode for shard in shards] == [0, 0], [log[-3000:] for log in logs]
    assert "zero-shot" in logs[0] and "zero-shot" not in logs[1]  # zero-shot (and speed) runs are shard 0's
    assert "write the report: " in logs[1] and "--skip-quality" in logs[1] and not (out / "RESULTS.md").exists()
    run_quick(out, *GRID, "--skip-quality")  # the report
    sharded = json.loads((out / "results.json").read_text())
    single = json.loads((grid[0] / "results.json").read_text())
    assert sorted(sharded["runs"]) == sorted(single["runs"])
    for key, record in single["runs"].items():
        assert sharded["runs"][key]["fingerprint"] == record["fingerprint"], key
        for task, evaluation in record.get("tasks", {}).items():
            assert sharded["runs"][key]["tasks"][task]["predictions"] == evaluation["predictions"], key
    assert set(sharded["shards"]) == {"0/2", "1/2"} and all("elapsed_s" in r for r in sharded["shards"].values())
    units = [unit for r in sharded["shards"].values() for unit in r["units"]]
    assert sorted(units) == sorted(f"{key}|seed0" for key in GRID_METHODS)
    assert "**Shard 1/2:**" in (out / "RESULTS.md").read_text()


def chosen_in(log: str) -> str:
    """The learning rate a run's log says seed 0 chose."""
    return log.split("[lora seed 0] learning rate ")[1].split()[0]


def test_lr_grid_seeds_choose_once_and_a_shard_waits_for_the_grid_it_needs(grid, tmp_path):
    """``--lr-grid-seeds 0``: only seed 0 trains the grid, seed 1 trains once at seed 0's choice. With two shards
    and one method, shard 1's only unit (seed 1) needs shard 0's grid: it waits, then matches one process."""
    import run

    flags = ["--methods", "lora", "--lr-grid", "--skip-speed", "--seeds", "0", "1", "--lr-grid-seeds", "0"]
    out = tmp_path / "pooled"
    command = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--output-dir", str(out), *flags]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    shards = [
        subprocess.Popen([*command, "--shard", f"{i}/2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for i in (1, 0)
    ]
    logs = [shard.communicate(timeout=900)[0].decode() for shard in shards]
    assert [shard.returncode for shard in shards] == [0, 0], [log[-3000:] for log in logs]
    assert "[lora seed 1] waiting for another shard's runs: lora|seed0|lr=" in logs[0]
    assert f"learning rate {chosen_in(logs[1])} chosen on validation (on seed 0)" in logs[0]
    run_quick(out, *flags, "--skip-quality")  # the report
    data = json.loads((out / "results.json").read_text())
    runs = data["runs"]
    assert not any(key.startswith("lora|seed1|lr=") for key in runs)  # seed 1 trained no grid
    losses = {lr: runs[f"lora|seed0|lr={lr:g}"]["validation_loss"] for lr in run.parse(["--quick"]).lora_lr_grid}
    chosen = min(losses, key=losses.get)
    seed1 = runs["lora|seed1|unseen_data"]
    assert seed1["lr"] == chosen and seed1["lr_chosen_on_seeds"] == [0] and seed1["train"]["lr"] == chosen
    assert runs["lora|seed1|pubmedqa|k=1"]["lr"] == chosen
    assert data["curves"]["lora"]["1"]["curve"] == seed1["train"]["curve"]  # its own training's curve
    # seed 0 is exactly the per-seed grid's (same fingerprints, same predictions): results carry over
    single = json.loads((grid[0] / "results.json").read_text())["runs"]
    for key in ("lora|seed0|unseen_data", "lora|seed0|pubmedqa|k=1", f"lora|seed0|lr={chosen:g}"):
        assert runs[key]["fingerprint"] == single[key]["fingerprint"], key
    for task, evaluation in single["lora|seed0|unseen_data"]["tasks"].items():
        assert runs["lora|seed0|unseen_data"]["tasks"][task]["predictions"] == evaluation["predictions"], task
    choice = section((out / "RESULTS.md").read_text(), "## Learning rates chosen on validation")
    assert "Only seed 0 trained the whole grid" in choice and "(chosen on seed 0)" in choice
    for bad in (["--lr-grid-seeds", "0"], ["--lr-grid", "--lr-grid-seeds", "2"]):  # no grid; not among --seeds
        with pytest.raises(SystemExit):
            run.parse(["--quick", "--seeds", "0", "1", *bad])
    args = run.parse(["--quick", "--lr-grid", "--seeds", "2", "0", "1", "--lr-grid-seeds", "1"])
    assert [seed for seed, _ in run.units(args, ["lora"])] == [1, 2, 0]  # the grid seeds' units come first
    # two shards share the work by trainings: 5 grid units (3 trainings) of seed 0, then 10 single trainings
    five = ["ta-lora", "pt", "mpt", "adaption-prompt", "lora"]
    shares = [
        run.units(
            run.parse(["--quick", "--lr-grid", "--seeds", "0", "1", "2", "--lr-grid-seeds", "0", "--shard", s]), five
        )
        for s in ("0/2", "1/2")
    ]
    assert sorted(shares[0] + shares[1]) == sorted((seed, key) for seed in (0, 1, 2) for key in five)
    assert [sum(3 + 1 if seed == 0 else 1 + 1 for seed, _ in share) for share in shares] == [20, 20]
    assert [key for seed, key in shares[0] if seed == 0] == ["ta-lora", "mpt", "lora"]


def test_target_lr_grid_chooses_each_unseen_task_s_lr_on_its_own_validation_rows(tmp_path):
    """``--target-lr-grid``: seed 0 trains the unseen task at every learning rate of the method's grid, keeps the
    lowest validation loss (which equals the label-token loss computed here by hand from the cached weights), and
    seed 1 trains at that choice; without the flag no fingerprint changes."""
    import methods
    import quality
    import report as report_module
    import run
    import torch

    from peft_talora.smollm2 import load_model

    flags = ["--methods", "ta-lora", "lora", "--lr-grid", "--skip-speed", "--seeds", "0", "1", "--lr-grid-seeds", "0"]
    out = tmp_path / "target_grid"
    stdout = run_quick(out, *flags, "--target-lr-grid")
    data = json.loads((out / "results.json").read_text())
    runs = data["runs"]
    args = run.parse(["--quick", *flags, "--target-lr-grid"])
    base, tokenizer = load_model(tiny=True)
    choices = {}
    for key in ("ta-lora", "lora"):
        grid = run.lr_grid(args, key)
        losses = {lr: runs[f"{key}|seed0|pubmedqa|k=1|lr={lr:g}"]["validation_loss"] for lr in grid}
        assert not any(k.startswith(f"{key}|seed1|pubmedqa|k=1|lr=") for k in runs)  # seed 1 trained no grid
        chosen = choices[key] = min(losses, key=losses.get)
        for seed in (0, 1):
            record = runs[f"{key}|seed{seed}|pubmedqa|k=1"]
            assert record["target_lr"] == chosen and record["target_lr_grid"] == {
                f"{x:g}": v for x, v in losses.items()
            }
        # seed 0's scored model is the grid's training at the chosen learning rate, loaded, not trained again
        assert (
            runs[f"{key}|seed0|pubmedqa|k=1"]["train"]["train_loss"]
            == (runs[f"{key}|seed0|pubmedqa|k=1|lr={chosen:g}"]["train"]["train_loss"])
        )
        assert f"[{key} seed 1] pubmedqa, k=1: learning rate {chosen:g} chosen on validation" in stdout

        # the recorded validation loss, independently: mean cross-entropy of the label tokens of the target's
        # validation rows under the cached weights (one forward per row, no padding)
        multi = torch.load(_chosen_adapter(out, runs, key), weights_only=True)["state"]
        model, task_list = methods.for_target(
            key, multi, base, args.tasks, "pubmedqa", 0, methods.tokenizer_path(), tmp_path / "scratch"
        )
        fp = run.plan(args, [key])[f"{key}|seed0|pubmedqa|k=1|lr={chosen:g}"]
        weights = out / ".cache" / "targets" / f"{key}-seed0-pubmedqa-k1-lr{chosen:g}-{fp}.pt"
        methods.load_state(model, torch.load(weights, weights_only=True)["state"])
        rows = quality.validation_data(["pubmedqa"], tokenizer, args.target_val_rows, 48, task_names=task_list)
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for row in rows:
                ids = torch.tensor([row["input_ids"]])
                labels = torch.tensor(row["labels"][1:])
                routing = {"task_ids": torch.tensor([row["task_ids"]])} if key == "ta-lora" else {}
                logits = model(input_ids=ids, **routing).logits[0, :-1]
                keep = labels != -100
                total += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
                count += int(keep.sum())
        assert total / count == pytest.approx(losses[chosen], rel=1e-4)

    report = section((out / "RESULTS.md").read_text(), "## Learning rates chosen for the unseen tasks")
    for key, chosen in choices.items():
        row = next(line for line in report.splitlines() if line.startswith(f"| {data['methods'][key]['label']} |"))
        assert f"**{report_module._lr_text(chosen)}**" in row
    # without the flag the plan is the one before it existed, unseen data and multi-task grid included
    plain = run.plan(run.parse(["--quick", *flags]), ["ta-lora", "lora"])
    gridded = run.plan(args, ["ta-lora", "lora"])
    assert all(gridded[k] == v for k, v in plain.items() if "|k=" not in k)
    assert not any("|k=1|lr=" in k for k in plain)
    with pytest.raises(SystemExit):
        run.parse(["--quick", "--target-lr-grid"])  # needs --lr-grid


def _chosen_adapter(out: Path, runs: dict, key: str) -> Path:
    """The cached multi-task adapter of ``key``, seed 0, at the learning rate chosen on validation."""
    import run

    lr = runs[f"{key}|seed0|unseen_data"]["lr"]
    args = run.parse(["--quick", "--methods", key, "--lr-grid", "--seeds", "0", "1", "--lr-grid-seeds", "0"])
    return out / ".cache" / "adapters" / f"{key}-seed0-{run.source_fp(args, key, 0, lr)}.pt"


def test_paper_warmup_trains_the_shared_prompt_per_task_then_multi_task(tmp_path):
    """``ta-lora/paper-warmup``: --warmup-steps steps on each source task alone (2 tasks: 2 steps of the budget),
    then multi-task training from the averaged prompt for the rest; its curve starts before any training and goes
    on from the multi-task start. Too few steps for the warm-up is refused with the fix."""
    out = tmp_path / "paper"
    flags = ["--methods", "ta-lora/paper-warmup", "--steps", "4", "--warmup-steps", "1", "--eval-every", "1"]
    stdout = run_quick(out, *flags, "--skip-speed")
    assert "paper warm-up: 1 steps on each source task alone" in stdout and "multi-task training: 2 steps" in stdout
    record = json.loads((out / "results.json").read_text())["runs"]["ta-lora/paper-warmup|seed0|unseen_data"]
    warmup = record["train"]["warmup"]
    assert [run["task"] for run in warmup["per_task"]] == ["sms_spam", "trec"] and warmup["steps"] == 2
    assert all(run["steps"] == 1 for run in warmup["per_task"])
    assert [step for step, _ in record["train"]["curve"]] == [0, 2, 3, 4]
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--output-dir", str(tmp_path / "few")]
        + ["--methods", "ta-lora/paper-warmup", "--steps", "2", "--skip-speed", "--strict"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    assert result.returncode != 0 and "give more --steps" in result.stdout + result.stderr


def test_paper_warmup_averages_the_per_task_prompts(tmp_path, monkeypatch):
    """Each task's warm-up starts from the same prompt and gates and sees only its own rows; multi-task training
    starts from the mean of what they trained (training replaced by filling the parameters with a per-task value)."""
    import methods
    import quality
    import run
    import torch

    from peft_talora.smollm2 import load_model

    key = "ta-lora/paper-warmup"
    args = run.parse(["--quick", "--methods", key, "--steps", "4", "--warmup-steps", "1"])
    base, tokenizer = load_model(tiny=True)
    runner = run.Quality(args, run.State(tmp_path), base, tokenizer, [key], run.plan(args, [key]))
    model = methods.build(key, base, args.tasks, 0, methods.tokenizer_path())
    model.set_training_stage("shared_warmup")
    shared = {name: p for name, p in model.named_parameters() if p.requires_grad}
    start = {name: p.detach().clone() for name, p in shared.items()}
    rows = quality.source_stream(args.tasks, tokenizer, 4, 0, 4 * args.batch_size, args.max_text_tokens)
    seen = []

    def fake_train(model, rows, tokenizer, **kwargs):
        task = rows["task_ids"][0]
        assert set(rows["task_ids"]) == {task} and len(rows) == kwargs["steps"] * args.batch_size
        assert all(torch.equal(p, start[name]) for name, p in shared.items())  # every task from the same start
        seen.append(task)
        with torch.no_grad():
            for p in shared.values():
                p.fill_(float(len(seen)))  # 1.0 for the first task, 2.0 for the second
        return {"steps": kwargs["steps"]}

    monkeypatch.setattr(quality, "train", fake_train)
    common = dict(task_list=list(args.tasks), route=True, batch_size=args.batch_size, lr=1e-2, seed=0)
    info = runner.paper_warmup(model, rows, {**common, "folder": tmp_path, "fast_lr_ratio": 1.0}, curves=False)
    assert seen == list(args.tasks) and info["steps"] == 2
    assert all(torch.allclose(p, torch.full_like(p, 1.5)) for p in shared.values())  # the mean of 1 and 2
    assert model.training_stage() == "multi_task"


def test_grid_rerun_resumes_and_an_interrupted_grid_retrains_one_learning_rate(grid):
    import run

    out, _ = grid
    before = json.loads((out / "results.json").read_text())
    stdout = run_quick(out, *GRID)
    assert "multi-task training" not in stdout and "unseen data:" not in stdout  # nothing retrained or re-evaluated
    assert json.loads((out / "results.json").read_text())["runs"] == before["runs"]

    # as if interrupted while training LoRA at 1e-3: neither its record nor its adapter was written
    args = run.parse(["--quick", *GRID])
    lost = "lora|seed0|lr=0.001"
    (out / ".cache" / "adapters" / f"lora-seed0-{run.source_fp(args, 'lora', 0, 1e-3)}.pt").unlink()
    data = json.loads((out / "results.json").read_text())
    del data["runs"][lost]
    (out / "results.json").write_text(json.dumps(data))
    stdout = run_quick(out, *GRID)
    assert stdout.count("multi-task training") == 1 and "[lora seed 0 lr 0.001] multi-task training" in stdout
    after = json.loads((out / "results.json").read_text())["runs"]
    assert after[lost]["validation_loss"] == before["runs"][lost]["validation_loss"]
    assert {k: r["fingerprint"] for k, r in after.items()} == {k: r["fingerprint"] for k, r in before["runs"].items()}


def _put_many(folder: str, prefix: str) -> None:
    import run

    state = run.State(Path(folder))
    for i in range(100):
        state.put(f"{prefix}{i}", {"fingerprint": "x", "i": i})
    if prefix == "a":
        state.put_speed({"by": prefix})
    else:
        state.save()  # a whole-file save with a stale view of the file


def test_reuse_carries_over_only_the_runs_a_wider_grid_would_compute_again(tmp_path):
    """benchmarks/reuse.py: after a grid is widened, the evaluations whose choice did not change are copied under
    the new fingerprints (they would train and score the same adapter again); the others are left to rerun."""
    import reuse
    import run

    flags = ["--quick", "--methods", "pt", "--seeds", "0", "1", "--lr-grid", "--lr-grid-seeds", "0", "--target-lr-grid"]
    old = run.parse([*flags, "--prompt-lr-grid", "3e-3", "1e-2", "--lora-lr-grid", "3e-4", "1e-3"])
    new = run.parse([*flags, "--prompt-lr-grid", "1e-3", "3e-3", "1e-2", "--lora-lr-grid", "1e-4", "3e-4", "1e-3"])
    old_plan = run.plan(old, ["pt"])
    loss = {0.003: 0.5, 0.01: 0.4}  # the narrow grid chose 1e-2, for the multi-task adapter and for the target
    old_runs = {}
    for key, fp in old_plan.items():
        record = {"fingerprint": fp, "average": {"macro_f1": 0.5}}
        if "|lr=" in key:
            record["validation_loss"] = loss[float(key.rsplit("lr=", 1)[1])]
        elif "|pubmedqa|" in key:
            record["target_lr"] = 0.01
        old_runs[key] = record
    old_runs["pt|seed0|pubmedqa|k=1|lr=0.003"]["validation_loss"] = 0.9
    state = run.State(tmp_path)
    new_plan = run.plan(new, ["pt"])

    def put_grid(key: str, value: float) -> None:
        state.put(key, {"fingerprint": new_plan[key], "validation_loss": value})

    same = {k for k, fp in new_plan.items() if old_plan.get(k) == fp}  # zero-shot, grid runs at 3e-3 and 1e-2
    assert same == {
        "zero-shot|sms_spam",
        "zero-shot|trec",
        "zero-shot|pubmedqa",
        "pt|seed0|lr=0.003",
        "pt|seed0|lr=0.01",
    }
    assert set(reuse.reuse(old, new, old_runs, state, "old")) == same  # and nothing else: no choice is known yet
    put_grid("pt|seed0|lr=0.001", 0.45)  # 1e-2 stays the choice
    copied = reuse.reuse(old, new, old_runs, state, "old")
    downstream = ["pt|seed0|unseen_data", "pt|seed0|pubmedqa|k=1|lr=0.003", "pt|seed0|pubmedqa|k=1|lr=0.01"]
    assert copied == [*downstream, "pt|seed1|unseen_data"]  # the unseen task waits for its own wider grid
    runs = state.data["runs"]
    assert all(runs[k]["fingerprint"] == new_plan[k] and runs[k]["reused_from"] == "old" for k in copied)
    assert runs["pt|seed0|unseen_data"]["lr_grid"] == {"0.001": 0.45, "0.003": 0.5, "0.01": 0.4}
    assert "pt|seed0|pubmedqa|k=1|lr=0.001" not in runs  # a learning rate the narrow grid never trained
    put_grid("pt|seed0|pubmedqa|k=1|lr=0.001", 0.95)  # the target's choice stays 1e-2 as well
    assert reuse.reuse(old, new, old_runs, state, "old") == ["pt|seed0|pubmedqa|k=1", "pt|seed1|pubmedqa|k=1"]
    assert reuse.reuse(old, new, old_runs, state, "old") == []  # nothing twice

    (tmp_path / "other").mkdir()
    other = run.State(tmp_path / "other")  # the wider grid chooses its new value: nothing downstream is the same
    other.put("pt|seed0|lr=0.001", {"fingerprint": new_plan["pt|seed0|lr=0.001"], "validation_loss": 0.1})
    assert set(reuse.reuse(old, new, old_runs, other, "old")) == same
    with pytest.raises(SystemExit, match="--target-steps"):
        reuse.reuse(old, run.parse([*flags, "--target-steps", "3"]), old_runs, other, "old")


def test_method_lr_grid_shifts_one_method_s_grid_at_the_same_size(tmp_path, capsys):
    """--method-lr-grid: one method trains at its own grid (as many values as the family's); the trainings it
    shares with the family grid keep their fingerprints, so reuse.py carries them over and only the new value
    trains; a grid of another size, an unknown method or a grid without --lr-grid is refused."""
    import reuse
    import run

    flags = ["--quick", "--methods", "pt", "ta-lora", "--lr-grid", "--prompt-lr-grid", "1e-2", "3e-2"]
    flags += ["--lora-lr-grid", "1e-3", "3e-3"]
    family = run.parse(flags)
    shifted = run.parse([*flags, "--method-lr-grid", "pt=3e-2,1e-1"])
    assert run.lr_grid(shifted, "pt") == [3e-2, 1e-1] and run.lr_grid(shifted, "ta-lora") == [1e-2, 3e-2]
    old_plan, new_plan = run.plan(family, ["pt", "ta-lora"]), run.plan(shifted, ["pt", "ta-lora"])
    assert new_plan["pt|seed0|lr=0.03"] == old_plan["pt|seed0|lr=0.03"] and "pt|seed0|lr=0.1" in new_plan
    assert "pt|seed0|lr=0.01" not in new_plan
    assert new_plan["pt|seed0|unseen_data"] != old_plan["pt|seed0|unseen_data"]  # its choice may move
    assert new_plan["ta-lora|seed0|unseen_data"] == old_plan["ta-lora|seed0|unseen_data"]  # the others' stay
    old_runs = {k: {"fingerprint": fp, "validation_loss": 0.5} for k, fp in old_plan.items() if "|lr=" in k}
    copied = reuse.reuse(family, shifted, old_runs, run.State(tmp_path), "old")
    assert "pt|seed0|lr=0.03" in copied and "pt|seed0|lr=0.1" not in copied
    for bad, message in (
        (["--method-lr-grid", "pt=1e-2,3e-2,1e-1"], "give 2 distinct positive learning rates"),
        (["--method-lr-grid", "pt=1e-2,1e-2"], "give 2 distinct positive"),
        (["--method-lr-grid", "gpt=1e-2,3e-2"], "unknown method 'gpt'"),
        (["--method-lr-grid", "pt=1e-2,x"], "METHOD=LR,LR"),
        (["--method-lr-grid", "pt=1e-2,3e-2", "pt=3e-2,1e-1"], "given twice"),
    ):
        with pytest.raises(SystemExit):
            run.parse([*flags, *bad])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.parse(["--quick", "--method-lr-grid", "pt=1e-2,3e-2,1e-1"])
    assert "--method-lr-grid needs --lr-grid" in capsys.readouterr().err


def test_method_target_lr_grid_gives_one_method_s_unseen_tasks_their_own_grid(tmp_path, capsys):
    """--method-target-lr-grid: a method's unseen tasks train at their own grid (its multi-task grid stays); the
    target trainings at shared values keep their fingerprints and are carried over; the unseen-task evaluation,
    whose choice may move, gets a new one."""
    import reuse
    import run

    flags = ["--quick", "--methods", "pt", "--lr-grid", "--target-lr-grid", "--prompt-lr-grid", "1e-2", "3e-2"]
    flags += ["--lora-lr-grid", "1e-3", "3e-3"]
    family = run.parse(flags)
    own = run.parse([*flags, "--method-target-lr-grid", "pt=3e-3,1e-2"])
    assert run.lr_grid(own, "pt") == [1e-2, 3e-2] and run.target_lr_grid(own, "pt") == [3e-3, 1e-2]
    assert run.target_lr_grid(family, "pt") == [1e-2, 3e-2]
    old_plan, new_plan = run.plan(family, ["pt"]), run.plan(own, ["pt"])
    shared, added, dropped = (f"pt|seed0|pubmedqa|k=1|lr={lr}" for lr in ("0.01", "0.003", "0.03"))
    assert new_plan[shared] == old_plan[shared] and added in new_plan and dropped not in new_plan
    assert new_plan["pt|seed0|unseen_data"] == old_plan["pt|seed0|unseen_data"]  # the multi-task grid is the same
    assert new_plan["pt|seed0|pubmedqa|k=1"] != old_plan["pt|seed0|pubmedqa|k=1"]
    old_runs = {k: {"fingerprint": fp, "validation_loss": 0.5} for k, fp in old_plan.items() if "|lr=" in k}
    copied = reuse.reuse(family, own, old_runs, run.State(tmp_path), "old")
    assert shared in copied and added not in copied
    with pytest.raises(SystemExit):
        run.parse([f for f in flags if f != "--target-lr-grid"] + ["--method-target-lr-grid", "pt=3e-3,1e-2"])
    assert "--method-target-lr-grid needs --target-lr-grid" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.parse([*flags, "--method-target-lr-grid", "pt=3e-3"])
    assert "--method-target-lr-grid pt=3e-3: give 2 distinct positive" in capsys.readouterr().err


def test_state_keeps_every_writer_s_results(tmp_path):
    """Two processes putting runs into one results.json under the lock lose none; a whole-file save of one keeps
    the other's runs and speed results."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_put_many, args=(str(tmp_path), prefix)) for prefix in "ab"]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
    assert [writer.exitcode for writer in writers] == [0, 0]
    data = json.loads((tmp_path / "results.json").read_text())
    assert sorted(data["runs"]) == sorted(f"{p}{i}" for p in "ab" for i in range(100))
    assert data["speed"] == {"by": "a"}


def test_flags_grid_shards_and_the_default_fingerprints():
    import methods
    import run

    args = run.parse(["--quick", "--lr-grid", "--prompt-lr-grid", "1e-2", "2e-2", "--lora-lr-grid", "1e-3", "2e-3"])
    assert run.lr_grid(args, "ta-lora/equal-lr") == [1e-2, 2e-2] and run.lr_grid(args, "poly") == [1e-3, 2e-3]
    assert run.lr_grid(args, "ta-lora/lr-3e-3") == [3e-3]  # a learning-rate variant keeps its one value
    assert "ta-lora|seed0|lr=0.02" in run.plan(args, ["ta-lora"])
    # --ablation-lr: the variants hold TA-LoRA's chosen learning rate (one training per seed), the methods keep
    # their grid, and a learning-rate variant keeps its own value
    held = run.parse(["--quick", "--lr-grid", "--lr-grid-seeds", "0", "--seeds", "0", "1", "--ablation-lr", "3e-3"])
    assert run.lr_grid(held, "ta-lora/no-warmup") == [3e-3] and run.lr_grid(held, "ta-lora/r-4") == [3e-3]
    assert run.lr_grid(held, "ta-lora") == held.prompt_lr_grid and run.lr_grid(held, "ta-lora/lr-3e-2") == [3e-2]
    planned = run.plan(held, ["ta-lora/no-warmup"])
    assert sorted(k for k in planned if "|lr=" in k) == ["ta-lora/no-warmup|seed0|lr=0.003"]
    for bad in (
        ["--ablation-lr", "3e-3"],
        ["--lr-grid", "--ablation-lr", "0"],
        ["--lr-grid", "--lr", "1e-3"],
        ["--prompt-lr-grid", "1e-2"],
        ["--shard", "2/2"],
        ["--shard", "x"],
    ):
        with pytest.raises(SystemExit):
            run.parse(["--quick", *bad])
    with pytest.raises(SystemExit):
        run.parse(["--quick", "--fresh", "--shard", "0/2"])
    keys = [*methods.METHODS, *methods.ABLATIONS]
    args = run.parse(["--quick", "--seeds", "0", "1", "--shard", "1/2"])
    mine = run.units(args, keys)
    assert mine == [(s, k) for s in (0, 1) for k in keys][1::2] and not run.mine(args, keys, "zero-shot|trec")
    assert run.parse(["--quick"]).eval_every == 0  # curves are off by default ...
    assert run.parse(["--quick", "--eval-every", "1"]).eval_every == 1  # ... and on when asked

    # results cached before these flags existed keep their fingerprints (the committed results.json, if it was
    # made before them): the default budget gains no validation settings
    data = json.loads((ROOT / "benchmarks" / "results.json").read_text())
    settings = data["meta"]["settings"]
    if "lr_grid" in settings:
        pytest.skip("the committed results.json was made with the learning-rate grid flags")
    args = run.parse(["--quick"] if settings["quick"] else [])
    for name, value in settings.items():
        if name not in ("output_dir", "methods", "skip_quality", "skip_speed", "quick", "tiny"):
            setattr(args, name, value)
    args.tiny = settings["tiny"]
    assert run.plan(args, data["plan"]["methods"]) == data["plan"]["runs"]


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
    methods = ["--tasks", "pubmedqa", "--methods", "base", "ta-lora", "ta-lora/closest", "lora"]
    first = run_new_tasks(out, *methods)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    record = json.loads((out / "pubmedqa.json").read_text())
    assert record["settings"]["shots"] == 2 and record["settings"]["steps"] == 2
    assert record["base"]["test"]["n"] == 8
    for method in ("ta-lora", "ta-lora/closest", "lora"):
        entry = record[method]
        assert len(entry["grid"]) == 3  # the same grid size for every method
        # every point (the start, then steps 1 and 2 of every lr) is scored on validation and test
        assert all(sorted(run["points"]) == ["1", "2"] for run in entry["grid"].values())
        points = [(entry["start"], 0, None)] + [
            (point, int(step), float(lr)) for lr, run in entry["grid"].items() for step, point in run["points"].items()
        ]
        assert all(len(p["test"]["predictions"]) == 8 and len(p["validation"]["scores"]) == 6 for p, _, _ in points)
        # the chosen point is the best validation macro-F1 over the whole grid, earliest step on ties,
        # and its test record is the one stored for that point
        best = max(p["validation"]["macro_f1"] for p, _, _ in points)
        earliest = min((step, i) for i, (p, step, _) in enumerate(points) if p["validation"]["macro_f1"] == best)
        kept, step, lr = points[earliest[1]]
        assert entry["validation_macro_f1"] == best and (entry["step"], entry["lr"]) == (step, lr)
        assert entry["test"] == kept["test"]
        assert all(len(run["train_loss"]) == 2 for run in entry["grid"].values())
    # the default start (c = 0) is the base model: its step-0 predictions are the base model's
    assert all(run["new_task_start"] == "base" for run in record["ta-lora"]["grid"].values())
    assert record["ta-lora"]["start"]["validation"] == record["base"]["validation"]["0"]
    assert record["ta-lora"]["start"]["test"] == record["base"]["test"]
    assert record["ta-lora/closest"]["grid"]["0.01"]["init_from"] in (
        "movie_sentiment tweet_sentiment amazon_sentiment nyt_sentiment sms_spam trec bbc_topic boolq".split()
    )
    assert "| pubmedqa | 8 |" in first.stdout and "ta-lora/closest - base (paired)" in first.stdout

    again = run_new_tasks(out, *methods)  # everything is done: nothing trains again
    assert again.returncode == 0 and "== pubmedqa" not in again.stdout
    pooled = run_new_tasks(out, *methods, "--report", "--pool", str(out), "--rules")
    assert "Pooled over 1 (task, seed) pairs (pubmedqa (seed 0))" in pooled.stdout
    assert "Choice rules replayed on 1 tasks (pubmedqa); validation rows per task: pubmedqa 6." in pooled.stdout
    assert "- ta-lora - ta-lora/closest (paired): " in pooled.stdout  # the default start against the other
    # another adapter's folder on the same rows pairs with this one; a folder on other rows is refused
    twin = tmp_path / "twin"
    twin.mkdir()
    record["settings"]["adapter"] = "another/adapter"
    (twin / "pubmedqa.json").write_text(json.dumps(record))
    versus = run_new_tasks(out, *methods, "--report", "--versus", str(twin))
    assert versus.returncode == 0, versus.stderr[-2000:]
    assert f"ta-lora here minus ta-lora in {twin}" in versus.stdout
    assert "Average over 1 tasks: 0.0 [0.0, 0.0]" in versus.stdout or "Average over 1 tasks: +0.0" in versus.stdout
    record["settings"]["val_rows"] = 7
    (twin / "pubmedqa.json").write_text(json.dumps(record))
    refused = run_new_tasks(out, *methods, "--report", "--versus", str(twin))
    assert refused.returncode != 0 and "was made with other settings (val_rows)" in refused.stderr
    empty = run_new_tasks(tmp_path / "nothing", *methods, "--report")
    assert empty.returncode != 0 and "No results for pubmedqa in " in empty.stderr
    other = run_new_tasks(out, *methods, "--seed", "1")
    assert other.returncode != 0 and "made with other settings" in other.stdout + other.stderr


# ----------------------------------------------------------------------------- benchmarks/choice_rules.py
def _point(predictions, references, test_f1, nll=None, num_labels=2):
    """A scored point: validation predictions, label scores whose gold entry is ``-nll``, and a test macro-F1."""
    nll = [1.0] * len(references) if nll is None else nll
    scores = [[-n if label == ref else -5.0 for label in range(num_labels)] for n, ref in zip(nll, references)]
    validation = {"predictions": predictions, "references": references, "num_labels": num_labels, "scores": scores}
    from peft_talora.suite.intervals import metric_values

    validation["macro_f1"] = float(metric_values(predictions, references, num_labels, "macro_f1"))
    return {
        "validation": validation,
        "test": {"macro_f1": test_f1, "predictions": [0], "references": [0], "num_labels": 2},
    }


def _entry(start, grid):
    return {"start": start, "grid": {lr: {"points": points} for lr, points in grid.items()}}


def test_choice_rules_keep_the_point_each_rule_names():
    import choice_rules as CR

    refs = [0, 1] * 20  # 40 balanced rows
    start = _point([0] * 40, refs, 0.30, nll=[2.0] * 40)  # majority class: macro-F1 1/3
    small_gain = [0] * 38 + [0, 1]  # one more row right than the start: not a resolved gain on 40 rows
    entry = _entry(
        start,
        {
            "0.01": {"8": _point(small_gain, refs, 0.35, nll=[1.5] * 40), "16": _point(small_gain, refs, 0.36)},
            "0.03": {"8": _point(refs, refs, 0.60, nll=[0.5] * 40), "16": _point(refs, refs, 0.10, nll=[0.2] * 40)},
        },
    )
    points = CR.points(entry)
    assert [(p.lr, p.step) for p in points] == [(None, 0), (0.01, 8), (0.01, 16), (0.03, 8), (0.03, 16)]
    # f1: perfect at lr 0.03 on steps 8 and 16; the tie goes to the earlier step
    assert (CR.choose(points, "f1").lr, CR.choose(points, "f1").step) == (0.03, 8)
    # loss: the lowest mean gold-label negative log-likelihood is lr 0.03, step 16 (0.2)
    assert (CR.choose(points, "loss").lr, CR.choose(points, "loss").step) == (0.03, 16)
    assert CR.choose(points, "start").lr is None
    # f1-resolved keeps a gain of 40 of 40 rows over 20 of 40, and refuses one of a single row
    assert CR.choose(points, "f1-resolved").step == 8
    weak = CR.points(_entry(start, {"0.01": {"8": _point(small_gain, refs, 0.35)}}))
    assert CR.choose(weak, "f1").step == 8 and CR.choose(weak, "f1-resolved").step == 0
    with pytest.raises(ValueError, match="Unknown choice rule 'best'"):
        CR.choose(points, "best")


def test_choice_rule_replay_on_row_subsets_matches_a_direct_computation():
    import choice_rules as CR
    import numpy as np

    rng = np.random.default_rng(3)
    refs = rng.integers(0, 3, size=30).tolist()
    preds = [rng.integers(0, 3, size=30).tolist() for _ in range(4)]
    entry = _entry(
        _point(preds[0], refs, 0.2, num_labels=3),
        {"0.1": {str(s): _point(p, refs, 0.1 * s, num_labels=3) for s, p in zip((1, 2, 3), preds[1:])}},
    )
    replay = CR.Replay(CR.points(entry))
    rows = CR.subsets(30, 12, draws=25, seed=1)
    assert rows.shape == (25, 12) and all(len(set(r)) == 12 for r in rows.tolist())
    assert CR.subsets(30, 40, draws=25).tolist() == [list(range(30))]  # more than there are: all rows, once
    chosen = replay.choose("f1", rows)
    from peft_talora.suite import classification_metrics  # evaluate's f1, not the replay's numpy macro-F1

    for subset, kept in zip(rows, chosen):
        f1 = [classification_metrics([p[i] for i in subset], [refs[i] for i in subset], 3)["macro_f1"] for p in preds]
        expected = min(range(4), key=lambda i: (-round(f1[i], 12), i))  # steps increase with the index here
        assert kept == expected


def test_choice_rules_report_counts_points_below_the_base_model():
    import choice_rules as CR

    refs = [0, 1] * 20
    start = _point([0] * 40, refs, 0.30)
    results = {
        "task_a": {
            "base": {"test": {"macro_f1": 0.30, "predictions": [0, 1], "references": [0, 1], "num_labels": 2}},
            "ours": {**_entry(start, {"0.1": {"8": _point(refs, refs, 0.20)}}), "test": {}},
            "peer": {**_entry(start, {"0.1": {"8": _point([0] * 40, refs, 0.25)}}), "test": {}},
        }
    }
    for method in ("ours", "peer"):  # the test records the report pairs (two rows)
        for point in [results["task_a"][method]["start"], results["task_a"][method]["grid"]["0.1"]["points"]["8"]]:
            point["test"].update(predictions=[0, 1] if point["test"]["macro_f1"] >= 0.3 else [0, 0], references=[0, 1])
    text = CR.rules_report(results, ["ours", "peer"], sizes=(16,), draws=20)
    kept_table = text.split("**Kept on all validation rows**")[1].split("Per task")[0]
    rows = {line.split(" | ")[0]: line for line in kept_table.splitlines() if line.startswith("| ")}
    # f1 keeps our trained point (perfect on validation, 20.0 on test: below the base model's 30.0); start keeps 30.0
    assert rows["| f1"].endswith("| ours 1, peer 0 |") and rows["| start"].endswith("| ours 0, peer 0 |")
    assert "| task_a | f1 | 20.0 (lr 0.1, step 8) | 30.0 (start (step 0)) |" in text
    assert "| f1 | 16 | 20.0 (100%) | 30.0 (0%) |" in text
    assert CR.rules_report({"task_b": {"base": {}}}, ["ours"]).startswith("No task has every method finished")


def test_new_task_benchmark_turns_a_saved_benchmark_state_into_an_adapter_folder(tmp_path):
    import methods as M
    import new_tasks
    import torch
    from peft import PeftModel

    from peft_talora.smollm2 import load_model
    from peft_talora.suite import SOURCE_TASKS

    base, _ = load_model(tiny=True)
    trained = M.build("ta-lora", base, list(SOURCE_TASKS), seed=0, tok_path=None)
    state = {name: torch.randn_like(value) for name, value in M.trainable_state(trained).items()}
    torch.save({"state": state, "train": {}}, tmp_path / "ta-lora-seed0-abc.pt")
    folder = new_tasks.adapter_folder(str(tmp_path / "ta-lora-seed0-abc.pt"), tmp_path / "scratch", tiny=True)
    assert Path(folder).parent == tmp_path / "scratch" and Path(folder).name.startswith("adapter_ta-lora-seed0-abc_")
    assert [p.name for p in (tmp_path / "scratch").iterdir()] == [Path(folder).name]  # moved into place whole
    loaded = PeftModel.from_pretrained(load_model(tiny=True)[0], folder, is_trainable=True)
    params = dict(loaded.named_parameters())
    assert all(torch.equal(params[name], value) for name, value in state.items())
    assert new_tasks.adapter_folder("some/adapter", tmp_path, tiny=True) == "some/adapter"  # a folder as it is


def test_aligned_u_is_the_top_singular_vector_of_the_v_gradients_over_a_basis_of_u(tmp_path):
    """``aligned_u`` reads ``dL/dP`` through the shared prompt; the independent computation reads it
    through ``v``: with ``v = 0`` and ``u = e_i``, ``dL/dv = s * (B^T dL/dP)[i]``, so ``r`` probes give ``M``."""
    import new_tasks
    import torch
    from peft import get_peft_model

    import peft_talora
    from peft_talora.smollm2 import load_model

    torch.manual_seed(0)
    base, _ = load_model(tiny=True)
    config = peft_talora.TALoraConfig(task_type="CAUSAL_LM", task_names=["a", "b"], num_virtual_tokens=4, r=3)
    model = get_peft_model(base, config)
    bank = model.base_model.active_bank
    with torch.no_grad():
        bank.gate.fill_(0.7)  # an untrained gate (0) would let no gradient reach the prompt
    model.add_tasks(["new"])  # default start: c = 0, v = 0
    new = model.peft_config["default"].task_names.index("new")
    input_ids = torch.randint(3, base.config.vocab_size, (5, 9))
    labels = torch.full_like(input_ids, -100)
    labels[:, -2:] = input_ids[:, -2:]
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "task_ids": torch.full((5,), new),
    }
    before = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    u = new_tasks.aligned_u(model, batch, chunk_size=2)

    # left as it was: gate scale 0 (the base model's output), nothing frozen made trainable, no grads
    assert torch.equal(bank.task_gate[:, new], torch.zeros(bank.task_gate.shape[0]))
    assert not bank.shared_prompt.requires_grad and all(p.grad is None for p in model.parameters())
    assert torch.equal(model(**{k: v for k, v in batch.items() if k != "labels"}).logits, before)

    L, _, r = bank.task_u.shape
    rows = []
    with torch.no_grad():
        bank.task_gate_blocks[-1].fill_(1.0)
    for i in range(r):
        with torch.no_grad():
            bank.task_u_blocks[-1][:, 0] = torch.nn.functional.one_hot(torch.tensor(i), r).float()
        bank.task_v_blocks[-1].grad = None
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none"
        )
        (loss.sum(1) / 2).mean().backward()
        rows.append(bank.task_v_blocks[-1].grad[:, 0].clone())  # (L, d)
    expected = torch.linalg.svd(torch.stack(rows, 1), full_matrices=False)[0][:, :, 0]  # (L, r)
    assert torch.allclose(u.norm(dim=1), torch.ones(L), atol=1e-5)
    assert torch.allclose((u * expected).sum(1).abs(), torch.ones(L), atol=1e-4)  # equal up to sign


def test_choice_rules_treat_equal_macro_f1_as_a_tie_and_choose_within_the_run_grid():
    import choice_rules as CR

    from peft_talora.suite.intervals import metric_values

    # two prediction vectors with the same macro-F1 that floats sum to different last bits
    refs = [0] * 10 + [1] * 10 + [2] * 10
    start_preds = [0, 2, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0, 2, 0, 1, 1, 2, 2, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 2, 0]
    trained_preds = [2, 2, 2, 1, 2, 0, 1, 2, 2, 1, 1, 0, 1, 1, 2, 2, 0, 2, 1, 1, 2, 1, 0, 0, 2, 1, 1, 1, 2, 1]
    f1_start, f1_trained = (float(metric_values(p, refs, 3, "macro_f1")) for p in (start_preds, trained_preds))
    assert f1_start < f1_trained and round(f1_start, 12) == round(f1_trained, 12)  # higher by float noise only
    entry = _entry(
        _point(start_preds, refs, 0.3, num_labels=3), {"0.01": {"8": _point(trained_preds, refs, 0.5, num_labels=3)}}
    )
    assert CR.choose(CR.points(entry), "f1").step == 0  # a tie: the earlier step
    # a learning rate the run's grid no longer holds (a resumed record) is not chosen
    stale = _entry(_point([0] * 40, [0, 1] * 20, 0.3), {"0.003": {"8": _point([0, 1] * 20, [0, 1] * 20, 0.9)}})
    assert CR.choose(CR.points(stale), "f1").lr == 0.003
    stale["lrs"] = []
    assert CR.choose(CR.points(stale), "f1").lr is None


def test_choice_rules_report_weights_every_task_equally_whatever_its_validation_rows():
    import choice_rules as CR

    def task(rows, below):
        refs = [0, 1] * (rows // 2)
        start = _point([0] * rows, refs, 0.30)
        trained = _point(refs, refs, 0.20 if below else 0.40)  # perfect on validation
        base = {"test": {"macro_f1": 0.30, "predictions": [0, 1], "references": [0, 1], "num_labels": 2}}
        entry = {**_entry(start, {"0.1": {"8": trained}}), "test": {}}
        for point in (start, trained):
            point["test"].update(predictions=[0, 1], references=[0, 1])
        return {"base": base, "ours": entry}

    # a 96-row task whose f1 choice is below the base model, a 40-row one above it: half the tasks at every size
    text = CR.rules_report({"big": task(96, True), "small": task(40, False)}, ["ours"], sizes=(16, 40), draws=30)
    assert (
        "| f1 | 16 | 30.0 (50%) |" in text
        and "| f1 | 40 | 30.0 (50%) |" in text
        and "| f1 | all | 30.0 (50%) |" in text
    )
    assert CR.rules_report({}, []).startswith("The choice-rule study needs at least one trained method")


def test_new_task_benchmark_refuses_a_state_of_other_tasks(tmp_path):
    import methods as M
    import new_tasks
    import torch

    from peft_talora.smollm2 import load_model

    base, _ = load_model(tiny=True)
    four = M.build("ta-lora", base, ["movie_sentiment", "sms_spam", "trec", "boolq"], seed=0, tok_path=None)
    torch.save({"state": M.trainable_state(four), "train": {}}, tmp_path / "ta-lora-seed0-abc.pt")
    with pytest.raises(SystemExit, match="does not fit ta-lora on the 8 source tasks"):
        new_tasks.adapter_folder(str(tmp_path / "ta-lora-seed0-abc.pt"), tmp_path / "scratch", tiny=True)
    torch.save({"state": {}, "train": {}}, tmp_path / "lora-seed0-abc.pt")
    with pytest.raises(SystemExit, match="is not a TA-LoRA state of benchmarks/run.py"):
        new_tasks.adapter_folder(str(tmp_path / "lora-seed0-abc.pt"), tmp_path / "scratch", tiny=True)


def test_new_task_benchmark_processes_on_other_methods_of_one_task_share_its_file(tmp_path):
    out = tmp_path / "new_tasks"
    small = ["--shots", "1", "--steps", "1", "--eval-every", "1", "--val-rows", "4", "--test-rows", "4"]
    common = [sys.executable, str(ROOT / "benchmarks" / "new_tasks.py"), "--tiny", "--output-dir", str(out), *small]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    jobs = [
        subprocess.Popen(
            [*common, "--scratch", str(tmp_path / f"scratch{i}"), "--tasks", "pubmedqa", "--methods", *methods],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, methods in enumerate([["base", "lora"], ["pt"]])
    ]
    for job in jobs:
        output, _ = job.communicate(timeout=900)
        assert job.returncode == 0, output[-3000:]
    record = json.loads((out / "pubmedqa.json").read_text())
    assert {"base", "lora", "pt"} <= record.keys() and all("test" in record[m] for m in ("base", "lora", "pt"))
