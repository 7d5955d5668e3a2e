"""``load_original_vae``: every original weight lands unchanged under its new name, the config maps to the right
shapes (also at the real checkpoint's inferred scale), and anything the converter does not understand is an error."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_magi import AutoencoderMagi
from diffusers_magi.conversion import load_original_vae
from diffusers_magi.conversion.vae import convert_vae_config, convert_vae_state_dict


@pytest.fixture(scope="module")
def original_dir(reference_dir):
    return reference_dir / "vae" / "tiny_vae_a"


@pytest.fixture(scope="module")
def original_weights(original_dir):
    return load_file(original_dir / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def original_config(original_dir):
    return json.loads((original_dir / "config.json").read_text())


def test_every_original_weight_is_loaded_unchanged(original_dir, original_weights):
    model = load_original_vae(original_dir)
    converted = model.state_dict()
    renamed = convert_vae_state_dict(original_weights)
    assert len(converted) == len(original_weights) == len(renamed)
    for name, tensor in renamed.items():
        assert torch.equal(converted[name], tensor), name
    assert model.config.num_attention_heads == 4 and model.config.num_layers == 2
    assert not model.training


def test_torch_dtype(original_dir):
    model = load_original_vae(original_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_inferred_real_checkpoint_config_gives_the_real_weight_shapes():
    """The README's inferred ``ckpt/vae`` ddconfig, checked against the shapes third-party converters saw."""
    ddconfig = dict(
        video_size=256, video_length=16, patch_size=8, patch_length=4, in_chans=3, z_chans=16, double_z=True,
        embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4, qkv_bias=True, ln_in_attn=True, with_cls_token=True,
        conv_last_layer=True, use_rope=False, use_final_proj=False, norm_code=False,
    )  # fmt: skip
    config = convert_vae_config({"_class_name": "ViTVAE", "model_type": "vit", "ddconfig": ddconfig})
    with torch.device("meta"):
        model = AutoencoderMagi(**config)
        defaults = AutoencoderMagi().config
    assert config == {k: defaults[k] for k in config}, "the model defaults are the inferred real checkpoint"
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    assert shapes["encoder.patch_embed.weight"] == (1024, 3, 4, 8, 8)
    assert shapes["decoder.proj_in.weight"] == (1024, 16)
    assert shapes["encoder.pos_embed"] == shapes["decoder.pos_embed"] == (1, 4097, 1024)
    assert shapes["decoder.conv_out.weight"] == (3, 4, 3, 3, 3)
    assert shapes["encoder.proj_out.weight"] == (32, 1024)
    assert sum(1 for name in shapes if name.endswith("attn.to_qkv.weight")) == 48


def _write_original(folder, config, weights):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file(weights, folder / "diffusion_pytorch_model.safetensors")
    return folder


@pytest.mark.parametrize(
    "option, value, match",
    [
        ("use_rope", True, "use_rope"),
        ("ln_in_attn", False, "ln_in_attn"),
        ("double_z", False, "double_z"),
        ("use_final_proj", True, "use_final_proj"),
        ("norm_code", True, "norm_code"),
        ("conv_last_layer", False, "conv_last_layer"),
        ("with_cls_token", False, "with_cls_token"),
        ("mystery_option", 1, r"unknown ddconfig options \['mystery_option'\]"),
    ],
)
def test_rejects_unsupported_options(original_config, option, value, match):
    config = {**original_config, "ddconfig": {**original_config["ddconfig"], option: value}}
    with pytest.raises(ValueError, match=match):
        convert_vae_config(config)


def test_rejects_other_classes(original_config):
    with pytest.raises(ValueError, match="ViTVAE"):
        convert_vae_config({**original_config, "_class_name": "AutoencoderKL"})
    with pytest.raises(ValueError, match="model_type"):
        convert_vae_config({**original_config, "model_type": "vit_ncthw"})


def test_skips_unknown_and_rejects_missing_and_misshapen_weights(
    tmp_path, original_dir, original_config, original_weights, caplog
):
    extra = {**original_weights, "encoder.blocks.0.norm1.weight": torch.ones(256)}
    reference = load_original_vae(original_dir).state_dict()
    with caplog.at_level("WARNING"):
        loaded = load_original_vae(_write_original(tmp_path / "extra", original_config, extra)).state_dict()
    assert "encoder.blocks.0.norm1.weight" in caplog.text and "does not use" in caplog.text
    assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in reference)

    missing = {k: v for k, v in original_weights.items() if k != "decoder.last_layer.bias"}
    with pytest.raises(ValueError, match=r"lacks tensor\(s\) the model needs: \['decoder\.conv_out\.bias'\]"):
        load_original_vae(_write_original(tmp_path / "missing", original_config, missing))

    deeper = {**original_config, "ddconfig": {**original_config["ddconfig"], "depth": 3}}
    with pytest.raises(ValueError, match=r"needs: \['decoder\.blocks\.2\."):
        load_original_vae(_write_original(tmp_path / "deeper", deeper, original_weights))

    wider = {**original_config, "ddconfig": {**original_config["ddconfig"], "mlp_ratio": 2.0}}
    with pytest.raises(ValueError, match="mis-shaped tensor"):
        load_original_vae(_write_original(tmp_path / "wider", wider, original_weights))

