"""``AutoPeftModelForCausalLM`` loads saved TA-LoRA and MTL-LoRA adapters, and the model card's loading lines run.

The base model is a tiny random model saved into ``tmp_path``, so everything loads offline.
"""

import json
import re

import pytest
import torch
from conftest import batch, perturb, tiny_model
from huggingface_hub import ModelCard
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from peft_talora import MTLLoraConfig, MTLLoraModel, TALoraConfig, TALoraModel
from peft_talora.multitask.tuner import CARD_END, CARD_START

TASKS = ["sst2", "trec", "boolq"]
ROUTES = ["boolq", "sst2", "trec"]  # one task per example of conftest.batch()
TUNERS = {"ta-lora": TALoraModel, "mtl-lora": MTLLoraModel}


def adapter_config(method):
    if method == "ta-lora":
        return TALoraConfig(task_type="CAUSAL_LM", task_names=TASKS, num_virtual_tokens=4, r=4)
    return MTLLoraConfig(task_type="CAUSAL_LM", task_names=TASKS, r=4, lora_dropout=0.0, target_modules="all-linear")


def trained(method, base_dir):
    """An adapter on the base saved in ``base_dir``, with every parameter moved away from its initialisation."""
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), adapter_config(method))
    if method == "ta-lora":
        return perturb(model, scale=0.3).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mtllora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def routed_logits(model, routes=ROUTES):
    input_ids, mask = batch(left_pad=2)
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask, task_ids=routes).logits


@pytest.fixture
def base_dir(tmp_path):
    tiny_model().save_pretrained(tmp_path / "base")
    return tmp_path / "base"


@pytest.mark.parametrize("method", ["ta-lora", "mtl-lora"])
def test_auto_peft_model_loads_the_adapter_like_peft_model(tmp_path, base_dir, method):
    model = trained(method, base_dir)
    assert model.peft_config["default"].base_model_name_or_path == str(base_dir)
    model.save_pretrained(tmp_path / "adapter")

    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
    assert type(auto.base_model) is TUNERS[method] and auto.peft_config["default"].task_names == TASKS
    expected = routed_logits(model)
    assert torch.equal(routed_logits(auto), routed_logits(plain))
    torch.testing.assert_close(routed_logits(auto), expected, rtol=0, atol=1e-6)
    with auto.disable_adapter():  # and the adapter really is in play
        assert (routed_logits(auto) - expected).abs().max() > 1e-2


def card_code(folder):
    """The python blocks of the card's ``## How to load`` section."""
    text = (folder / "README.md").read_text()
    section = text[text.index("## How to load") :]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.parametrize("method", ["ta-lora", "mtl-lora"])
def test_model_card_shows_the_loading_lines_and_the_task_map(tmp_path, base_dir, method):
    model = trained(method, base_dir)
    model.save_pretrained(tmp_path / "adapter")
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert card.text.count("## Tasks") == 1 and card.text.count("## How to load") == 1
    for task_id, name in enumerate(TASKS):  # the task-name -> id map
        assert f"| {task_id} | `{name}` |" in card.text
    auto_code, peft_code = card_code(tmp_path / "adapter")
    folder = str(tmp_path / "adapter")
    assert auto_code == (
        "import peft_talora\nfrom peft import AutoPeftModelForCausalLM\n\n"
        f'model = AutoPeftModelForCausalLM.from_pretrained("{folder}")\n'
    )
    assert f'base = AutoModelForCausalLM.from_pretrained("{base_dir}")\n' in peft_code
    assert "task_ids=['sst2', ...]" in card.text

    expected = routed_logits(model)
    for code in (auto_code, peft_code):  # the lines run as written and give the saved adapter
        scope = {}
        exec(code, scope)
        torch.testing.assert_close(routed_logits(scope["model"]), expected, rtol=0, atol=1e-6)

    model.save_pretrained(tmp_path / "adapter")  # saving again replaces the sections, never duplicates them
    text = (tmp_path / "adapter" / "README.md").read_text()
    assert text.count("## How to load") == 1 and text.count("| 2 | `boolq` |") == 1


def test_model_card_of_one_exported_task_and_of_a_second_adapter(tmp_path, base_dir):
    model = trained("mtl-lora", base_dir)
    model.save_pretrained(tmp_path / "trec", tasks=["trec"])
    text = (tmp_path / "trec" / "README.md").read_text()
    assert "| 0 | `trec` |" in text and "`sst2`" not in text

    model.add_adapter("other", adapter_config("mtl-lora"))
    model.save_pretrained(tmp_path / "both")
    (auto_code, _) = card_code(tmp_path / "both")
    assert f'model.load_adapter("{tmp_path / "both"}", adapter_name="other", subfolder="other")' in auto_code
    scope = {}
    exec(auto_code, scope)
    assert set(scope["model"].peft_config) == {"default", "other"}
    torch.testing.assert_close(routed_logits(scope["model"]), routed_logits(model), rtol=0, atol=1e-6)


