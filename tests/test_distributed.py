"""The training entry point under ``torchrun`` and ``accelerate launch`` (DDP, gloo on CPU).

Two processes with a per-device batch of 2 and one process with a batch of 4 see the same global
batch (the whole 4-row dataset every step), so they must end with the same adapter. The
orthogonality weight is large so that a penalty counted once per process would show.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file
from talora_text import tiny_tokenizer

ROWS = [
    ("question w1", "A", "first"),
    ("question w2 w3", "B C", "second"),
    ("question w4 w5 w6", "A", "first"),
    ("question w7", "C", "second"),
]
STEPS = 4


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    tiny_model().save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    with open(root / "train.jsonl", "w") as f:
        for prompt, completion, task in ROWS:
            f.write(json.dumps({"prompt": prompt, "completion": completion, "task": task}) + "\n")
    return root


def train_args(root, output, per_device_batch):
    return [
        "--model_name_or_path",
        str(root / "model"),
        "--train_file",
        str(root / "train.jsonl"),
        "--output_dir",
        str(output),
        "--max_steps",
        str(STEPS),
        "--per_device_train_batch_size",
        str(per_device_batch),
        "--learning_rate",
        "0.05",
        "--orthogonality_weight",
        "10",
        "--num_virtual_tokens",
        "4",
        "--rank",
        "4",
        "--use_cpu",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--logging_steps",
        "1",
        "--seed",
        "3",
        "--disable_tqdm",
        "true",
        "--dataloader_num_workers",
        "0",
    ]


def run(command, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.getcwd()}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def free_port() -> int:
    """A port nobody listens on now, so back-to-back or parallel runs never share a rendezvous port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def adapter(folder):
    return load_file(folder / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def single_process(workspace):
    out = workspace / "single"
    result = run([sys.executable, "-m", "peft_talora.training", *train_args(workspace, out, 4)], cwd=workspace)
    assert "world size 1, global batch 4" in result.stdout
    return adapter(out)


def assert_same_adapter(got, expected):
    assert set(got) == set(expected)
    # gates and task factors v start at zero: training must have moved them for the comparison to mean anything
    for key in ("base_model.talora_banks.gate", "base_model.talora_banks.task_v"):
        assert expected[key].abs().min() > 0, key
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)


def test_torchrun_two_processes_equal_one_process(workspace, single_process):
    out = workspace / "torchrun"
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    result = run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "-m",
            "peft_talora.training",
            *train_args(workspace, out, 2),
        ],
        cwd=workspace,
    )
    assert "world size 2, global batch 4" in result.stdout
    assert_same_adapter(adapter(out), single_process)


def test_accelerate_launch_two_processes_equal_one_process(workspace, single_process):
    out = workspace / "accelerate"
    # --multi_gpu selects accelerate's DDP launcher; --use_cpu (a TrainingArguments flag) keeps it on CPU with gloo.
    # (accelerate's --cpu flag would pick its single-process/MPI launcher instead.)
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "peft_talora.training",
    ]
    result = run([*launcher, *train_args(workspace, out, 2)], cwd=workspace)
    assert "world size 2, global batch 4" in result.stdout
    assert_same_adapter(adapter(out), single_process)


def test_uncertainty_sampling_updates_every_process_from_the_global_batch(tmp_path):
    """``task_sampling="uncertainty"`` under torchrun: both processes hold the same uncertainties after every step
    (the per-task sums are all-reduced), so they keep drawing one stream, and the run matches one process that
    sees the same global batches. Without the all-reduce each process averaged its own half of the batch."""
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_uncertainty.py")
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), worker, str(two), "2"], cwd=tmp_path)
    run([sys.executable, worker, str(one), "4"], cwd=tmp_path)
    ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1)]
    single = json.loads((one / "rank0.json").read_text())
    assert all(0.5 < u < 1.0 for u in single["uncertainties"])  # every task was drawn and updated
    assert len(set(single["uncertainties"])) == 3  # the tasks' estimates differ: a mix-up would show
    torch.testing.assert_close(torch.tensor(ranks[0]["uncertainties"]), torch.tensor(ranks[1]["uncertainties"]))
    torch.testing.assert_close(torch.tensor(ranks[0]["uncertainties"]), torch.tensor(single["uncertainties"]))
    # the two processes' batches are the halves of the single process's batches, step by step
    halves = [r0 + r1 for r0, r1 in zip(ranks[0]["drawn"], ranks[1]["drawn"])]
    assert halves == single["drawn"]
