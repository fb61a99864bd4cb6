"""Tiny random Llama-style models and a tiny tokenizer, built in seconds for the tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from calib.data import find_named, open_text

VOCAB = 384
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def tiny_tokenizer(folder: Path, vocab: int = VOCAB) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on WikiText-2 validation text (never the test split)."""
    path = find_named("wikitext2-valid")
    assert path is not None  # shipped in calib/datasets
    with open_text(path) as fh:
        text = fh.read()[:400_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def tiny_llama(
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = VOCAB,
    tied: bool = True,
    seed: int = 0,
    massive: int | None = None,
    family: str = "llama",
) -> PreTrainedModel:
    """A random Llama-family model with non-trivial norm weights and a few outlier channels, like real ones.

    ``family``: ``llama``, ``qwen2`` (biases on q/k/v) or ``qwen3`` (per-head q_norm and k_norm).
    ``massive``: an intermediate channel of layer 0 whose gate and up rows are scaled 12x, so the
    down_proj input carries ~100x values there (the "massive activations" of trained LLMs).
    """
    config_class, model_class = FAMILIES[family]
    config = config_class(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        tie_word_embeddings=tied,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(0.5 + torch.rand(param.shape, generator=gen))
                param[: max(1, param.shape[0] // 32)] *= 4.0  # outlier channels, as in trained LLMs
            elif param.dim() == 2:
                param.normal_(0.0, 0.08, generator=gen)
            elif name.endswith("bias"):  # Qwen2's q/k/v biases are large in trained models
                param.normal_(0.0, 0.5, generator=gen)
        if massive is not None:
            mlp = model.model.layers[0].mlp
            mlp.gate_proj.weight[massive] *= 12.0
            mlp.up_proj.weight[massive] *= 12.0
    return model
