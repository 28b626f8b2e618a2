"""Optimizers for adapters: LoRA+ (a larger learning rate for B than for A).

Explained in: book/lora_in_practice.ipynb
"""

from peftlab.optimizers.loraplus import create_loraplus_optimizer

__all__ = ["create_loraplus_optimizer"]
