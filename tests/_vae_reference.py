"""Run the recorded VAE / pre-processing cases of ``<reference>/vae`` (``reference_data.py``) through diffusers-magi.

Each case folder holds ``case.json`` (the original call as pseudo-code, shapes, dtype, tolerances), and
``inputs.safetensors`` / ``outputs.safetensors`` or an asset file. The operation is recognised from the case's inputs
and outputs, and its parameters (tile sizes, fps, frame size, resize policy) are read from the recorded calls, so
new cases of the same kinds (other checkpoints, sizes, dtypes) run without code changes.
"""

import ast
import hashlib
import json
import re
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffusers_magi.conversion import load_original_vae
from diffusers_magi.pipelines.video_processing_magi import (
    frames_to_video,
    load_image_frames,
    load_video_frames,
    video_to_uint8,
)

from .conftest import REFERENCE_DIR
from .reference_data import subset_changes, tensors_sha256

VAE_REFERENCE_DIR = REFERENCE_DIR / "vae"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
# What the original pipeline hard-codes around the VAE (inference/pipeline/video_process.py).
PIPELINE_TILE_SIZE = 256
PIPELINE_SPATIAL_OVERLAP = 0.25
PIPELINE_TEMPORAL_OVERLAP = 0.0
PIPELINE_FPS = 24


def case_names() -> list[str]:
    cases_dir = VAE_REFERENCE_DIR / "cases"
    return sorted(p.parent.name for p in cases_dir.glob("*/case.json")) if cases_dir.is_dir() else []


class Case:
    def __init__(self, name: str):
        self.dir = VAE_REFERENCE_DIR / "cases" / name
        self.spec = json.loads((self.dir / "case.json").read_text())
        self.inputs = load_file(self.dir / "inputs.safetensors") if (self.dir / "inputs.safetensors").exists() else {}
        self.outputs = load_file(self.dir / "outputs.safetensors")
        self.dtype = DTYPES[self.spec.get("dtype", "float32").removeprefix("torch.")]
        self.calls = self.spec.get("call", [])

    @property
    def asset(self) -> Path | None:
        asset = self.spec.get("asset")
        return VAE_REFERENCE_DIR / asset if asset else None

    def kind(self) -> str:
        if "x" in self.inputs:
            return "encode"
        if "z" in self.inputs:
            return "decode"
        if "video_thwc" in self.inputs:
            return "pipeline_encode"
        if "chunk" in self.inputs:
            return "pipeline_decode"
        is_image = self.asset is not None and self.asset.suffix.lower() in (".jpeg", ".jpg", ".png")
        if "latent_scaled" in self.outputs:
            return "process_image" if is_image else "process_prefix_video"
        return "preprocess_i2v" if is_image else "preprocess_v2v"

    def find_calls(self, function: str) -> list[tuple[str | None, list, dict]]:
        """Every recorded call of ``function`` (in code or in comments): (assigned name, positional args, kwargs).

        Arguments that are not literals (variables) are returned as their source text.
        """
        found = []
        for line in self.calls:
            for match in re.finditer(rf"(?:(\w+)\s*=\s*)?\b{re.escape(function)}\(", line):
                depth, end = 0, None
                for index in range(match.end() - 1, len(line)):
                    depth += {"(": 1, ")": -1}.get(line[index], 0)
                    if depth == 0:
                        end = index + 1
                        break
                start = match.end() - 1 - len(function)
                try:
                    call = ast.parse(line[start:end]).body[0].value
                except SyntaxError:  # prose that merely mentions the function, e.g. "VaeHelper.encode(... tile 256)"
                    continue
                args = [_literal(arg) for arg in call.args]
                found.append((match.group(1), args, {kw.arg: _literal(kw.value) for kw in call.keywords}))
        return found

    def weights_sha256_ok(self) -> bool:
        """The checkpoint is the one the case was recorded with: its sha256, or, in the in-repository subset (whose
        VAE encoder is stored as zeros), the recorded sha256 of the full-set file the subset was built from and the
        sha256 of the tensors it keeps as recorded."""
        checkpoint = self.spec["checkpoint"]
        relative = f"{checkpoint['path']}/diffusion_pytorch_model.safetensors"
        weights = VAE_REFERENCE_DIR.parent / relative
        change = subset_changes(VAE_REFERENCE_DIR.parent).get(relative)
        if change is None:
            return hashlib.sha256(weights.read_bytes()).hexdigest() == checkpoint["safetensors_sha256"]
        kept = {name: tensor for name, tensor in load_file(weights).items() if name not in change["zeroed_tensors"]}
        return (
            change["full_set_sha256"] == checkpoint["safetensors_sha256"]
            and tensors_sha256(kept) == change["kept_tensors_sha256"]
        )

    def model(self):
        return _converted_model(str(VAE_REFERENCE_DIR.parent / self.spec["checkpoint"]["path"]), self.dtype)


def _literal(node: ast.expr):
    try:
        return ast.literal_eval(node)
    except ValueError:
        return ast.unparse(node)


@lru_cache(maxsize=None)
def _converted_model(path: str, dtype: torch.dtype):
    return load_original_vae(path, dtype=dtype)


