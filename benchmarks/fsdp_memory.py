"""Weight memory per GPU for agml on a frozen bf16 base, whole or FSDP-sharded: arithmetic, not a measurement.

Builds each model on the meta device from its published shape (no download, no memory), counts parameters and
applies what `agml.fsdp` does: every process keeps 1/N of each weight; a unit's full weights (a decoder layer,
untied embeddings or LM head, the root) exist only while it runs, and FSDP2 gathers at most the next unit ahead.
Activations, the adapter (under 1% of the weights at agml's densities) and the CUDA context are not included.

    python benchmarks/fsdp_memory.py
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

GIB = 1024**3
BYTES = 2  # bf16

SHAPES = {
    "Qwen2.5-3B": Qwen2Config(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                              num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "Qwen2.5-7B": Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                              num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "Llama-3.1-70B": LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                                 tie_word_embeddings=False),
}
PLANS = (("Qwen2.5-3B", 1), ("Qwen2.5-7B", 1), ("Qwen2.5-7B", 2), ("Llama-3.1-70B", 4), ("Llama-3.1-70B", 8))


def unit_sizes(model: torch.nn.Module) -> tuple[int, list[int]]:
    """(all parameters, parameters of each FSDP unit as agml.fsdp builds them)."""
    total = sum(p.numel() for p in model.parameters())
    layers = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is embeddings.weight
    separate = [] if tied else [embeddings.weight.numel(), head.weight.numel()]
    root = total - sum(layers) - sum(separate)
    return total, layers + separate + [root]


def estimate(name: str, processes: int) -> dict:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(SHAPES[name], dtype=torch.bfloat16)
    total, units = unit_sizes(model)
    if processes == 1:
        per_gpu = total * BYTES
    else:
        largest_two = sum(sorted(units)[-2:])
        per_gpu = total * BYTES / processes + largest_two * BYTES
    return {"model": name, "gpus": processes, "params_b": total / 1e9, "weights_gib": total * BYTES / GIB,
            "per_gpu_gib": per_gpu / GIB, "host_gib_rank0": total * BYTES / GIB}


def main() -> None:
    print("| model | GPUs | parameters | bf16 weights | per GPU (weights) | rank 0 host RAM to load |")
    print("|---|---|---|---|---|---|")
    for name, processes in PLANS:
        row = estimate(name, processes)
        mode = "one GPU" if processes == 1 else f"{processes}, FSDP"
        print(f"| {name} | {mode} | {row['params_b']:.2f} B | {row['weights_gib']:.1f} GiB | "
              f"{row['per_gpu_gib']:.1f} GiB | {row['host_gib_rank0']:.1f} GiB |")


if __name__ == "__main__":
    main()
