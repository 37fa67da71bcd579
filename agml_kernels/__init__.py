"""agml_kernels: neuron-masked LoRA matmul and streaming per-neuron statistics.

Each op lives in one file with its PyTorch reference (CPU fallback and test oracle), its Triton kernels and its
`torch.library` registration. Depends on torch and triton only.
"""

from agml_kernels._backend import backend
from agml_kernels.masked_lora import (
    check_index,
    column_positions,
    linear_path_choices,
    masked_lora_linear,
    prepare_masked_lora,
)
from agml_kernels.neuron_stats import NeuronStats, neuron_stats

__all__ = [
    "backend",
    "check_index",
    "column_positions",
    "linear_path_choices",
    "masked_lora_linear",
    "prepare_masked_lora",
    "neuron_stats",
    "NeuronStats",
]
