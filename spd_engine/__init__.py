"""Self-Policy Distillation: capability subspaces of K/V, hooked generation, LoRA distillation."""
__version__ = "0.1.0"
