"""Saving never loses the adapter already in the folder: a save that fails or is killed at any point
leaves the previous adapter loadable with its previous outputs, for both methods.

The save writes into a hidden folder beside the target and swaps it in at the end
(``peft_talora.multitask.atomic_save``); the failures are injected into PEFT's own writers.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import peft.peft_model
import pytest
import safetensors.torch
import torch
from conftest import perturb, tiny_model
from huggingface_hub import HfApi
from huggingface_hub.errors import EntryNotFoundError
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import peft_talora.multitask.atomic_save
from peft_talora import MTLLoraConfig, TALoraConfig
from peft_talora.multitask.atomic_save import TMP_MARK
from peft_talora.multitask.tuner import CARD_START

TASKS = ["a", "b", "c"]
IDS = ["c", "a", "b"]
METHODS = ["ta-lora", "mtl-lora"]
ROOT = Path(__file__).resolve().parents[1]


def config(method: str, **kwargs):
    if method == "ta-lora":
        return TALoraConfig(task_type="CAUSAL_LM", task_names=TASKS, num_virtual_tokens=4, r=4, **kwargs)
    return MTLLoraConfig(task_type="CAUSAL_LM", task_names=TASKS, r=4, target_modules=["q_proj", "v_proj"], **kwargs)


def trained(method: str, seed: int):
    """A model whose adapter differs from every other seed's (a stand-in for training)."""
    model = get_peft_model(tiny_model(), config(method)).eval()  # eval: no dropout in the outputs compared
    if method == "ta-lora":
        return perturb(model, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mtllora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def outputs(model):
    from conftest import batch

    input_ids, mask = batch()
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask, task_ids=IDS).logits


def loaded_outputs(folder):
    return outputs(PeftModel.from_pretrained(tiny_model(), folder))


def snapshot(folder) -> dict:
    """Every file under ``folder`` (symlinks as their target) -> its bytes."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): (f"-> {os.readlink(p)}" if p.is_symlink() else p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_symlink() or p.is_file()
    }


def leftovers(folder) -> list[str]:
    folder = Path(folder)
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


@pytest.fixture(params=METHODS)
def method(request):
    return request.param


@pytest.fixture
def old(tmp_path, method):
    """A folder holding a saved adapter (seed 0), a user's file and a user's subfolder; its outputs."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "tokenizer.json").write_text('{"user": "file"}')
    (folder / "notes").mkdir()
    (folder / "notes" / "run.txt").write_text("lr=1e-3")
    model = trained(method, seed=0)
    model.save_pretrained(folder)
    return folder, outputs(model)


def assert_old_adapter_intact(folder, before, expected):
    assert snapshot(folder) == before, "the failed save changed the folder"
    assert torch.equal(loaded_outputs(folder), expected)


# ------------------------------------------------------------------ failures inside the save


