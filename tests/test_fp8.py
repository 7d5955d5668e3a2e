"""fp8 ("distill + fp8_quant") checkpoints against the original: every DiT case whose checkpoint has
`engine_config.fp8_quant` is replayed (forward cases call by call, sampler cases chunk by chunk).

Tolerances are those of the reference README's fp8 discussion (relative L2 <= 1 % on a forward, <= 2 % on the 8-step
sampler): bfloat16 + float8 arithmetic turns any float32 rounding difference (here: the CPU's own bfloat16 / float32
matrix kernels, which differ between CPU types) into differences of that size. What does not depend on the CPU is
checked bit for bit: each float8 linear, fed the recorded input, reproduces the recorded float8 activation codes and
the recorded output, and each quantised block, fed the recorded output of the block before it, reproduces the recorded
output of its own. (The unquantised first and last blocks run bfloat16 GEMMs: on a CPU with AMX, torch's oneDNN
kernels sum those in another order than on the AVX-512 bfloat16 CPU that made the reference; the embedders and the
final projection run float32 GEMMs, whose summation order also depends on the CPU.)
"""

import re

import pytest
import torch

from diffusers_magi.conversion import load_original_transformer
from diffusers_magi.conversion.transformer import convert_transformer_state_dict
from diffusers_magi.models.attention_magi import ChunkAttentionLayout, chunk_causal_attention
from diffusers_magi.models.fp8_linear_magi import (
    MagiFp8Linear,
    dequantize_fp8_weight,
    fp8_matmul,
    quantize_activation_fp8,
)

from .reference_cases import DIT_DIR, Case, attention_starts, dit_case_names, run_forward_call
from .test_pipeline_parity import run_recorded_sampler

FORWARD_TOLERANCE = 0.01
SAMPLER_TOLERANCE = 0.02
FP8_FORWARD_CASES = dit_case_names("dit_forward", fp8=True)
FP8_SAMPLER_CASES = dit_case_names("sampler", fp8=True)
_FP8_DEBUG = re.compile(r"call(\d+)\.debug\.fp8\.(.+)\.(input|quantised_input|output)$")


def relative_l2(ours: torch.Tensor, reference: torch.Tensor) -> float:
    ours, reference = ours.double(), reference.double()
    return ((ours - reference).norm() / reference.norm()).item()


def test_fp8_cases_are_found(reference_dir):
    assert "f_forward_fp8" in FP8_FORWARD_CASES and "e_sampler_t2v_distill_fp8" in FP8_SAMPLER_CASES


def test_fp8_checkpoint_loads_as_the_original_builds_it(reference_dir):
    case = Case(FP8_FORWARD_CASES[0])
    transformer = case.transformer
    num_layers = transformer.config.num_layers
    assert transformer.config.fp8_layers == list(range(1, num_layers - 1))
    quantised = {name for name, module in transformer.named_modules() if isinstance(module, MagiFp8Linear)}
    recorded = set(case.description["fp8"]["quantised_modules"])
    assert quantised == {_our_module(name) for name in recorded}
    for name, kind in case.description["fp8"]["quantised_modules"].items():
        assert transformer.get_submodule(_our_module(name)).per_channel == (kind == "per_channel")
    assert transformer.dtype == torch.bfloat16
    assert transformer.patch_embedding.weight.dtype == torch.float32  # the modules the original promotes
    assert transformer.blocks[0].attn.to_q.weight.dtype == torch.bfloat16  # first and last blocks unquantised


def _our_module(original_module: str) -> str:
    return next(iter(convert_transformer_state_dict({f"{original_module}.weight": torch.zeros(1)}))).removesuffix(
        ".weight"
    )


