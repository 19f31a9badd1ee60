"""twicing-lm: a GPT training stack with pluggable (twicing) attention, trained under DeepSpeed."""

__version__ = "0.1.0"