def half_written_weights(tensors, filename, metadata=None):
    """PEFT's safetensors writer, stopping with a disk error after half of the file."""
    data = safetensors.torch.save(tensors, metadata=metadata)
    with open(filename, "wb") as file:
        file.write(data[: len(data) // 2])
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("tasks", [None, ["b", "a"]], ids=["whole", "export"])
def test_failed_weights_write_keeps_the_old_adapter(old, method, tasks, monkeypatch):
    folder, expected = old
    before = snapshot(folder)
    monkeypatch.setattr(peft.peft_model, "safe_save_file", half_written_weights)
    with pytest.raises(OSError, match="No space left"):
        trained(method, seed=1).save_pretrained(folder, tasks=tasks)
    monkeypatch.undo()
    assert_old_adapter_intact(folder, before, expected)
    assert leftovers(folder) == [], "the temporary folder of a failed save is removed"


def test_failed_config_write_keeps_the_old_adapter(old, method, monkeypatch):
    folder, expected = old
    before = snapshot(folder)
    model = trained(method, seed=1)
    config_cls = type(model.peft_config["default"])

    def half_written_config(self, save_directory, **kwargs):
        with open(os.path.join(save_directory, "adapter_config.json"), "w") as file:
            file.write('{"peft_type": "')
        raise OSError(122, "Disk quota exceeded")

    monkeypatch.setattr(config_cls, "save_pretrained", half_written_config)
    with pytest.raises(OSError, match="Disk quota"):
        model.save_pretrained(folder)
    monkeypatch.undo()
    assert_old_adapter_intact(folder, before, expected)
    assert leftovers(folder) == []


def test_failed_save_into_a_new_folder_creates_nothing(tmp_path, method, monkeypatch):
    monkeypatch.setattr(peft.peft_model, "safe_save_file", half_written_weights)
    with pytest.raises(OSError):
        trained(method, seed=1).save_pretrained(tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ------------------------------------------------------------------ a process killed mid-save

KILLED_SAVE = """
import os, sys, time
sys.path.insert(0, {tests!r})
from test_atomic_save import trained
import peft.peft_model, peft_talora.multitask.atomic_save, safetensors.torch
stage = {stage!r}

def signal_and_hang():
    open({marker!r}, "w").close()
    time.sleep(120)

def weights(tensors, filename, metadata=None):
    data = safetensors.torch.save(tensors, metadata=metadata)
    with open(filename, "wb") as file:
        file.write(data[: len(data) // 2])
        file.flush()
    signal_and_hang()

config_cls = type(trained({method!r}, seed=1).peft_config["default"])
original_config_save = config_cls.save_pretrained

def config(self, save_directory, **kwargs):
    with open(os.path.join(save_directory, "adapter_config.json"), "w") as file:
        file.write('{{"peft_type": "')
    signal_and_hang()

if stage == "weights":
    peft.peft_model.safe_save_file = weights
elif stage == "config":
    config_cls.save_pretrained = config
else:  # every file is complete; killed just before the swap
    peft_talora.multitask.atomic_save._exchange = lambda a, b: signal_and_hang()
trained({method!r}, seed=1).save_pretrained({folder!r})
"""


@pytest.mark.parametrize(
    "method, stage",
    [("ta-lora", "weights"), ("mtl-lora", "config"), ("ta-lora", "swap")],
    ids=["ta-lora-weights", "mtl-lora-config", "ta-lora-before-swap"],
)
def test_killed_save_keeps_the_old_adapter(old, method, stage, tmp_path):
    folder, expected = old
    before = snapshot(folder)
    marker = tmp_path / "writing"
    code = KILLED_SAVE.format(
        tests=str(ROOT / "tests"), stage=stage, method=method, marker=str(marker), folder=str(folder)
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert child.poll() is None, child.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the child never reached the injected write"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    child.stderr.close()

    assert_old_adapter_intact(folder, before, expected)
    left = leftovers(folder)
    assert left and all(f"peft-tmp-{child.pid}-" in name for name in left), left  # it was writing beside, not in
    new = trained(method, seed=1)
    new.save_pretrained(folder)  # the next save clears what the killed one left behind
    assert leftovers(folder) == []
    assert torch.equal(loaded_outputs(folder), outputs(new))


def test_a_save_clears_only_this_machine_s_leftovers(old, method):
    """On a filesystem shared by several nodes, a process id says nothing about another node's save: its
    temporary folder may belong to a save still running there, so only this machine's are removed."""
    from peft_talora.multitask.atomic_save import HOST_TAG

    folder, _ = old
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)
    other_host = "0" * 8 if HOST_TAG != "0" * 8 else "1" * 8
    mine = folder.parent / f".{folder.name}.peft-tmp-{pid}-h{HOST_TAG}-0a1b2c3d"
    untagged = folder.parent / f".{folder.name}.peft-tmp-{pid}-0a1b2c3e"  # written before host tags existed
    theirs = folder.parent / f".{folder.name}.peft-tmp-{pid}-h{other_host}-0a1b2c3f"
    for path in (mine, untagged, theirs):
        path.mkdir()
    trained(method, seed=1).save_pretrained(folder)
    assert leftovers(folder) == [theirs.name]


def test_next_save_puts_back_a_folder_moved_aside_by_a_killed_save(old, method):
    """Without an atomic exchange the swap is two renames; killed between them, the folder is back next time."""
    folder, expected = old
    before = snapshot(folder)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = folder.parent / f".{folder.name}.peft-old-{int(gone.stdout)}-0a1b2c3d"
    folder.rename(aside)  # the state after the first rename
    trained(method, seed=1).save_pretrained(folder.parent / "unrelated")
    assert aside.exists(), "only a save into the same folder restores it"
    new = trained(method, seed=1)
    new.save_pretrained(folder)
    assert not aside.exists() and leftovers(folder) == []
    after = snapshot(folder)
    assert after["tokenizer.json"] == before["tokenizer.json"] and after["notes/run.txt"] == before["notes/run.txt"]
    assert torch.equal(loaded_outputs(folder), outputs(new))


# ------------------------------------------------------------------ what a successful save keeps and replaces


def test_swap_is_one_step_and_keeps_the_users_files(old, method, monkeypatch):
    folder, expected = old
    (folder / "link.txt").symlink_to("tokenizer.json")
    card = (folder / "README.md").read_text()
    (folder / "README.md").write_text(card.replace(CARD_START, "My own notes on this adapter.\n\n" + CARD_START, 1))
    before = snapshot(folder)
    seen = []
    exchange = peft_talora.multitask.atomic_save._exchange

    def observed(new_folder, target):
        seen.append(snapshot(target))  # the target just before the swap: still the whole old folder
        return exchange(new_folder, target)

    monkeypatch.setattr(peft_talora.multitask.atomic_save, "_exchange", observed)
    new = trained(method, seed=1)
    new.save_pretrained(folder)
    assert seen == [before], "nothing is written into the target before the swap"
    after = snapshot(folder)
    for name in ("tokenizer.json", "notes/run.txt", "link.txt"):
        assert after[name] == before[name]
    assert "My own notes on this adapter." in after["README.md"].decode(), "PEFT updates the card, keeps the text"
    assert after["adapter_model.safetensors"] != before["adapter_model.safetensors"]
    assert torch.equal(loaded_outputs(folder), outputs(new))
    assert not torch.equal(outputs(new), expected)


def test_other_adapters_subfolders_survive_and_saved_ones_are_replaced(tmp_path):
    folder = tmp_path / "adapter"
    model = trained("ta-lora", seed=0)
    model.add_adapter("second", config("ta-lora"))
    model.add_adapter("third", config("ta-lora"))
    model.save_pretrained(folder)
    before = snapshot(folder)
    new = trained("ta-lora", seed=1)
    new.add_adapter("second", config("ta-lora", prompt_init_std=0.5))
    new.save_pretrained(folder, selected_adapters=["default", "second"])
    after = snapshot(folder)
    third = {k: v for k, v in before.items() if k.startswith("third/")}
    assert third and all(after[k] == v for k, v in third.items())
    assert after["second/adapter_model.safetensors"] != before["second/adapter_model.safetensors"]
    assert torch.equal(loaded_outputs(folder), outputs(new))


@pytest.mark.parametrize(
    "first, second", [(False, True), (True, False)], ids=["bin-then-safetensors", "safetensors-then-bin"]
)
def test_weights_of_the_other_format_do_not_outlive_a_save(tmp_path, first, second):
    """PEFT loads adapter_model.safetensors before adapter_model.bin: a stale one would pair old weights with the new config."""
    folder = tmp_path / "adapter"
    trained("ta-lora", seed=0).save_pretrained(folder, safe_serialization=first)
    new = trained("ta-lora", seed=1)
    new.save_pretrained(folder, safe_serialization=second)
    names = {p.name for p in folder.iterdir()}
    assert ("adapter_model.safetensors" in names) == second and ("adapter_model.bin" in names) != second
    assert torch.equal(loaded_outputs(folder), outputs(new))


def test_save_into_the_working_directory_and_through_a_symlink(tmp_path, monkeypatch):
    real = tmp_path / "real"
    trained("ta-lora", seed=0).save_pretrained(real)
    link = tmp_path / "link"
    link.symlink_to(real)
    new = trained("ta-lora", seed=1)
    new.save_pretrained(link)
    assert link.is_symlink() and os.readlink(link) == str(real), "the user's symlink stays a symlink"
    assert torch.equal(loaded_outputs(real), outputs(new))

    monkeypatch.chdir(real)
    newer = trained("ta-lora", seed=2)
    newer.save_pretrained(".")
    assert os.path.samefile(os.getcwd(), real), "the working directory follows the new folder"
    assert "adapter_config.json" in os.listdir(".")
    assert torch.equal(loaded_outputs(real), outputs(newer))


def test_without_an_atomic_exchange_two_renames_swap_it(old, method, monkeypatch):
    folder, _ = old
    monkeypatch.setattr(peft_talora.multitask.atomic_save, "_exchange", lambda a, b: False)
    new = trained(method, seed=1)
    new.save_pretrained(folder)
    assert torch.equal(loaded_outputs(folder), outputs(new))
    assert (folder / "notes" / "run.txt").read_text() == "lr=1e-3"
    assert leftovers(folder) == []


def test_without_an_atomic_exchange_a_failed_second_rename_puts_the_old_folder_back(old, method, monkeypatch):
    folder, expected = old
    before = snapshot(folder)
    monkeypatch.setattr(peft_talora.multitask.atomic_save, "_exchange", lambda a, b: False)
    rename = os.rename

    def failing(source, destination):
        if TMP_MARK in os.path.basename(source):  # the new folder into the target's place
            raise OSError(errno.EIO, "simulated failure", destination)
        return rename(source, destination)

    monkeypatch.setattr(peft_talora.multitask.atomic_save.os, "rename", failing)
    with pytest.raises(OSError, match="simulated failure"):
        trained(method, seed=1).save_pretrained(folder)
    monkeypatch.setattr(peft_talora.multitask.atomic_save.os, "rename", rename)
    assert snapshot(folder) == before and torch.equal(loaded_outputs(folder), expected)
    assert leftovers(folder) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("created", [True, False], ids=["folder-made-meanwhile", "folder-existed"])
def test_files_other_processes_write_during_the_save_are_kept(tmp_path, method, monkeypatch, exchange, created):
    """A distributed Trainer's other ranks write ``rng_state_<rank>.pth`` into the checkpoint folder while the main
    rank saves the model there, without waiting for it: they may even create the folder first. Their files survive
    the swap, and the save neither fails nor loses the adapter."""
    folder = tmp_path / "checkpoint-10"
    if not created:
        folder.mkdir()
        (folder / "rng_state_0.pth").write_bytes(b"rank 0")
    if not exchange:
        monkeypatch.setattr(peft_talora.multitask.atomic_save, "_exchange", lambda a, b: False)
    fsync = peft_talora.multitask.atomic_save._fsync_new_files

    def another_rank_writes(new_folder):  # after the carry-over, just before the swap
        folder.mkdir(exist_ok=True)
        (folder / "rng_state_1.pth").write_bytes(b"rank 1")
        fsync(new_folder)

    monkeypatch.setattr(peft_talora.multitask.atomic_save, "_fsync_new_files", another_rank_writes)
    model = trained(method, seed=1)
    model.save_pretrained(folder)
    assert (folder / "rng_state_1.pth").read_bytes() == b"rank 1"
    assert created or (folder / "rng_state_0.pth").read_bytes() == b"rank 0"
    assert torch.equal(loaded_outputs(folder), outputs(model))
    assert leftovers(folder) == []


def test_a_folder_that_cannot_be_swapped_is_replaced_file_by_file(old, method, monkeypatch):
    """A mount point (a container volume) cannot be renamed: files are replaced one by one, with a warning."""
    folder, _ = old
    (folder / "adapter_model.bin").write_bytes(b"stale weights of the other format")
    monkeypatch.setattr(os.path, "ismount", lambda path: os.path.realpath(path) == str(folder))
    new = trained(method, seed=1)
    with pytest.warns(UserWarning, match="cannot be replaced as a whole.*new weights with the old config"):
        new.save_pretrained(folder)
    assert torch.equal(loaded_outputs(folder), outputs(new))
    assert not (folder / "adapter_model.bin").exists()
    assert (folder / "tokenizer.json").read_text() == '{"user": "file"}'
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []


# ------------------------------------------------------------------ non-finite weights


def poison(model, method):
    """NaN in task ``c``'s own weights only."""
    with torch.no_grad():
        if method == "ta-lora":
            model.base_model.talora_banks["default"].task_u_blocks[0][:, 2] = float("nan")
            return "base_model.talora_banks.task_u"
        name, p = next((n, p) for n, p in model.named_parameters() if "mtllora_lambda" in n)
        p[2] = float("inf")
        return name.split("base_model.model.", 1)[1].rsplit(".", 2)[0]


def test_non_finite_weights_are_not_saved(old, method):
    folder, expected = old
    before = snapshot(folder)
    model = trained(method, seed=1)
    tensor = poison(model, method)
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or inf\)") as info:
        model.save_pretrained(folder)
    message = str(info.value)
    assert tensor in message and "Nothing was written" in message and str(folder) in message
    assert_old_adapter_intact(folder, before, expected)
    with pytest.raises(ValueError, match="non-finite"):
        model.save_pretrained(folder.parent / "fresh")
    assert not (folder.parent / "fresh").exists()
    # an export without the broken task is fine
    model.save_pretrained(folder.parent / "ab", tasks=["a", "b"])
    assert json.loads((folder.parent / "ab" / "adapter_config.json").read_text())["task_names"] == ["a", "b"]


def test_non_finite_weights_are_not_loaded(old, method, tmp_path):
    folder, _ = old
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes((folder / "adapter_config.json").read_bytes())
    tensors = load_file(folder / "adapter_model.safetensors")
    name = sorted(tensors)[-1]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, broken / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or inf\) in .*The load was stopped") as info:
        PeftModel.from_pretrained(tiny_model(), broken)
    assert str(broken) in str(info.value)

    model = trained(method, seed=1)
    expected = outputs(model)
    with pytest.raises(ValueError, match="non-finite"):
        model.load_adapter(broken, adapter_name="other")
    assert list(model.peft_config) == ["default"], "the broken adapter is not left in the model"
    assert torch.equal(outputs(model), expected)


# ------------------------------------------------------------------ push_to_hub


@pytest.fixture
def hub(monkeypatch):
    sent = {"commits": 0}

    def create_commit(self, repo_id, operations, **kwargs):
        sent["commits"] += 1
        sent["files"] = sorted(op.path_in_repo for op in operations)

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: type("Repo", (), {"repo_id": repo_id})())
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(
        "huggingface_hub.repocard.hf_hub_download",
        lambda *a, **k: (_ for _ in ()).throw(EntryNotFoundError("no README yet")),
    )
    return sent


def test_push_to_hub_uploads_nothing_when_the_save_fails(hub, method, monkeypatch):
    model = trained(method, seed=1)
    with monkeypatch.context() as patch:
        patch.setattr(peft.peft_model, "safe_save_file", half_written_weights)
        with pytest.raises(OSError):
            model.push_to_hub("me/adapter")
    poison(model, method)
    with pytest.raises(ValueError, match="non-finite"):
        model.push_to_hub("me/adapter")
    assert hub["commits"] == 0
    model.push_to_hub("me/adapter", tasks=["a", "b"])  # the complete folder of the export goes up
    assert hub["commits"] == 1
    assert hub["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