@pytest.mark.parametrize("name", FP8_FORWARD_CASES)
def test_fp8_linears_bit_exact(reference_dir, name):
    """Each quantised linear, fed the recorded (bfloat16) input, gives the recorded float8 activation codes (double
    rounding float32 -> bfloat16 -> e4m3, clamp at +-448) and the recorded bfloat16 output, bit for bit."""
    case = Case(name)
    recorded = {}
    for key in case.outputs:
        match = _FP8_DEBUG.match(key)
        if match:
            recorded.setdefault(match.group(2), {})[match.group(3)] = case.outputs[key]
    assert len(recorded) == len(case.description["fp8"]["quantised_modules"])
    for module_name, tensors in recorded.items():
        module = case.transformer.get_submodule(_our_module(module_name))
        hidden_states = tensors["input"].to(torch.bfloat16)
        assert torch.equal(hidden_states.float(), tensors["input"]), "the recorded input holds bfloat16 values"
        divisor = module.smooth_scale if module.per_channel else module.input_scale
        codes = quantize_activation_fp8(hidden_states, divisor)
        assert codes.dtype == torch.float8_e4m3fn
        assert torch.equal(codes.float(), tensors["quantised_input"]), f"{module_name}: activation codes"
        output = module(hidden_states)
        assert output.dtype == torch.bfloat16
        assert torch.equal(output.float(), tensors["output"]), f"{module_name}: output"


@pytest.mark.parametrize("name", FP8_FORWARD_CASES)
def test_bfloat16_attention_bit_exact(reference_dir, name):
    """Chunk-causal attention on the recorded bfloat16 queries, keys and values of the first block gives the recorded
    output bit for bit: on CPU it is `softmax(q k^T * scale) @ v` in float32, rounded once (torch's float32 CPU flash
    kernel, with its blockwise online softmax, flips some bfloat16 roundings)."""
    case = Case(name)
    call = case.calls()[0]
    recorded = {key.removeprefix("call0.debug."): tensor for key, tensor in case.outputs.items()}
    x, t = case.tensor(call["args"]["x"]), case.tensor(call["args"]["t"])
    tokens = case.tokens_per_chunk(x, t.shape[1])
    starts = attention_starts(case.tensor(call["args"]["kv_range"])[: t.shape[1]], 0, tokens)
    layout = ChunkAttentionLayout(tokens_per_chunk=tokens, first_chunk_index=0, attention_chunk_starts=tuple(starts))
    query = recorded["layer0.query_after_norm_rope"][None].to(torch.bfloat16)
    key, value = recorded["layer0.key_value_after_norm_rope"][None].to(torch.bfloat16).chunk(2, dim=-1)
    output = chunk_causal_attention(query, key, value, layout)
    assert output.dtype == torch.bfloat16
    assert torch.equal(output.flatten(2)[0].float(), recorded["layer0.self_attention.0"][:, 0])


@pytest.mark.parametrize("name", FP8_FORWARD_CASES)
def test_fp8_blocks_bit_exact(reference_dir, name):
    """Each quantised block, fed the recorded output of the block before it and the recorded gate logits of its own
    (its unquantised gate linear is a bfloat16 GEMM), gives the recorded block output bit for bit: every float8 linear
    is exact, and the norms, rotary embedding, attention (float32 softmax, then the weighted sum), gating and
    residuals are evaluated in the original's order with its bfloat16 roundings. Condition, rotary embedding and
    caption tokens come from our own embedders."""
    case = Case(name)
    transformer = case.transformer
    call = case.calls()[0]
    recorded = {key.removeprefix("call0.debug."): tensor for key, tensor in case.outputs.items()}
    block_inputs = {}
    hooks = [
        transformer.blocks[index].register_forward_pre_hook(
            lambda module, args, index=index: block_inputs.__setitem__(index, args)
        )
        for index in transformer.config.fp8_layers
    ]
    run_forward_call(case, call, transformer)
    for hook in hooks:
        hook.remove()
    for index in transformer.config.fp8_layers:
        block = transformer.blocks[index]
        hidden_states, *other_inputs = block_inputs[index]
        previous = recorded[f"layer{index - 1}"].transpose(0, 1).to(torch.bfloat16)  # (S, N, C) -> (N, S, C)
        assert previous.shape == hidden_states.shape
        gates = recorded[f"layer{index}.ada_modulate_layer"].to(torch.bfloat16)
        hook = block.modulation.register_forward_hook(lambda module, args, output: gates.to(output.dtype))
        with torch.no_grad():
            output = block(previous, *other_inputs)
        hook.remove()
        assert torch.equal(output.transpose(0, 1).float(), recorded[f"layer{index}"]), f"block {index}"


