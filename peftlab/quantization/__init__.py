"""Quantised base layers in pure PyTorch: NF4 (QLoRA's 4-bit NormalFloat) and a frozen 4-bit linear layer.

Explained in: book/lora_in_practice.ipynb
"""

from peftlab.quantization.nf4 import (NF4_CODE, Linear4bit, NF4Tensor, dequantize_nf4, memory_bytes, nf4_levels,
                                      quantize_model, quantize_nf4)

__all__ = ["NF4_CODE", "NF4Tensor", "Linear4bit", "quantize_nf4", "dequantize_nf4", "nf4_levels", "quantize_model",
           "memory_bytes"]
