"""agml_kernels: neuron-masked LoRA matmul and streaming per-neuron statistics.

Each op lives in one file with its PyTorch reference (CPU fallback and test
oracle), its Triton kernels and its autograd Function. Depends on torch and
triton only.
"""

from agml_kernels._backend import backend
from agml_kernels.masked_lora import masked_lora_linear
from agml_kernels.neuron_stats import NeuronStats, neuron_stats

__all__ = ["backend", "masked_lora_linear", "neuron_stats", "NeuronStats"]
