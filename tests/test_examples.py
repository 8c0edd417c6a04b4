"""Every example runs end to end in its tiny mode (tiny random model, real packaged data), so none rots."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def run_example(script, *args, cwd, check=True):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if not check:
        return result
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


def test_main_job_tiny_reports_resumes_and_saves(tmp_path):
    out = tmp_path / "job"
    args = ["--tiny", "--tasks", "sms_spam", "trec", "--targets", "pubmedqa", "--peers", "pt", "lora"]
    args += ["--output-dir", str(out)]
    stdout = run_example("main_job.py", *args, cwd=tmp_path)
    results = json.loads((out / "results.json").read_text())
    assert set(results["zero_shot"]) == {"sms_spam", "trec", "pubmedqa"}
    assert set(results["unseen_data"]) == {"sms_spam", "trec"} and set(results["unseen_tasks"]) == {"pubmedqa"}
    assert set(results["peers"]["pt"]) == {"pubmedqa"}  # the prompt-tuning peer, trained on the same shots
    assert set(results["peers"]["lora"]) == {"pubmedqa"}  # and the LoRA peer
    records = [*results["zero_shot"].values(), *results["unseen_data"].values(), *results["unseen_tasks"].values(),
               *results["peers"]["pt"].values(), *results["peers"]["lora"].values()]  # fmt: skip
    for metrics in records:
        assert list(metrics)[:2] == ["macro_f1", "macro_f1_interval"] and metrics["n"] == 4
        for metric in ("macro_f1", "accuracy"):
            low, high = metrics[f"{metric}_interval"]
            assert 0 <= low <= metrics[metric] <= high <= 1
        assert len(metrics["predictions"]) == len(metrics["references"]) == 4
    averages = results["averages"]
    assert set(averages["unseen_data"]) == {"base", "ta-lora"} and set(averages["unseen_tasks"]) == {
        "base",
        "ta-lora",
        "pt",
        "lora",
    }
    for entry in [*averages["unseen_data"].values(), *averages["unseen_tasks"].values()]:
        for metric in ("macro_f1", "accuracy"):
            assert entry[metric]["low"] <= entry[metric]["estimate"] <= entry[metric]["high"]
            assert entry[metric]["resampled"] == "rows" and entry[metric]["resamples"] == 2000
    assert set(results["differences"]["unseen_tasks"]) == {"ta-lora - base", "ta-lora - pt", "ta-lora - lora"}
    paired = results["differences"]["unseen_tasks"]["ta-lora - pt"]["macro_f1"]
    ta, pt = results["unseen_tasks"]["pubmedqa"]["macro_f1"], results["peers"]["pt"]["pubmedqa"]["macro_f1"]
    assert paired["estimate"] == pytest.approx(ta - pt) and paired["low"] <= paired["estimate"] <= paired["high"]
    for record in (results["unseen_tasks"]["pubmedqa"], results["peers"]["pt"]["pubmedqa"]):
        stopping = record["stopping"]  # early stopping on held-out validation rows: start, middle, end
        curve = {int(step): loss for step, loss in stopping["validation_loss"].items()}
        assert sorted(curve) == [0, 1, 2] and stopping["chosen_step"] == min(curve, key=lambda s: (curve[s], s))
    assert (out / "results.png").stat().st_size > 1000
    assert (
        "base zero-shot" in stdout and "sms_spam" in stdout and "PEFT prompt tuning" in stdout and "PEFT LoRA" in stdout
    )
    assert "macro-F1" in stdout and "one row = 25.0 accuracy points" in stdout and "(paired)" in stdout
    assert "step each target stage ended at (lowest validation loss at 0, 1 and 2; 0 = its start)" in stdout
    assert load_file(out / "adapter" / "adapter_model.safetensors")["base_model.talora_banks.task_u"].shape[1] == 2
    assert json.loads((out / "adapter_pubmedqa" / "adapter_config.json").read_text())["task_names"] == ["pubmedqa"]

    adapter_bytes = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    again = run_example("main_job.py", *args, cwd=tmp_path)  # every phase is done: nothing is retrained
    assert "[1/5]" not in again and "[2/5]" not in again and "[4/5]" not in again and "[5/5]" not in again
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter_bytes
    # other settings would mix with the stored results: refused, with both ways out
    changed = run_example("main_job.py", *args, "--steps", "3", "--seed", "1", cwd=tmp_path, check=False)
    assert changed.returncode != 0 and "--fresh" in changed.stderr and "another --output-dir" in changed.stderr
    assert "--seed 0 -> 1, --steps 2 -> 3" in changed.stderr
    overlap = run_example("main_job.py", "--tiny", "--tasks", "trec", "--targets", "trec", cwd=tmp_path, check=False)
    assert overlap.returncode != 0 and "['trec'] are both source tasks and targets" in overlap.stderr


def test_finetune_with_trainer_tiny(tmp_path):
    run_example("finetune_with_trainer.py", "--tiny", "--output-dir", str(tmp_path / "ft"), cwd=tmp_path)
    config = json.loads((tmp_path / "ft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "TALORA" and config["task_names"] == ["sms_spam", "trec"]


def test_add_task_few_shot_tiny(tmp_path):
    stdout = run_example("add_task_few_shot.py", "--tiny", "--output-dir", str(tmp_path / "add"), cwd=tmp_path)
    assert "old tasks ['sms_spam', 'trec'] unchanged" in stdout
    assert "pubmedqa (k=1): macro-F1" in stdout and "ended at step" in stdout and "held-out loss by step {0:" in stdout
    grown = json.loads((tmp_path / "add" / "adapter" / "adapter_config.json").read_text())
    assert grown["task_names"] == ["sms_spam", "trec", "pubmedqa"]
    alone = json.loads((tmp_path / "add" / "pubmedqa" / "adapter_config.json").read_text())
    assert alone["task_names"] == ["pubmedqa"]


def test_generate_per_task_tiny(tmp_path):
    stdout = run_example("generate_per_task.py", "--tiny", cwd=tmp_path)
    assert "sms_spam" in stdout and "trec" in stdout


def test_two_tasks_same_input_tiny(tmp_path):
    stdout = run_example(
        "two_tasks_same_input.py", "--tiny", "--steps", "2", "--output-dir", str(tmp_path / "toy"), cwd=tmp_path
    )
    assert "adapter saved" in stdout


def test_main_job_tiny_budgets_leave_the_flags_given_alone():
    """``--tiny`` shrinks the budgets a run did not set; a flag given on the command line keeps its value, even the
    default's."""
    sys.path.insert(0, str(ROOT / "examples"))
    import main_job

    tiny = main_job.parse(["--tiny", "--steps", "40", "--shots=16"])
    with pytest.raises(SystemExit):  # no abbreviations: --tiny would not see "--step 40" as --steps
        main_job.parse(["--tiny", "--step", "40"])
    assert (tiny.steps, tiny.shots, tiny.warmup_steps, tiny.output_dir) == (40, 16, 1, "outputs/main_job_tiny")
    default = main_job.parse([])
    assert (default.steps, default.shots, default.output_dir) == (40, 16, "outputs/main_job")
