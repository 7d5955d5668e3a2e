"""`MagiFp8Linear`: the float8 (e4m3) linear layer of MAGI-1's "distill + fp8_quant" checkpoints.

The released fp8 checkpoints store some linears of the transformer blocks as float8_e4m3fn weights plus float32
scales, and run them with float8 activations:

1. the input `x` (bfloat16) is divided by a per-input-channel divisor (`input_scale` for per-tensor layers,
   `smooth_scale` for per-channel "SmoothQuant" layers) in float32, clamped to +-448, rounded to bfloat16 and then to
   float8_e4m3fn (two roundings, both to nearest even, exactly as the original);
2. the float8 activations are multiplied with the float8 weight, accumulated in float32 and scaled once by
   `input_scale[0] * weight_scale` (the GEMM reads one float per scale, so a per-tensor layer uses only the first
   entry of its `input_scale` vector here; calibration writes the same value into every entry);
3. the result is rounded once to the output dtype.

How step 2 is evaluated depends on the device (`MagiFp8Linear.forward`): on CPU the exact sum of products (float64 is
exact for e4m3 products) is rounded once to float32, which reproduces the reference bit for bit; on CUDA GPUs with
float8 tensor cores (compute capability >= 8.9) `torch._scaled_mm` does it as the original's cuBLASLt GEMM does
(float32 accumulation, fast accumulation on); elsewhere float32 matrix products of the float8 values stand in for it.
The three differ only in float32 rounding.

The float8 weight is stored as its raw bytes (`torch.uint8`), so that no dtype cast (`from_pretrained(dtype=...)`,
`.to(dtype)`) can turn it into a wider type; the float32 scales are kept in float32 by the transformer's
`_keep_in_fp32_modules`.
"""

from typing import Optional

import torch
import torch.nn as nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448


def quantize_activation_fp8(hidden_states: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    """The original's activation quantisation (`div_clamp_to`).

    Args:
        hidden_states (`torch.Tensor` of shape `(..., in_features)`): activations (bfloat16 in the original).
        divisor (`torch.Tensor` of shape `(in_features,)`): per-input-channel divisor.
    Returns:
        `torch.Tensor` of shape `(..., in_features)`, float8_e4m3fn: `x / divisor` computed in float32, clamped to
        +-448, rounded to bfloat16, then to float8_e4m3fn.
    """
    scaled = hidden_states.float() / divisor.float()
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.bfloat16).to(FP8_DTYPE)


