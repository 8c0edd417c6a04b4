"""Tiny random causal LMs built from configs: fast, offline, one per architecture family."""

import io

import pytest
import torch
from huggingface_hub import HfApi
from huggingface_hub.errors import EntryNotFoundError
from transformers import AutoConfig, AutoModelForCausalLM

import peft_talora  # noqa: F401  (registers TA-LoRA with PEFT)

VOCAB = 128
_COMMON = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
_DECODER = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128
)

# model_type -> config kwargs. Heads: GQA where the family has it; key norms (qwen3, olmo2, gemma3); fused
# projections (phi3 qkv_proj, gpt2 c_attn Conv1D, gpt_neox query_key_value with partial rotary).
ARCHITECTURES = {
    "llama": dict(**_DECODER, num_key_value_heads=2),
    "qwen2": dict(**_DECODER, num_key_value_heads=2),
    "qwen3": dict(**_DECODER, num_key_value_heads=2, head_dim=16),
    "mistral": dict(**_DECODER, num_key_value_heads=2, sliding_window=None),
    "gemma2": dict(**_DECODER, num_key_value_heads=2, head_dim=16, sliding_window=8),
    "gemma3_text": dict(**_DECODER, num_key_value_heads=2, head_dim=16, sliding_window=8),
    "phi3": dict(**_DECODER, num_key_value_heads=2),
    "olmo2": dict(**_DECODER, num_key_value_heads=2),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=128),
    "gpt_neox": dict(**_DECODER, rotary_pct=0.25),
}
# transformers' Gemma2 does not support sdpa.
ATTN_IMPLEMENTATIONS = {name: ("eager",) if name == "gemma2" else ("eager", "sdpa") for name in ARCHITECTURES}
ARCH_ATTN = [(arch, attn) for arch in ARCHITECTURES for attn in ATTN_IMPLEMENTATIONS[arch]]


def tiny_model(arch: str = "llama", attn: str = "sdpa", seed: int = 0, **overrides):
    """A randomly initialised ``arch`` causal LM in eval mode; the same seed gives the same weights."""
    config = AutoConfig.for_model(arch, **{**_COMMON, **ARCHITECTURES[arch], **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def batch(batch_size: int = 3, length: int = 7, seed: int = 1, left_pad: int = 0):
    """``input_ids`` and ``attention_mask``; the first example is left-padded by ``left_pad`` tokens."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch_size, length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    if left_pad:
        input_ids[0, :left_pad] = 0
        attention_mask[0, :left_pad] = 0
    return input_ids, attention_mask


def logits(model, task_ids=None, input_ids=None, mask=None):
    """The model's logits on ``batch()`` (or ``input_ids``), with ``task_ids`` when given."""
    if input_ids is None:
        input_ids, mask = batch()
    extra = {} if task_ids is None else {"task_ids": task_ids}
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask, **extra).logits


def perturb(peft_model, seed: int = 0, scale: float = 1.0):
    """Stand-in for training: open the gates and give every task its own factors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bank in peft_model.base_model.talora_banks.values():
            for p in bank.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return peft_model


@pytest.fixture(params=ARCH_ATTN, ids=[f"{a}-{i}" for a, i in ARCH_ATTN])
def arch_attn(request):
    return request.param


METHODS = ("talora", "mtllora")


def make_adapted(method: str, arch: str = "llama", attn: str = "sdpa", *, trained: bool = True, **overrides):
    """A PEFT model of ``method`` ("talora" or "mtllora") with 3 tasks on ``tiny_model(arch, attn)``.

    ``trained=True`` stands in for training: every trainable parameter gets random values (MTL-LoRA's B starts at
    zero, so without this its tasks would all equal the base model). Keyword arguments override the config.
    """
    from peft import get_peft_model

    from peft_talora import MTLLoraConfig, TALoraConfig

    if method == "talora":
        config = TALoraConfig(**{**dict(task_type="CAUSAL_LM", num_tasks=3, num_virtual_tokens=4, r=4), **overrides})
    elif method == "mtllora":
        defaults = dict(task_type="CAUSAL_LM", num_tasks=3, r=4, target_modules="all-linear", lora_dropout=0.0)
        config = MTLLoraConfig(**{**defaults, **overrides})
    else:
        raise ValueError(f"unknown method {method!r}")
    model = get_peft_model(tiny_model(arch, attn), config)
    return perturb_trainable(model) if trained else model


def perturb_trainable(peft_model, seed: int = 0, scale: float = 0.5):
    """Stand-in for training, for either method: random values for every trainable parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=g) * scale)
    return peft_model


@pytest.fixture
def hub(monkeypatch):
    """Intercepts huggingface_hub's network calls; records what a push would upload."""
    sent = {}

    def create_repo(self, repo_id, **kwargs):
        sent["repo"] = repo_id
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_commit(self, repo_id, operations, **kwargs):
        sent["files"] = {}
        for op in operations:
            source = op.path_or_fileobj
            data = source.getvalue() if isinstance(source, io.BytesIO) else open(source, "rb").read()
            sent["files"][op.path_in_repo] = data
        return "commit"

    def no_remote_card(*args, **kwargs):
        raise EntryNotFoundError("README.md does not exist in this new repo")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr("huggingface_hub.repocard.hf_hub_download", no_remote_card)
    return sent


def cpu_training_args(config_class, tmp_path, **overrides):
    """``config_class`` (``TrainingArguments`` or a TRL config) for a short, quiet, offline CPU run in ``tmp_path``."""
    defaults = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=8,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    return config_class(**{**defaults, **overrides})
