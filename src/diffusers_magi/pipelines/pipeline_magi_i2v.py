"""`MagiImageToVideoPipeline`: MAGI-1 image-to-video (the image is the first latent frame of the video)."""

from typing import List, Optional

import torch

from .pipeline_magi import MagiPipeline
from .video_processing_magi import frames_to_video, load_image_frames


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
    """

    def stream(self, image=None, *args, prefix_latents: Optional[torch.Tensor] = None, resize_mode: str = "fit", **kwargs):
        return super().stream(*args, image=image, prefix_latents=prefix_latents, resize_mode=resize_mode, **kwargs)

    def _prefix_latents(self, num_videos, height, width, device, image=None, prefix_latents=None, resize_mode="fit"):
        if (image is None) == (prefix_latents is None):
            raise ValueError(
                "MagiImageToVideoPipeline needs exactly one of `image` (the first frame) and `prefix_latents` (the "
                "image already encoded by the VAE)."
            )
        if prefix_latents is not None:
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
