"""Every example runs end to end in its tiny mode (tiny random model, real packaged data), so none rots."""

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def run_example(script, *args, cwd):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


def test_main_job_tiny_reports_resumes_and_saves(tmp_path):
    out = tmp_path / "job"
    args = ["--tiny", "--tasks", "sms_spam", "trec", "--targets", "pubmedqa", "--output-dir", str(out)]
    stdout = run_example("main_job.py", *args, cwd=tmp_path)
    results = json.loads((out / "results.json").read_text())
    assert set(results["zero_shot"]) == {"sms_spam", "trec", "pubmedqa"}
    assert set(results["unseen_data"]) == {"sms_spam", "trec"} and set(results["unseen_tasks"]) == {"pubmedqa"}
    for metrics in [*results["unseen_data"].values(), *results["unseen_tasks"].values()]:
        assert 0 <= metrics["accuracy"] <= 1 and metrics["n"] == 4
    assert (out / "results.png").stat().st_size > 1000
    assert "base zero-shot" in stdout and "sms_spam" in stdout
    assert load_file(out / "adapter" / "adapter_model.safetensors")["base_model.talora_banks.task_u"].shape[1] == 2
    assert json.loads((out / "adapter_pubmedqa" / "adapter_config.json").read_text())["task_names"] == ["pubmedqa"]

    adapter_bytes = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    again = run_example("main_job.py", *args, cwd=tmp_path)  # every phase is done: nothing is retrained
    assert "[2/4]" not in again and "[4/4]" not in again
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter_bytes


def test_finetune_with_trainer_tiny(tmp_path):
    run_example("finetune_with_trainer.py", "--tiny", "--output-dir", str(tmp_path / "ft"), cwd=tmp_path)
    config = json.loads((tmp_path / "ft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "TALORA" and config["task_names"] == ["sms_spam", "trec"]


def test_add_task_few_shot_tiny(tmp_path):
    stdout = run_example("add_task_few_shot.py", "--tiny", "--output-dir", str(tmp_path / "add"), cwd=tmp_path)
    assert "old tasks ['sms_spam', 'trec'] unchanged" in stdout
    grown = json.loads((tmp_path / "add" / "adapter" / "adapter_config.json").read_text())
    assert grown["task_names"] == ["sms_spam", "trec", "pubmedqa"]
    alone = json.loads((tmp_path / "add" / "pubmedqa" / "adapter_config.json").read_text())
    assert alone["task_names"] == ["pubmedqa"]


def test_generate_per_task_tiny(tmp_path):
    stdout = run_example("generate_per_task.py", "--tiny", cwd=tmp_path)
    assert "sms_spam" in stdout and "trec" in stdout


def test_two_tasks_same_input_tiny(tmp_path):
    stdout = run_example("two_tasks_same_input.py", "--tiny", "--steps", "2", "--output-dir", str(tmp_path / "toy"), cwd=tmp_path)
    assert "adapter saved" in stdout
