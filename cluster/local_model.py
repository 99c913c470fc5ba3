"""The small model served where no GPU is present, made on the spot (never downloaded).

A Llama with 2 layers, hidden size 128 and head_dim 64 (the CPU attention kernel refuses
smaller heads), random bf16 weights, and a byte-level BPE tokenizer trained on a few
sentences, with a chat template. Its output is gibberish, but everything around it is the
real engine path: tokenization, chat template, scheduling, sampling and usage counts.
It is built once and cached under the data directory; a half-written folder is never used.

The catalog names one by its source, `local:<name>`, among `CONTEXTS`: `tiny-llama` (256
tokens of context), and `tiny-llama-16k`, the same tokenizer and weights (the same seed; a
Llama's positions are rotary, no weights) with 16,384 tokens of context, for long prompts
(`bench/serving_overhead.py --long-prompt-tokens`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
_CORPUS = [
    "DarkGPU serves open models on GPUs lent by providers around the world.",
    "Every request is metered by the token into an append-only ledger.",
    "The quick brown fox jumps over the lazy dog, again and again.",
    "Hello! How can I help you today? Tell me a story about a small robot.",
    "Prices are in nano-dollars; caps reset at midnight UTC; providers keep 95%.",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' \" @ # $ % & _ |",
]
_MARKER = "complete"
# The local models by name (`local:<name>` in the catalog), and their context in tokens.
CONTEXTS = {"tiny-llama": 256, "tiny-llama-16k": 16384}


def ensure_local_model(root: Path, name: str = "tiny-llama") -> Path:
    """Return the folder of the local model `name` (one of `CONTEXTS`), building it first if
    needed."""
    if name not in CONTEXTS:
        raise ValueError(f"no local model {name!r}: the local models are {', '.join(CONTEXTS)}")
    target = root / name
    if (target / _MARKER).exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        _build(staging, CONTEXTS[name])
        (staging / _MARKER).write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_tokenizer(context: int = CONTEXTS["tiny-llama"]) -> PreTrainedTokenizerFast:
    """The local models' tokenizer: byte-level BPE trained on `_CORPUS` (the same every time),
    with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]  # unannotated there
        tokenizer_object=bpe,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        model_max_length=context,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _build(folder: Path, context: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(context)
    tokenizer.save_pretrained(folder)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).bfloat16()  # type: ignore[no-untyped-call]  # as above
    model.save_pretrained(folder)