@pytest.mark.parametrize("name", FP8_FORWARD_CASES)
def test_fp8_forward_case(reference_dir, name):
    case = Case(name)
    for call in case.calls():
        output = run_forward_call(case, call, case.transformer)
        reference = case.outputs[f"call{call['index']}.out"]
        assert output.dtype == torch.float32 and output.shape == reference.shape
        error = relative_l2(output, reference)
        assert error <= FORWARD_TOLERANCE, f"{name} call{call['index']}: relative L2 {error:.4%}"


@pytest.mark.slow
@pytest.mark.parametrize("name", FP8_SAMPLER_CASES)
def test_fp8_sampler_case(reference_dir, name):
    chunks, case, _, _ = run_recorded_sampler(name)
    recorded = case.description["outputs"]["chunks (in yield order)"]
    assert [chunk.chunk_index for chunk in chunks] == [entry["chunk_index"] for entry in recorded]
    for chunk, entry in zip(chunks, recorded):
        error = relative_l2(chunk.frames, case.outputs[entry["key"]])
        assert error <= SAMPLER_TOLERANCE, f"{name} chunk {chunk.chunk_index}: relative L2 {error:.4%}"


@pytest.mark.parametrize("name", FP8_FORWARD_CASES)
def test_dequantized_fp8_is_further_from_the_original(reference_dir, name):
    """Option (b), dequantising the float8 linears at conversion: a plain model without activation quantisation. It
    is not the original's arithmetic, so the float8 model (a) must be closer to the reference than (b); (b) stays
    within a few percent of (a) (measured: 2.4-3.5 % relative L2 in bfloat16, float16 and float32; see
    docs/conversion.md)."""
    case = Case(name)
    config = DIT_DIR / case.description["checkpoint"]["config"]
    for dtype in (torch.bfloat16, torch.float32):
        dequantized = load_original_transformer(config, config.parent, dtype=dtype, dequantize_fp8=True)
        assert dequantized.config.fp8_layers is None
        assert not any(isinstance(module, MagiFp8Linear) for module in dequantized.modules())
        for call in case.calls():
            reference = case.outputs[f"call{call['index']}.out"]
            fp8_output = run_forward_call(case, call, case.transformer)
            dequantized_output = run_forward_call(case, call, dequantized)
            assert relative_l2(fp8_output, reference) < relative_l2(dequantized_output, reference)
            assert relative_l2(dequantized_output, fp8_output) < 0.05


def test_dequantized_weight_is_the_effective_weight():
    """`W * weight_scale * input_scale[0] / divisor` per input channel, for both layer kinds."""
    torch.manual_seed(0)
    weight = (torch.randn(8, 16) * 40).to(torch.float8_e4m3fn)
    weight_scale, input_scale, smooth = torch.tensor([0.02]), torch.tensor([0.5]), torch.rand(16) + 0.5
    per_channel = dequantize_fp8_weight(weight.view(torch.uint8), weight_scale, input_scale, smooth)
    expected = weight.double() * weight_scale.double() * (input_scale.double() / smooth.double())[None]
    assert torch.allclose(per_channel, expected, rtol=1e-12, atol=0)
    per_tensor = dequantize_fp8_weight(weight, weight_scale, torch.full((16,), 0.5))
    assert torch.allclose(per_tensor, weight.double() * weight_scale.double(), rtol=1e-12, atol=0)