def _tiling_from_helper_call(kwargs: dict) -> dict:
    """``enable_tiling`` arguments equal to a recorded ``VaeHelper.encode/decode(...)`` call (its defaults: what the
    pipeline's ``encode_prefix_video`` / ``decode_chunk`` pass, except the temporal tile of ``fps // 2`` frames)."""
    if kwargs.get("allow_spatial_tiling", True) is False:  # the original then uses 100000-pixel tiles
        kwargs = {**kwargs, "tile_sample_min_height": 100000, "tile_sample_min_width": 100000}
    return dict(
        tile_sample_min_height=kwargs.get("tile_sample_min_height", PIPELINE_TILE_SIZE),
        tile_sample_min_width=kwargs.get("tile_sample_min_width", PIPELINE_TILE_SIZE),
        tile_sample_min_num_frames=kwargs.get("tile_sample_min_length", 16),
        spatial_tile_overlap_factor=kwargs.get("spatial_tile_overlap_factor", PIPELINE_SPATIAL_OVERLAP),
        temporal_tile_overlap_factor=kwargs.get("temporal_tile_overlap_factor", PIPELINE_TEMPORAL_OVERLAP),
    )


def _encode_tiling(case: Case) -> dict:
    helper_calls = case.find_calls("VaeHelper.encode")
    if helper_calls:
        return _tiling_from_helper_call(helper_calls[0][2])
    prefix_calls = case.find_calls("encode_prefix_video")
    fps = prefix_calls[0][1][1] if prefix_calls and isinstance(prefix_calls[0][1][1], int) else PIPELINE_FPS
    return _tiling_from_helper_call({"tile_sample_min_length": fps // 2})  # what encode_prefix_video passes


def _decode_tiling(case: Case) -> dict:
    helper_calls = case.find_calls("VaeHelper.decode")
    if helper_calls:
        return _tiling_from_helper_call(helper_calls[0][2])
    fps = re.search(r"fps=(\d+)", " ".join(case.calls))
    fps = int(fps.group(1)) if fps else PIPELINE_FPS
    return _tiling_from_helper_call({"tile_sample_min_length": fps // 2})  # what decode_chunk passes


def _pipeline_encode(model, frames: torch.Tensor, tiling: dict) -> dict[str, torch.Tensor]:
    model.enable_tiling(**tiling)
    latent = model.encode(frames_to_video(frames, model.dtype)).latent_dist.mode()
    return {"latent": latent, "latent_scaled": latent * model.config.scaling_factor}


def run_case(case: Case) -> dict[str, torch.Tensor]:
    """Our outputs for every output name the case records."""
    kind = case.kind()
    if kind == "preprocess_i2v":
        return {
            name: load_image_frames(case.asset, kw["w"], kw["h"], resize_mode=kw.get("aspect_policy", "fit"))
            for name, _, kw in case.find_calls("ffmpeg_i2v")
        }
    if kind == "preprocess_v2v":
        outputs = {}
        for name, args, kw in case.find_calls("ffmpeg_v2v"):
            fps = kw["fps"] if "fps" in kw else args[1]
            outputs[name] = load_video_frames(
                case.asset,
                fps,
                kw["w"],
                kw["h"],
                num_frames=kw.get("prefix_frame"),
                max_seconds=kw.get("prefix_video_max_chunk", 5),
            )
        return outputs

    model = case.model()
    with torch.no_grad():
        if kind == "encode":
            model.disable_tiling()
            posterior = model.encode(case.inputs["x"].to(case.dtype)).latent_dist
            return {
                "moments": posterior.parameters,
                "mean": posterior.mean,
                "logvar": posterior.logvar,
                "std": posterior.std,
                "latent": posterior.mode(),
            }
        if kind == "decode":
            model.disable_tiling()
            z = case.inputs["z"].to(case.dtype)
            return {"video": model.decode(z).sample, "decoder_all_frames": model.decoder(z)}
        if kind == "pipeline_encode":
            return _pipeline_encode(model, case.inputs["video_thwc"], _encode_tiling(case))
        if kind == "pipeline_decode":
            model.enable_tiling(**_decode_tiling(case))
            chunk = case.inputs["chunk"] / model.config.scaling_factor
            video = model.decode(chunk.to(case.dtype)).sample
            return {
                "frames_float": video.transpose(1, 2).flatten(0, 1),
                "frames_uint8": video_to_uint8(video).flatten(0, 1),
            }
        if kind == "process_image":
            (_, _, kw), = case.find_calls("ffmpeg_i2v")
            frames = load_image_frames(case.asset, kw["w"], kw["h"], resize_mode=kw.get("aspect_policy", "fit"))
            return {"frames_thwc": frames, **_pipeline_encode(model, frames, _encode_tiling(case))}
        if kind == "process_prefix_video":
            (_, args, kw), = case.find_calls("ffmpeg_v2v")
            fps = kw["fps"] if "fps" in kw else args[1]
            frames = load_video_frames(case.asset, fps, kw["w"], kw["h"], num_frames=kw.get("prefix_frame"))
            return {"frames_thwc": frames, **_pipeline_encode(model, frames, _encode_tiling(case))}
    raise AssertionError(f"unhandled case kind {kind}")
