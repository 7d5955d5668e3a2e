"""`MagiImageToVideoPipeline`: MAGI-1 image-to-video (the image is the first latent frame of the video)."""

import inspect
from typing import List, Optional

import torch
from diffusers.utils import replace_example_docstring

from .input_checks_magi import check_tensor
from .pipeline_magi import MagiPipeline, call_signature_with_prefix
from .video_processing_magi import frames_to_video, load_image_frames

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from diffusers_magi import MagiImageToVideoPipeline
        >>> from diffusers_magi.pipelines import export_to_video

        >>> pipe = MagiImageToVideoPipeline.from_pretrained("path/to/MAGI-1-4.5B-distill-diffusers")
        >>> video = pipe(image="first_frame.png", prompt="the boat sails out to sea", height=480, width=480).frames[0]
        >>> export_to_video(video, "boat.mp4", fps=24)
        ```
"""


class MagiImageToVideoPipeline(MagiPipeline):
    r"""
    MAGI-1 image-to-video. The image is encoded by the VAE into one clean latent frame; it is pasted into the first
    frame of chunk 0 before every transformer call, and the video continues from it. Components and arguments as
    [`MagiPipeline`], plus:

    Args:
        image (file path, bytes, `PIL.Image.Image`, uint8 `(H, W, 3)` array, or a list of them, one per video):
            the first frame. It is resized to `width x height` by ffmpeg as the original does.
        prefix_latents (`torch.Tensor` of shape `(batch, 16, 1, height / 8, width / 8)`, *optional*): the image
            already encoded (VAE-scaled), instead of `image`.
        resize_mode (`str`, defaults to `"fit"`): `"fit"` (stretch to the size), `"crop"` (cover, centre crop) or
            `"pad"` (fit inside, black borders).

    The video holds the image's frame and `num_frames` more, rounded up to whole chunks: with `num_frames=96`,
    `ceil((96 // 4 + 1) / 6) = 5` chunks, 120 frames.
    """

    _prefix_argument_names = ("image", "prefix_latents", "resize_mode")

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(self, *args, **kwargs):
        r"""
        Generate a video that starts from `image`. Arguments: those of [`MagiPipeline.__call__`], plus `image`
        (first), `prefix_latents` and `resize_mode` (see the class docstring).

        Examples:
        """
        return self._generate(args, kwargs)

    __call__.__signature__ = call_signature_with_prefix(
        inspect.Parameter("image", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
        inspect.Parameter("prefix_latents", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Optional[torch.Tensor]),
        inspect.Parameter("resize_mode", inspect.Parameter.KEYWORD_ONLY, default="fit", annotation=str),
    )

    def _prefix_latents(self, num_videos, height, width, device, image=None, prefix_latents=None, resize_mode="fit"):
        if (image is None) == (prefix_latents is None):
            raise ValueError(
                "MagiImageToVideoPipeline needs exactly one of `image` (the first frame) and `prefix_latents` (the "
                "image already encoded by the VAE)."
            )
        if prefix_latents is not None:
            check_tensor(prefix_latents, "prefix_latents")
            if prefix_latents.ndim != 5 or prefix_latents.shape[2] != 1:
                raise ValueError(
                    f"prefix_latents of image-to-video must hold one latent frame, (batch, 16, 1, h, w); got "
                    f"{tuple(prefix_latents.shape)}."
                )
            return self._check_prefix_latents(prefix_latents.to(device), num_videos, height, width)
        if self.vae is None:
            raise ValueError("Encoding `image` needs the pipeline's VAE; load it, or pass `prefix_latents`.")
        images: List = image if isinstance(image, (list, tuple)) else [image]
        if len(images) not in (1, num_videos):
            raise ValueError(f"Got {len(images)} images for {num_videos} videos; pass one image or one per video.")
        latents = torch.cat([self._encode_image(single, height, width, resize_mode) for single in images])
        return self._check_prefix_latents(latents.to(device), num_videos, height, width)

    def _encode_image(self, image, height: int, width: int, resize_mode: str) -> torch.Tensor:
        return self._encode_prefix(frames_to_video(load_image_frames(image, width, height, resize_mode)))