def test_activation_quantisation_rounds_twice_and_clamps():
    """x / s in float32 -> clamp +-448 -> bfloat16 -> e4m3. 1.06251 rounds to 1.125 directly, but to the bfloat16 tie
    1.0625 first, which e4m3 rounds to even (1.0)."""
    codes = quantize_activation_fp8(torch.tensor([1.06251, 1000.0, -1000.0, 0.5]), torch.ones(4))
    assert codes.dtype == torch.float8_e4m3fn and codes.float().tolist() == [1.0, 448.0, -448.0, 0.5]
    assert torch.tensor([1.06251]).to(torch.float8_e4m3fn).float().item() == 1.125  # a direct rounding differs
    halved = quantize_activation_fp8(torch.tensor([2.12502]), torch.tensor([2.0]))  # the divisor applies first
    assert halved.float().item() == 1.0


def test_cpu_matmul_is_the_exact_sum_rounded_once():
    torch.manual_seed(0)
    activations = (torch.randn(5, 64) * 50).to(torch.float8_e4m3fn)
    weight = (torch.randn(16, 64) * 50).to(torch.float8_e4m3fn)
    input_scale, weight_scale = torch.tensor([0.013]), torch.tensor([0.0021])
    output = fp8_matmul(activations, weight, input_scale, weight_scale, torch.bfloat16)
    exact = (activations.double() @ weight.double().T).float() * (input_scale * weight_scale)
    assert output.dtype == torch.bfloat16 and torch.equal(output, exact.to(torch.bfloat16))


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="torch._scaled_mm needs a CUDA GPU with float8 tensor cores (compute capability >= 8.9)",
)
def test_scaled_mm_matches_the_exact_product_on_gpu():
    torch.manual_seed(0)
    activations = (torch.randn(50, 256) * 50).to(torch.float8_e4m3fn)
    weight = (torch.randn(128, 256) * 50).to(torch.float8_e4m3fn)
    input_scale, weight_scale = torch.tensor([0.013]), torch.tensor([0.0021])
    exact = fp8_matmul(activations, weight, input_scale, weight_scale, torch.bfloat16)
    on_gpu = fp8_matmul(activations.cuda(), weight.cuda(), input_scale.cuda(), weight_scale.cuda(), torch.bfloat16)
    assert on_gpu.shape == exact.shape
    assert relative_l2(on_gpu.cpu(), exact) < 1e-2


def test_fp8_model_round_trip(tmp_path):
    """A transformer with `fp8_layers` saves and loads keeping the float8 weights as bytes and the scales in float32,
    also when loaded with `dtype=torch.bfloat16`, and computes the same after the round trip."""
    from diffusers_magi import MagiTransformer3DModel
    from diffusers_magi.tiny_random import tiny_transformer

    model = tiny_transformer(num_layers=3, fp8_layers=[1])
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(module, MagiFp8Linear):
            module.fp8_weight.data = (
                (torch.randn(module.fp8_weight.shape) * 100).to(torch.float8_e4m3fn).view(torch.uint8)
            )
            module.weight_scale.data = torch.tensor([0.01])
            module.input_scale.data = torch.full_like(module.input_scale, 0.02)
            if module.per_channel:
                module.smooth_scale.data = torch.rand(module.in_features) + 0.5
    model.save_pretrained(tmp_path)
    inputs = (torch.randn(1, 16, 6, 4, 4), torch.tensor([[0.4]]), torch.randn(1, 1, 40, 32), torch.ones(1, 1, 40))
    loaded = MagiTransformer3DModel.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(*inputs).sample, model(*inputs).sample)

    bfloat16 = MagiTransformer3DModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bfloat16.config.fp8_layers == [1] and bfloat16.dtype == torch.bfloat16
    for name, tensor in model.state_dict().items():
        if name.endswith(("fp8_weight", "weight_scale", "input_scale", "smooth_scale")):
            assert bfloat16.state_dict()[name].dtype == tensor.dtype and torch.equal(
                bfloat16.state_dict()[name], tensor
            )
    with torch.no_grad():
        output = bfloat16(*inputs).sample
    assert output.dtype == torch.float32 and torch.isfinite(output).all()


def test_fp8_layers_must_be_block_indices():
    from diffusers_magi.tiny_random import tiny_transformer

    with pytest.raises(ValueError, match="fp8_layers holds 5"):
        tiny_transformer(num_layers=3, fp8_layers=[5])
