"""`MagiVideoToVideoPipeline`: MAGI-1 video continuation from a prefix video."""

import inspect
from typing import List, Optional

import torch
from diffusers.utils import replace_example_docstring

from .input_checks_magi import check_tensor
from .pipeline_magi import MagiPipeline, call_signature_with_prefix
from .video_processing_magi import frames_to_video, load_video_frames

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from diffusers_magi import MagiVideoToVideoPipeline
        >>> from diffusers_magi.pipelines import export_to_video

        >>> pipe = MagiVideoToVideoPipeline.from_pretrained("path/to/MAGI-1-4.5B-distill-diffusers")
        >>> video = pipe(video="start.mp4", prompt="the car drives on into the night", height=480, width=480).frames[0]
        >>> export_to_video(video, "continued.mp4", fps=24)
        ```
"""


class MagiVideoToVideoPipeline(MagiPipeline):
    r"""
    MAGI-1 video continuation. The first `num_prefix_frames` frames of `video` are encoded by the VAE; whole clean
    chunks of them are stored in the KV cache once, a partial chunk is pasted into the first generated chunk before
    every call, and the video continues from there. The output holds the new frames only. Components and arguments
    as [`MagiPipeline`], plus:

    Args:
        video (`str` or a list of paths, one per video): the prefix video file.
        prefix_latents (`torch.Tensor` of shape `(batch, 16, frames, height / 8, width / 8)`, *optional*): the prefix
            already encoded (VAE-scaled), instead of `video`; any number of latent frames.
        num_prefix_frames (`int`, defaults to 32): frames of `video` used as prefix (the original uses 32); a
            multiple of 4 (the VAE's temporal compression).
        fps (`int`, defaults to 24): frame rate the prefix video is resampled to (ffmpeg's `fps` filter).
    """

    _prefix_argument_names = ("video", "prefix_latents", "num_prefix_frames", "fps")

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(self, *args, **kwargs):
        r"""
        Continue `video`. Arguments: those of [`MagiPipeline.__call__`], plus `video` (first), `prefix_latents`,
        `num_prefix_frames` and `fps` (see the class docstring).

        Examples:
        """
        return self._generate(args, kwargs)

    __call__.__signature__ = call_signature_with_prefix(
        inspect.Parameter("video", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
        inspect.Parameter("prefix_latents", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Optional[torch.Tensor]),
        inspect.Parameter("num_prefix_frames", inspect.Parameter.KEYWORD_ONLY, default=32, annotation=int),
        inspect.Parameter("fps", inspect.Parameter.KEYWORD_ONLY, default=24, annotation=int),
    )

    def _prefix_latents(
        self, num_videos, height, width, device, video=None, prefix_latents=None, num_prefix_frames=32, fps=24
    ):
        if (video is None) == (prefix_latents is None):
            raise ValueError(
                "MagiVideoToVideoPipeline needs exactly one of `video` (the prefix video file) and `prefix_latents` "
                "(the prefix already encoded by the VAE)."
            )
        if prefix_latents is not None:
            check_tensor(prefix_latents, "prefix_latents")
            return self._check_prefix_latents(prefix_latents.to(device), num_videos, height, width)
        if self.vae is None:
            raise ValueError("Encoding `video` needs the pipeline's VAE; load it, or pass `prefix_latents`.")
        if num_prefix_frames < 1 or num_prefix_frames % 4:
            raise ValueError(f"num_prefix_frames must be a positive multiple of 4, got {num_prefix_frames}.")
        videos: List = video if isinstance(video, (list, tuple)) else [video]
        if len(videos) not in (1, num_videos):
            raise ValueError(f"Got {len(videos)} videos for {num_videos} generated videos; pass one or one per video.")
        latents = torch.cat([self._encode_video(path, height, width, num_prefix_frames, fps) for path in videos])
        return self._check_prefix_latents(latents.to(device), num_videos, height, width)

    def _encode_video(self, path, height: int, width: int, num_prefix_frames: int, fps: int) -> torch.Tensor:
        frames = load_video_frames(path, fps, width, height, num_frames=num_prefix_frames)
        if frames.shape[0] < num_prefix_frames:
            raise ValueError(
                f"`video` {path!r} has {frames.shape[0]} frames at {fps} fps, fewer than num_prefix_frames="
                f"{num_prefix_frames}; pass a longer video or a smaller num_prefix_frames."
            )
        return self._encode_prefix(frames_to_video(frames))
