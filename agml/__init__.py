"""agml: activation-guided masked LoRA unlearning for Hugging Face language models."""

__version__ = "0.1.0"
