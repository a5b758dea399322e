"""t2tune: fine-tune causal language models on text-to-text tasks, validate by generation,
export Hugging Face checkpoints."""

__version__ = "0.1.0"
