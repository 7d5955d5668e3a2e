"""`magi-convert` and `MagiPipeline.from_original` on copies of the original Hub layout built from the tiny reference
checkpoints (base, distill, distill + fp8): the converted folders load with `DiffusionPipeline.from_pretrained` and
`MagiPipeline.from_pretrained` into pipelines whose weights and outputs equal the direct `load_original_*` ones bit for
bit; sharded and zstd-compressed inputs; presets; the model card; pushing to the Hub (mocked)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from diffusers import DiffusionPipeline
from huggingface_hub import ModelCard

from diffusers_magi import MagiImageToVideoPipeline, MagiPipeline
from diffusers_magi import MagiPipeline
from diffusers_magi.conversion import PRESETS, convert_original_components, load_original_transformer
from diffusers_magi.conversion.cli import main as magi_convert
from diffusers_magi.models.fp8_linear_magi import MagiFp8Linear

from .original_snapshot import SPECIAL_TOKENS, VARIANTS, build_original_snapshot, variant_config

FP8_VARIANT = "tiny45_distill_quant"


@pytest.fixture(scope="module")
def snapshot(reference_dir, tmp_path_factory):
    pytest.importorskip("sentencepiece", reason="the original T5 tokenizer (spiece.model) needs sentencepiece")
    root = tmp_path_factory.mktemp("original") / "MAGI-1"
    sharded = "tiny45_distill" if "tiny45_distill" in VARIANTS else "tiny45_base"
    return build_original_snapshot(root, reference_dir / "vae" / "tiny_vae_a", {sharded: "sharded"})


def convert_args(snapshot, variant, output, *extra):
    return [
        "--source", str(snapshot), "--variant", variant, "--config", str(variant_config(variant)),
        "--special-tokens", str(SPECIAL_TOKENS), "--output", str(output), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def converted(snapshot, tmp_path_factory):
    """variant -> converted folder; the fp8 one through the installed console script, the others in-process."""
    root = tmp_path_factory.mktemp("converted")
    folders = {}
    for variant in VARIANTS:
        folders[variant] = root / variant
        args = convert_args(snapshot, variant, folders[variant], "--max-shard-size", "2MB")
        if variant == FP8_VARIANT:
            executable = shutil.which("magi-convert")
            assert executable, "the magi-convert console script is not installed (pip install -e .)"
            subprocess.run([executable, *args], check=True, capture_output=True)
        else:
            assert magi_convert(args) == 0
    return folders


def direct_pipeline(snapshot, variant, **kwargs):
    components = convert_original_components(
        variant_config(variant),
        snapshot / "ckpt" / "magi" / variant,
        SPECIAL_TOKENS,
        vae_dir=snapshot / "ckpt" / "vae",
        t5_dir=snapshot / "ckpt" / "t5" / "t5-v1_1-xxl",
        **kwargs,
    )
    return MagiPipeline(**components)


def load_dtype(variant):
    """The dtypes of the direct pipeline: transformer blocks in the config's params_dtype (bfloat16 for the fp8
    checkpoint), VAE float32; Diffusers needs them as `dtype`."""
    return {"transformer": torch.bfloat16, "default": torch.float32} if variant == FP8_VARIANT else None


def generate(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt="a red fox runs through the snow",
        height=32,
        width=32,
        num_frames=48,
        num_inference_steps=8,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).frames


def public_config(component) -> dict:
    return {key: value for key, value in component.config.items() if not key.startswith("_")}


def assert_same_weights(model, reference):
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name


def test_folder_layout_and_model_card(converted):
    folder = converted[FP8_VARIANT]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "MagiPipeline"
    for component in ("transformer", "vae", "scheduler"):
        assert index[component][0] == "diffusers_magi"
        assert (folder / component / "diffusers_magi.py").is_file()
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"]
    assert (folder / "pipeline_magi.py").is_file()
    assert (folder / "tokenizer" / "tokenizer.json").is_file()
    # --max-shard-size 2MB: the VAE (13 MB) is sharded with an index
    assert (folder / "vae" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert not list(folder.parent.glob(".*partial*")), "no temporary folder is left behind"

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-video"
    assert card.data.license == "apache-2.0" and card.data.base_model == "sand-ai/MAGI-1"
    assert {"diffusers-magi", "fp8", "distilled", "image-to-video"} <= set(card.data.tags)
    for snippet in ("MagiImageToVideoPipeline", "MagiVideoToVideoPipeline", 'custom_pipeline="pipeline_magi"'):
        assert snippet in card.text
    assert "recommended steps | 8" in card.text


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_converted_folder_equals_direct_loading(snapshot, converted, variant):
    """`DiffusionPipeline.from_pretrained` and `MagiPipeline.from_pretrained` of the converted folder give the same
    weights (values and dtypes) and the same video, bit for bit, as the pipeline built from the original files."""
    direct = direct_pipeline(snapshot, variant)
    expected = generate(direct)
    dtype = load_dtype(variant)
    for loader in (DiffusionPipeline, MagiPipeline):
        loaded = loader.from_pretrained(str(converted[variant]), **({"dtype": dtype} if dtype else {}))
        assert type(loaded) is MagiPipeline
        for name in ("transformer", "vae", "text_encoder"):
            assert_same_weights(getattr(loaded, name), getattr(direct, name))
        assert loaded.config.guidance_mode == direct.config.guidance_mode
        assert public_config(loaded.scheduler) == public_config(direct.scheduler)
        assert torch.equal(generate(loaded), expected), f"{loader.__name__} output differs"


def test_fp8_folder_keeps_float8_weights(converted):
    transformer = MagiPipeline.from_pretrained(str(converted[FP8_VARIANT]), dtype=load_dtype(FP8_VARIANT)).transformer
    assert transformer.config.fp8_layers == [1]
    fp8 = [module for module in transformer.modules() if isinstance(module, MagiFp8Linear)]
    assert len(fp8) == 7
    assert all(module.fp8_weight.dtype == torch.uint8 and module.weight_scale.dtype == torch.float32 for module in fp8)
    assert transformer.blocks[0].attn.to_q.weight.dtype == torch.bfloat16
    assert transformer.patch_embedding.weight.dtype == torch.float32


@pytest.mark.slow
def test_dequantized_fp8_conversion(snapshot, tmp_path):
    output = tmp_path / "dequantized"
    assert magi_convert(convert_args(snapshot, FP8_VARIANT, output, "--dequantize-fp8", "--dtype", "float32")) == 0
    transformer = MagiPipeline.from_pretrained(str(output)).transformer
    assert transformer.config.fp8_layers is None
    assert not any(isinstance(module, MagiFp8Linear) for module in transformer.modules())
    direct = load_original_transformer(
        variant_config(FP8_VARIANT),
        snapshot / "ckpt" / "magi" / FP8_VARIANT,
        SPECIAL_TOKENS,
        dtype=torch.float32,
        dequantize_fp8=True,
    )
    assert_same_weights(transformer, direct)
    assert "dequantised to float32" in (output / "README.md").read_text()


def test_dequantize_needs_a_dtype(snapshot, tmp_path, capsys):
    with pytest.raises(SystemExit):
        magi_convert(convert_args(snapshot, FP8_VARIANT, tmp_path / "out", "--dequantize-fp8"))
    assert "--dequantize-fp8 needs --dtype" in capsys.readouterr().err


@pytest.mark.slow
def test_from_original(snapshot):
    """`MagiPipeline.from_original` reads the original layout directly; the I2V class gets the same components."""
    variant = "tiny45_base"
    pipe = MagiPipeline.from_original(snapshot, variant, special_tokens=SPECIAL_TOKENS, config=variant_config(variant))
    assert torch.equal(generate(pipe), generate(direct_pipeline(snapshot, variant)))
    i2v = MagiImageToVideoPipeline.from_original(
        snapshot, variant, special_tokens=SPECIAL_TOKENS, config=variant_config(variant)
    )
    assert type(i2v) is MagiImageToVideoPipeline
    assert_same_weights(i2v.transformer, pipe.transformer)


def test_from_original_downloads_only_the_variant(snapshot):
    variant = FP8_VARIANT
    with mock.patch("huggingface_hub.snapshot_download", return_value=str(snapshot)) as download:
        pipe = MagiPipeline.from_original(
            "sand-ai/MAGI-1", variant, special_tokens=SPECIAL_TOKENS, config=variant_config(variant), revision="abc"
        )
    download.assert_called_once()
    args, kwargs = download.call_args
    assert args == ("sand-ai/MAGI-1",) and kwargs["revision"] == "abc"
    assert kwargs["allow_patterns"] == [
        f"ckpt/magi/{variant}/inference_weight.fp8.distill/*",
        "ckpt/vae/*",
        "ckpt/t5/t5-v1_1-xxl/*",
    ]
    assert pipe.transformer.config.fp8_layers == [1]


def test_presets_reproduce_the_original_example_configs(reference_dir):
    """Every field of the six original example configs, except the three local paths of the original scripts, which
    the presets point at the original Hub repository's folders."""
    folder = reference_dir / "original_configs"
    paths = {"load", "t5_pretrained", "vae_pretrained"}
    assert set(PRESETS) == {path.name.removesuffix("_config.json") for path in folder.glob("*_config.json")}
    for variant, preset in PRESETS.items():
        original = json.loads((folder / f"{variant}_config.json").read_text())
        assert preset.keys() == original.keys()
        for section in ("model_config", "engine_config"):
            assert preset[section] == original[section], (variant, section)
            assert list(preset[section]) == list(original[section]), "same field order"
        runtime = {key: value for key, value in preset["runtime_config"].items() if key not in paths}
        assert runtime == {key: value for key, value in original["runtime_config"].items() if key not in paths}
        assert preset["runtime_config"].keys() == original["runtime_config"].keys()
        assert preset["runtime_config"]["load"] == f"ckpt/magi/{variant}"
        assert preset["runtime_config"]["t5_pretrained"] == "ckpt/t5/t5-v1_1-xxl"
        assert preset["runtime_config"]["vae_pretrained"] == "ckpt/vae"