def fp8_matmul(
    quantized_input: torch.Tensor,
    weight: torch.Tensor,
    input_scale: torch.Tensor,
    weight_scale: torch.Tensor,
    output_dtype: torch.dtype,
) -> torch.Tensor:
    """`input_scale * weight_scale * (quantized_input @ weight.T)`, rounded once to `output_dtype` (the original's
    `bmm_fp8`).

    Args:
        quantized_input (`torch.Tensor` of shape `(M, K)`, float8_e4m3fn): quantised activations.
        weight (`torch.Tensor` of shape `(N, K)`, float8_e4m3fn): quantised weight, one row per output channel.
        input_scale, weight_scale (`torch.Tensor` of shape `(1,)`, float32): the two dequantisation scales.
        output_dtype (`torch.dtype`): dtype of the result.
    Returns:
        `torch.Tensor` of shape `(M, N)`.
    """
    device = quantized_input.device
    if device.type == "cpu":
        # The exact sum of products rounded once to float32, times the float32 product of the scales, rounded once.
        exact = (quantized_input.double() @ weight.double().T).float()
        return (exact * (input_scale * weight_scale)).to(output_dtype)
    num_rows, in_features = quantized_input.shape
    if _has_scaled_mm(device) and in_features % 16 == 0 and weight.shape[0] % 16 == 0:
        padded_rows = -(-num_rows // 16) * 16  # the float8 GEMM wants every dimension divisible by 16
        if padded_rows != num_rows:
            padding = quantized_input.new_zeros(padded_rows - num_rows, in_features)
            quantized_input = torch.cat([quantized_input, padding])
        output = torch._scaled_mm(
            quantized_input,
            weight.T,
            scale_a=input_scale.float(),
            scale_b=weight_scale.float(),
            out_dtype=output_dtype,
            use_fast_accum=True,
        )
        return output[:num_rows]
    return ((quantized_input.float() @ weight.float().T) * (input_scale * weight_scale)).to(output_dtype)


def dequantize_fp8_weight(
    fp8_weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor,
    smooth_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The weight of a plain linear layer equivalent to a `MagiFp8Linear` without activation quantisation.

    The fp8 layer computes `sum_k (x_k / divisor_k) * W[n, k] * input_scale[0] * weight_scale` (divisor =
    `smooth_scale` or `input_scale`), so the equivalent weight is `W * weight_scale * input_scale[0] / divisor`
    per input channel.

    Args:
        fp8_weight (`torch.Tensor` of shape `(out_features, in_features)`): float8_e4m3fn weight, or its uint8 bytes.
        weight_scale (`torch.Tensor` of shape `(1,)`), input_scale (`(in_features,)` or `(1,)`), smooth_scale
            (`(in_features,)`, per-channel layers only): the layer's scales.
    Returns:
        `torch.Tensor` of shape `(out_features, in_features)`, float64 (exact; cast it to the target dtype once).
    """
    if fp8_weight.dtype == torch.uint8:
        fp8_weight = fp8_weight.view(FP8_DTYPE)
    divisor = smooth_scale if smooth_scale is not None else input_scale
    column_scale = input_scale.reshape(-1)[0].double() / divisor.reshape(-1).double()
    return fp8_weight.double() * weight_scale.double() * column_scale[None]


def _has_scaled_mm(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class MagiFp8Linear(nn.Module):
    """A bias-free linear layer with a float8_e4m3fn weight and float8 activations (see the module docstring).

    Args:
        in_features (`int`): K, input channels.
        out_features (`int`): N, output channels.
        per_channel (`bool`): `False` for the original's `PerTensorQuantizedFp8Linear` (activations divided by
            `input_scale`, a `(in_features,)` vector), `True` for `PerChannelQuantizedFp8Linear` (activations divided
            by `smooth_scale`, `(in_features,)`; `input_scale` is `(1,)`).

    Parameters (all frozen):
        fp8_weight (`(out_features, in_features)`, uint8): the float8_e4m3fn weight, as raw bytes.
        weight_scale (`(1,)`, float32): weight dequantisation scale.
        input_scale (`(in_features,)` or `(1,)`, float32): activation scale.
        smooth_scale (`(in_features,)`, float32, per-channel only): activation divisor per input channel.
    """

    def __init__(self, in_features: int, out_features: int, per_channel: bool):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.per_channel = per_channel
        self.fp8_weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.uint8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(1), requires_grad=False)
        self.input_scale = nn.Parameter(torch.ones(1 if per_channel else in_features), requires_grad=False)
        self.smooth_scale = nn.Parameter(torch.ones(in_features), requires_grad=False) if per_channel else None

    @property
    def weight(self) -> torch.Tensor:
        """The quantised weight as a float8_e4m3fn view of `fp8_weight`, `(out_features, in_features)`."""
        return self.fp8_weight.view(FP8_DTYPE)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(..., in_features)`)
        Returns:
            `torch.Tensor` of shape `(..., out_features)`, in the input's dtype. (The original's q/k/v projections
            always return bfloat16 and the others `params_dtype`; both are the input's dtype in the bfloat16 models
            the fp8 checkpoints are.)
        """
        divisor = self.smooth_scale if self.per_channel else self.input_scale
        quantized = quantize_activation_fp8(hidden_states, divisor)
        output = fp8_matmul(
            quantized.reshape(-1, self.in_features),
            self.weight,
            self.input_scale[:1],
            self.weight_scale,
            hidden_states.dtype,
        )
        return output.reshape(*hidden_states.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kind = "per_channel" if self.per_channel else "per_tensor"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"
