"""A converted folder that lacks a tensor fails at `from_pretrained`, naming it (not with a meta-device error at the
first call); a config field of the wrong type fails naming the field."""

import json
import re

import pytest
from safetensors.torch import load_file, save_file

from diffusers_magi import AutoencoderMagi, MagiTransformer3DModel

from .tiny_models import tiny_pipeline


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    pipe = tiny_pipeline(with_text_encoder=False)
    pipe.transformer.save_pretrained(root / "transformer")
    pipe.vae.save_pretrained(root / "vae")
    return root


def _drop(folder, name):
    path = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    del tensors[name]
    save_file(tensors, path, metadata={"format": "pt"})


# The transformer keeps modules in float32, which Diffusers only loads with low_cpu_mem_usage: no False case for it.
@pytest.mark.parametrize(
    "cls, subfolder, name, low_cpu_mem_usage",
    [
        (MagiTransformer3DModel, "transformer", "blocks.0.attn.norm_cross_k.weight", True),
        (AutoencoderMagi, "vae", "decoder.conv_out.bias", True),
        (AutoencoderMagi, "vae", "decoder.conv_out.bias", False),
    ],
)
def test_missing_tensor_fails_at_load_naming_it(saved, tmp_path, cls, subfolder, name, low_cpu_mem_usage):
    folder = tmp_path / subfolder
    folder.mkdir()
    for path in (saved / subfolder).iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    assert cls.from_pretrained(folder) is not None  # the complete folder loads
    _drop(folder, name)
    with pytest.raises(ValueError, match=rf"lack 1 tensor\(s\) the model needs: \['{name}'\]"):
        cls.from_pretrained(folder, low_cpu_mem_usage=low_cpu_mem_usage)


def test_loading_info_is_still_returned_when_asked(saved):
    model, info = MagiTransformer3DModel.from_pretrained(saved / "transformer", output_loading_info=True)
    assert isinstance(model, MagiTransformer3DModel) and info["missing_keys"] == []
    assert all(not tensor.is_meta for tensor in model.state_dict().values())


@pytest.mark.parametrize(
    "cls, subfolder, field, value, expected",
    [
        (MagiTransformer3DModel, "transformer", "num_layers", "two", "int"),
        (MagiTransformer3DModel, "transformer", "num_layers", 2.0, "int"),
        (MagiTransformer3DModel, "transformer", "gated_linear_unit", 1, "bool"),
        (MagiTransformer3DModel, "transformer", "patch_size", [1, "2", 2], "Tuple"),
        (AutoencoderMagi, "vae", "scaling_factor", "0.18", "float"),
    ],
)
def test_config_field_of_the_wrong_type_is_named(saved, tmp_path, cls, subfolder, field, value, expected):
    folder = tmp_path / subfolder
    folder.mkdir()
    for path in (saved / subfolder).iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(TypeError, match=rf"config field `{field}` must be {expected}.*got " + re.escape(repr(value))):
        cls.from_pretrained(folder)


def test_keyword_overrides_are_checked_too():
    with pytest.raises(TypeError, match="`num_layers` must be int"):
        MagiTransformer3DModel.from_config({}, num_layers="2")
    with pytest.raises(TypeError, match="`fp8_layers` must be"):
        MagiTransformer3DModel.from_config({"fp8_layers": [1, "2"]})


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline") / "converted"
    tiny_pipeline().save_pretrained(root)
    return root


def test_text_encoder_missing_a_tensor_fails_at_load_naming_it(saved_pipeline, tmp_path):
    """transformers initialises a tensor the T5 folder lacks randomly (with a load report only); building the
    pipeline from it (`MagiPipeline.from_pretrained`, which `load_pipeline` uses, and `DiffusionPipeline.from_pretrained`)
    fails naming it instead. The complete folder, whose T5 stores the tied `shared` / `encoder.embed_tokens` weight
    once, loads."""
    import shutil

    from diffusers import DiffusionPipeline

    from diffusers_magi import MagiPipeline
    from diffusers_magi.loading import load_pipeline

    folder = tmp_path / "converted"
    shutil.copytree(saved_pipeline, folder)
    assert MagiPipeline.from_pretrained(folder).text_encoder is not None
    weights = folder / "text_encoder" / "model.safetensors"
    tensors = load_file(weights)
    name = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
    del tensors[name]
    save_file(tensors, weights, metadata={"format": "pt"})
    message = rf"T5EncoderModel in .*text_encoder \(the pipeline's text_encoder\) lack 1 tensor\(s\) the model needs: "
    message += rf"\['{name}'\]"
    with pytest.raises(ValueError, match=message):
        MagiPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match=message):
        load_pipeline(str(folder))
    with pytest.raises(ValueError, match=message):
        DiffusionPipeline.from_pretrained(folder)
