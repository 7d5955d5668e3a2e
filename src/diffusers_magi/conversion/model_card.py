"""The model card (`README.md`) of a converted MAGI-1 folder: YAML front matter for the Hub and usage snippets."""

from typing import Optional

from .presets import ORIGINAL_REPO_ID, VARIANT_NOTES

_CARD = """---
library_name: diffusers
pipeline_tag: text-to-video
license: apache-2.0
base_model: {base_model}
tags:
{tags}
---

# MAGI-1 {title} for Diffusers

[MAGI-1](https://github.com/SandAI-org/MAGI-1) ({base_model}) converted by `magi-convert` of the `diffusers-magi`
package into a Diffusers pipeline folder: `MagiPipeline` with
`MagiTransformer3DModel`, `AutoencoderMagi`, `MagiChunkScheduler` and the T5 text encoder. It generates video
autoregressively, chunk by chunk (24 frames each), several chunks denoised together at staggered noise levels.

| | |
|---|---|
| variant | {variant} |
| transformer | {transformer} |
| guidance | {guidance} |
| recommended steps | {steps} (the pipeline default) |
| original example resolution | {height} x {width}, {frames} frames at {fps} fps |
| hardware of the original release | {hardware} |

## Usage

```bash
pip install diffusers-magi
```

```python
import torch
import diffusers_magi  # registers the MAGI-1 classes with Diffusers
from diffusers import DiffusionPipeline
from diffusers.utils import export_to_video, load_image

pipe = DiffusionPipeline.from_pretrained("{repo_id}", dtype=torch.bfloat16)
pipe.enable_model_cpu_offload()

# text to video
video = pipe(prompt="A red fox trots through fresh snow at sunrise.", num_frames=96).frames[0]
export_to_video(list(video), "t2v.mp4", fps=24)

# image to video: the image is the first frame
from diffusers_magi import MagiImageToVideoPipeline
i2v = MagiImageToVideoPipeline.from_pipe(pipe)
video = i2v(image=load_image("first_frame.jpg"), prompt="The camera slowly pulls back.", num_frames=96).frames[0]

# video to video: continue a clip from its first 32 frames
from diffusers_magi import MagiVideoToVideoPipeline
v2v = MagiVideoToVideoPipeline.from_pipe(pipe)
video = v2v(video="clip.mp4", num_prefix_frames=32, prompt="The waves keep rolling in.", num_frames=96).frames[0]
```

Without `import diffusers_magi` (the package must still be installed), the small loader files of this folder let
Diffusers import it for you:

```python
pipe = DiffusionPipeline.from_pretrained(
    "{repo_id}", custom_pipeline="pipeline_magi", trust_remote_code=True, dtype=torch.bfloat16
)
```

Load with `dtype=torch.bfloat16`: that is what the original runs (without it the transformer blocks load as
float32); the modules the original keeps in float32 stay float32.{fp8_note}

## License

Weights: Apache-2.0, as released by Sand AI in `{original_repo}`.
"""

_FP8_KEEP_NOTE = """

This folder keeps the original **fp8** weights: in every block but the first and the last, seven linears hold
float8_e4m3fn weights (stored as raw bytes, `fp8_weight`) with float32 scales and run the original's float8
arithmetic (activation quantisation, scaled matrix product: `torch._scaled_mm` on GPUs with float8 tensor cores,
an emulation elsewhere)."""
_FP8_DEQUANTIZED_NOTE = """

This folder was converted from the original **fp8** checkpoint with its float8 linears dequantised to {dtype}: it
runs as a plain transformer, without the original's float8 activation quantisation."""


def model_card(
    variant: Optional[str],
    original_config: dict,
    repo_id: str = "path/to/this/folder",
    dequantized_dtype: Optional[str] = None,
) -> str:
    """Text of `README.md` for a converted folder.

    Args:
        variant (`str`, *optional*): variant name (e.g. `"4.5B_distill"`); `None` for a custom config.
        original_config (`dict`): the original three-section config the folder was converted from.
        repo_id (`str`): what the usage snippets load (the Hub repository id when known).
        dequantized_dtype (`str`, *optional*): for fp8 checkpoints converted with dequantisation, the dtype name.
    """
    model, runtime, engine = (original_config[key] for key in ("model_config", "runtime_config", "engine_config"))
    fp8 = bool(engine.get("fp8_quant"))
    distill = bool(engine.get("distill"))
    tags = ["diffusers-magi", "magi-1", "video-generation", "text-to-video", "image-to-video", "video-to-video"]
    if fp8:
        tags.append("fp8" if dequantized_dtype is None else "dequantized-fp8")
    if distill:
        tags.append("distilled")
    fp8_note = ""
    if fp8:
        fp8_note = (
            _FP8_KEEP_NOTE if dequantized_dtype is None else _FP8_DEQUANTIZED_NOTE.format(dtype=dequantized_dtype)
        )
    return _CARD.format(
        base_model=ORIGINAL_REPO_ID,
        original_repo=ORIGINAL_REPO_ID,
        tags="\n".join(f"- {tag}" for tag in tags),
        title=variant or "(custom config)",
        variant=variant or "custom",
        transformer=(
            f"{model['num_layers']} layers, hidden size {model['hidden_size']}"
            + (", fp8" if fp8 and dequantized_dtype is None else "")
        ),
        guidance=(
            "distilled: one pass per step, no classifier-free guidance"
            if runtime["cfg_number"] == 1
            else "three branches (text + previous chunks, previous chunks, unconditional)"
        ),
        steps=runtime["num_steps"],
        height=runtime["video_size_h"],
        width=runtime["video_size_w"],
        frames=runtime["num_frames"],
        fps=runtime["fps"],
        hardware=VARIANT_NOTES.get(variant, "see the original repository"),
        repo_id=repo_id,
        fp8_note=fp8_note,
    )
