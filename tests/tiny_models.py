"""Tiny random Qwen2 and Llama models built from config (no hub, no download)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

ARCHS = ("llama", "qwen2")


def tiny_config(arch: str, vocab_size: int = 128, hidden: int = 32, intermediate: int = 64, layers: int = 2):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"unknown tiny arch {arch!r}")


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **sizes) -> torch.nn.Module:
    """A deterministic random model; weights scaled up so the LoRA/MLP effects are visible."""
    torch.manual_seed(seed)
    config = tiny_config(arch, **sizes)
    cls = LlamaForCausalLM if arch == "llama" else Qwen2ForCausalLM
    model = cls(config).to(dtype)
    model.eval()
    return model
