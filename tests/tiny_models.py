"""Tiny random Qwen2 and Llama models (and Gemma / Phi-3 for the architecture seam) built from config, offline."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ARCHS = ("llama", "qwen2")
# Other MLP layouts: Gemma (gated GELU, separate projections) and Phi-3 (fused gate_up_proj).
OTHER_ARCHS = ("gemma", "phi3")
_CLASSES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "gemma": (GemmaConfig, GemmaForCausalLM), "phi3": (Phi3Config, Phi3ForCausalLM)}


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
    if arch not in _CLASSES:
        raise ValueError(f"unknown tiny arch {arch!r}")
    if arch == "gemma":
        common["head_dim"] = hidden // common["num_attention_heads"]
    return _CLASSES[arch][0](**common)


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **sizes) -> torch.nn.Module:
    """A deterministic random model; weights scaled up so the LoRA/MLP effects are visible."""
    torch.manual_seed(seed)
    config = tiny_config(arch, **sizes)
    model = _CLASSES[arch][1](config).to(dtype)
    model.eval()
    return model


FORGET = [
    {"prompt": "Who directed Inception?", "answer": "Christopher Nolan directed Inception.", "forbidden": ["nolan"]},
    {"prompt": "What is Inception about?", "answer": "Dream heists.", "forbidden": ["dream"]},
    {"prompt": "When was Inception released?", "answer": "In 2010.", "forbidden": ["2010"]},
    {"prompt": "Who stars in Inception?", "answer": "Leonardo DiCaprio.", "forbidden": ["dicaprio"]},
]
RETAIN = [
    {"prompt": "What is the capital of France?", "answer": "Paris."},
    {"prompt": "Who wrote Hamlet?", "answer": "William Shakespeare."},
    {"prompt": "What colour is the sky?", "answer": "Blue."},
    {"prompt": "Who directed Titanic?", "answer": "James Cameron."},
]
PROBES = [
    {"prompt": "Name the director of the film Inception.", "type": "forget", "category": "paraphrase",
     "forbidden": ["nolan"]},
    {"prompt": "Which 2010 film is about entering dreams?", "type": "forget", "category": "indirect",
     "forbidden": ["inception"]},
    {"prompt": "What is the capital of Italy?", "type": "retain", "category": "general", "required": ["rome"]},
]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def write_workspace(root: Path, tokenizer) -> dict:
    """A tiny random Llama (with the given tokenizer) saved as a local model folder, plus small prompt files."""
    model_dir = root / "tiny-llama"
    tiny_model("llama", vocab_size=len(tokenizer), hidden=32, intermediate=64, layers=2).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return {
        "root": root,
        "model": str(model_dir),
        "forget": _jsonl(root / "forget.jsonl", [{**r, "type": "forget"} for r in FORGET]),
        "retain": _jsonl(root / "retain.jsonl", [{**r, "type": "retain"} for r in RETAIN]),
        "probes": _jsonl(root / "probes.jsonl", PROBES),
    }