def test_push_to_hub_is_called_with_the_folder(snapshot, tmp_path):
    output = tmp_path / "pushed"
    with (
        mock.patch("huggingface_hub.HfApi.create_repo") as create_repo,
        mock.patch("huggingface_hub.HfApi.upload_folder") as upload_folder,
    ):
        args = convert_args(snapshot, "tiny45_base", output, "--push-to-hub", "someone/magi-tiny", "--private")
        assert magi_convert(args) == 0
    create_repo.assert_called_once_with("someone/magi-tiny", repo_type="model", private=True, exist_ok=True)
    upload_folder.assert_called_once()
    assert upload_folder.call_args.kwargs["repo_id"] == "someone/magi-tiny"
    assert upload_folder.call_args.kwargs["folder_path"] == str(output)
    assert 'from_pretrained("someone/magi-tiny"' in (output / "README.md").read_text()


def test_existing_output_is_not_overwritten(snapshot, tmp_path, capsys):
    output = tmp_path / "taken"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    assert magi_convert(convert_args(snapshot, "tiny45_base", output)) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert (output / "keep.txt").read_text() == "mine"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["hub", "local"])
def test_fresh_process_loads_through_the_wrapper_files(snapshot, converted, tmp_path, mode):
    """A process that never imports diffusers_magi loads the converted fp8 folder with `custom_pipeline=
    "pipeline_magi", trust_remote_code=True`, from a (mocked) Hub repository or a local folder, and generates the same
    video as the direct pipeline."""
    script = Path(__file__).with_name("fake_hub_loader.py")
    output = tmp_path / "frames.pt"
    environment = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run(
        [sys.executable, str(script), str(converted[FP8_VARIANT]), mode, str(output)],
        check=True,
        env=environment,
        capture_output=True,
    )
    result = torch.load(output)
    assert result["pipeline_class"] == "MagiPipeline"
    assert torch.equal(result["frames"], generate(direct_pipeline(snapshot, FP8_VARIANT)))


