"""Giving a model's CPU weights memory of their own, 64-byte aligned.

Loaders that read safetensors files may hand out tensors that are views into the memory-mapped file; such a tensor
starts wherever its bytes sit in the file (any multiple of 8). CPU matrix-multiplication kernels choose their blocking
from the address alignment of their operands, so the same weights at two alignments can give results that differ in
the last float bit. Copying every misaligned CPU weight once after loading (fresh allocations are 64-byte aligned)
makes a model's results independent of how it was loaded: a folder loaded by Diffusers computes bit for bit what the
model built in memory by the converter computes.
"""

import torch
import torch.nn as nn

_ALIGNMENT = 64


def own_cpu_weights(module: nn.Module) -> nn.Module:
    """Replace every CPU parameter and buffer of `module` whose data does not start on a 64-byte boundary by an aligned
    copy (in place; tensors on other devices, meta tensors and aligned tensors are left alone). Returns `module`."""
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % _ALIGNMENT:
                tensor.data = tensor.data.clone()
    return module