def test_saving_again_keeps_every_section_of_the_card_but_the_generated_one(tmp_path, base_dir):
    """Nothing a user wrote into the card is lost on a later save: only the text between the markers is replaced,
    and a card written before the markers loses only its old generated section."""
    model = trained("ta-lora", base_dir)
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    text = (folder / "README.md").read_text()
    mine_before, mine_after = "## Tasks we evaluated\n\nmy table", "## Tasks and data\n\n## Citation\n\nmy bibtex"
    start, end = text.index(CARD_START), text.index(CARD_END) + len(CARD_END)
    (folder / "README.md").write_text(f"{text[:start]}{mine_before}\n\n{text[start:end]}\n\n{mine_after}\n")
    for _ in range(2):
        model.save_pretrained(folder)
        text = (folder / "README.md").read_text()
        assert mine_before in text and mine_after in text and text.count("## How to load") == 1
    # a card of the earlier layout: its generated section (heading to last line) is replaced, the rest kept
    legacy = text.replace(CARD_START + "\n", "").replace(CARD_END, "")
    legacy = legacy.replace(mine_after, "## Tasks and data\n\nmine").replace(mine_before, "### Tasks we evaluated")
    (folder / "README.md").write_text(legacy)
    model.save_pretrained(folder)
    text = (folder / "README.md").read_text()
    assert "### Tasks we evaluated" in text and "## Tasks and data\n\nmine" in text
    assert text.count("## How to load") == 1 and text.count(CARD_START) == 1
    # a user who deletes one marker loses nothing on the next saves either: the lone marker goes
    (folder / "README.md").write_text(text.replace(CARD_END, "") + "\nIMPORTANT USER TEXT\n")
    for _ in range(2):
        model.save_pretrained(folder)
        text = (folder / "README.md").read_text()
        assert "IMPORTANT USER TEXT" in text and "### Tasks we evaluated" in text
        assert text.count(CARD_START) == text.count(CARD_END) == 1 and text.count("## How to load") == 1


@pytest.mark.parametrize("selected", [None, ["main"], ["other"], ["main", "default"]])
def test_card_code_loads_adapters_not_called_default(tmp_path, base_dir, selected):
    """PEFT saves an adapter not called ``default`` in a subfolder of its name: the card's code loads it from
    there, and lists only the adapters that were saved."""
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), adapter_config("ta-lora"), adapter_name="main"
    )
    model.add_adapter("other" if selected != ["main", "default"] else "default", adapter_config("ta-lora"))
    model = perturb(model, scale=0.3).eval()
    folder = tmp_path / "adapter"
    model.save_pretrained(folder, **({} if selected is None else {"selected_adapters": selected}))
    saved = sorted(selected or ["main", "other"], key=lambda name: name != "default")  # "default" (the root) first
    for code in card_code(folder):
        scope = {}
        exec(code, scope)
        assert list(scope["model"].peft_config) == saved
        for name in saved:
            model.set_adapter(name)
            scope["model"].set_adapter(name)
            torch.testing.assert_close(routed_logits(scope["model"]), routed_logits(model), rtol=0, atol=1e-6)
    text = (folder / "README.md").read_text()
    assert ("adapter `other`" in text) == ("other" in saved) and ("adapter `main`" in text) == ("main" in saved)


def test_task_export_reads_selected_adapters_by_position_and_names_unknown_ones(tmp_path, base_dir):
    model = trained("ta-lora", base_dir)
    model.add_adapter("other", TALoraConfig(task_type="CAUSAL_LM", task_names=["x", "y"], num_virtual_tokens=4, r=4))
    model.save_pretrained(tmp_path / "one", True, ["default"], tasks=["sst2"])  # positional selected_adapters
    assert json.loads((tmp_path / "one" / "adapter_config.json").read_text())["task_names"] == ["sst2"]
    assert not (tmp_path / "one" / "other").exists()
    with pytest.raises(ValueError, match=r"selected_adapters names \['typo'\], which this model does not have"):
        model.save_pretrained(tmp_path / "two", selected_adapters=["typo"], tasks=["sst2"])
    assert not (tmp_path / "two").exists()


def test_pushed_model_card_loads_from_the_repo(hub, base_dir):
    trained("ta-lora", base_dir).push_to_hub("me/talora-suite")
    readme = hub["files"]["README.md"].decode()
    assert 'AutoPeftModelForCausalLM.from_pretrained("me/talora-suite")' in readme
    assert 'PeftModel.from_pretrained(base, "me/talora-suite")' in readme and "peft-tmp" not in readme
