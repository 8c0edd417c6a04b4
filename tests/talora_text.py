"""A tiny offline word-level tokenizer whose ids fit the tiny models of ``conftest`` (vocab 128).

Ids: 0 ``[PAD]``, 1 ``[BOS]``, 2 ``[EOS]`` (as in ``conftest._COMMON``), 3 ``[UNK]``, then one id per word.
"""

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
WORDS = ["question", "answer", "yes", "no", "red", "blue", "green", "A", "B", "C"] + [f"w{i}" for i in range(40)]


#: A chat template that writes BOS itself, as Llama-3's and Gemma's do.
BOS_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m.role }}> {{ m.content }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def tiny_tokenizer(pad: bool = True, add_bos: bool = False) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer; adds no special tokens unless ``add_bos`` (then BOS in front, the way
    Llama's and Gemma's tokenizers do). ``pad=False`` leaves it without a pad token."""
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    specials = dict(bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]")
    if pad:
        specials["pad_token"] = "[PAD]"
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def ids(*words: str) -> list[int]:
    return [len(SPECIALS) + WORDS.index(w) for w in words]