def test_convert_from_a_hub_repository_id(snapshot, tmp_path):
    """`--source` naming a Hub repository downloads only the variant's weight folder, the VAE and T5."""
    output = tmp_path / "from_hub"
    with mock.patch("huggingface_hub.snapshot_download", return_value=str(snapshot)) as download:
        args = convert_args(snapshot, FP8_VARIANT, output)
        args[args.index("--source") + 1] = "sand-ai/MAGI-1"
        assert magi_convert(args) == 0
    assert download.call_args.args == ("sand-ai/MAGI-1",)
    assert download.call_args.kwargs["allow_patterns"][0] == f"ckpt/magi/{FP8_VARIANT}/inference_weight.fp8.distill/*"
    assert (output / "model_index.json").is_file()


def test_dry_run_reports_every_component_of_the_layout(snapshot, tmp_path, capsys):
    """Headers only: the transformer, VAE and T5 (pickled shards, memory-mapped) of the layout, and no output."""
    output = tmp_path / "never-written"
    args = ["--source", str(snapshot), "--variant", "tiny45_base", "--config", str(variant_config("tiny45_base"))]
    assert magi_convert([*args, "--dry-run", "--output", str(output)]) == 0
    report = capsys.readouterr().out
    for component in ("transformer", "vae", "text_encoder"):
        assert f"{component}: OK" in report, report
    assert "conversion would succeed" in report and not output.exists()
