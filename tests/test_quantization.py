"""Quantisation for small GPUs, on CPU: layerwise casting (float8 storage, bfloat16 compute) computes exactly what
the bfloat16 model computes with its weights rounded to float8, at half the weight bytes; torchao weight-only int8 and
float8 (`TorchAoConfig`) quantise every block linear and stay close to the bfloat16 model, also after saving and
reloading. (The converted fp8 checkpoints of the original run through `MagiFp8Linear`: see `test_fp8.py`.)"""

import warnings

import pytest
import torch

from diffusers_magi import MagiTransformer3DModel

from .tiny_models import tiny_transformer, tiny_transformer_inputs

CONFIG = dict(hidden_size=128, ffn_dim=256, cross_attention_dim=128, attention_head_dim=32)


def _relative_l2(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output - reference).norm() / reference.norm()).item()


def _weight_bytes(model) -> int:
    return sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("transformer")
    tiny_transformer(**CONFIG).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bf16_output(folder):
    with torch.no_grad():
        return MagiTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)(*tiny_transformer_inputs()).sample


def test_layerwise_casting_equals_weights_rounded_to_float8(folder, bf16_output):
    model = MagiTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    bf16_bytes = _weight_bytes(model)
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    stored = {name for name, parameter in model.named_parameters() if parameter.dtype == torch.float8_e4m3fn}
    # Every block linear is stored in float8; the float32 modules and the embedders are skipped.
    assert {name.split(".", 2)[2] for name in stored if name.startswith("blocks.0.")} == {
        "modulation.weight", "modulation.bias", "attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight",
        "attn.to_cross_q.weight", "attn.to_cross_kv.weight", "attn.to_out.weight", "ff.linear_in.weight",
        "ff.linear_out.weight",
    }
    assert not any("norm" in name or name.startswith(("caption_tokens", "text_embedder", "proj_out")) for name in stored)
    assert _weight_bytes(model) < 0.6 * bf16_bytes

    rounded = MagiTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    with torch.no_grad():
        for name, parameter in rounded.named_parameters():
            if name in stored:
                parameter.copy_(parameter.to(torch.float8_e4m3fn).to(torch.bfloat16))
        output = model(*tiny_transformer_inputs()).sample
        assert torch.equal(output, rounded(*tiny_transformer_inputs()).sample)
    # float8 (3 mantissa bits) weights: a few percent from the bfloat16 model (4.9% measured).
    assert _relative_l2(output, bf16_output) < 0.08


@pytest.fixture(scope="module")
def torchao():
    return pytest.importorskip("torchao", reason='torchao is not installed (`pip install -e ".[torchao]"`)')


@pytest.mark.parametrize(
    "config_name, weight_type, bound",
    # bounds: int8 per-channel weights (1.0% measured), float8 e4m3 per-channel weights (4.3% measured)
    [("Int8WeightOnlyConfig", "Int8Tensor", 0.03), ("Float8WeightOnlyConfig", "Float8Tensor", 0.08)],
    ids=["int8", "float8"],
)
def test_torchao_weight_only_quantisation(torchao, folder, bf16_output, tmp_path, config_name, weight_type, bound):
    from diffusers import TorchAoConfig

    quant_config = TorchAoConfig(getattr(torchao.quantization, config_name)())
    model = MagiTransformer3DModel.from_pretrained(folder, quantization_config=quant_config, torch_dtype=torch.bfloat16)
    quantised = {name for name, parameter in model.named_parameters() if type(parameter).__name__ == weight_type}
    assert len(quantised) == model.config.num_layers * 9  # the nine linears of each block
    assert all(name.startswith("blocks.") and name.endswith(".weight") for name in quantised)
    with torch.no_grad():
        output = model(*tiny_transformer_inputs()).sample
    assert _relative_l2(output, bf16_output) < bound

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path, safe_serialization=False)  # torchao tensors are saved with torch.save
    reloaded = MagiTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(reloaded(*tiny_transformer_inputs()).sample, output)
