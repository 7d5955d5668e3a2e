# Copyright 2025 The diffusers-magi authors. Licensed under the Apache License, Version 2.0.
"""Pixel-side pre/post-processing of the MAGI-1 pipelines, equal to the original's.

* I2V: the conditioning image is resized by ffmpeg's ``scale`` filter (default bicubic swscale, applied to the
  decoded image in its own pixel format) to exactly ``width x height`` (``"fit"``), or aspect-preserving with a
  centre crop (``"crop"``) or black padding (``"pad"``).
* V2V: the prefix video is resampled with ffmpeg's ``fps`` filter and scaled the same way; the pipeline keeps its
  first ``num_frames`` frames, otherwise the last whole seconds (at most ``max_seconds``).
* Frames are mapped to the VAE's ``[-1, 1]`` with ``x / 127.5 - 1`` and decoded videos back to ``uint8`` with ``x *
  127.5 + 127.5``, clamped and **truncated** (not rounded), in the decoded tensor's dtype.

The original runs ffmpeg; a different resampler (PIL, torchvision) gives different pixels, so this module runs the
ffmpeg binary shipped by ``imageio-ffmpeg``.
"""

import io
import os
import subprocess

import numpy as np
import PIL.Image
import torch

RESIZE_MODES = ("fit", "crop", "pad")


def _ffmpeg_executable() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _run_ffmpeg(args: list[str], stdin: bytes | None, height: int, width: int) -> torch.Tensor:
    """Run ffmpeg with ``args`` (rawvideo rgb24 on stdout) and return its frames as uint8 ``(T, height, width, 3)``."""
    result = subprocess.run([_ffmpeg_executable(), "-nostdin", *args], input=stdin, capture_output=True)
    if result.returncode != 0:
        raise ValueError(f"ffmpeg could not read the input: {result.stderr.decode(errors='replace').strip()[-2000:]}")
    frames = np.frombuffer(result.stdout, dtype=np.uint8)
    if frames.size == 0:
        raise ValueError("ffmpeg decoded no frames from the input.")
    return torch.from_numpy(frames.reshape(-1, height, width, 3).copy())


def _image_bytes(image) -> bytes:
    """Encoded image bytes: files and bytes are passed through, arrays and PIL images are written as PNG."""
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return f.read()
    if isinstance(image, bytes):
        return image
    if isinstance(image, np.ndarray):
        image = PIL.Image.fromarray(image)
    if isinstance(image, PIL.Image.Image):
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(
        f"`image` must be a file path, encoded image bytes, a PIL image or a uint8 HxWx3 array, got {type(image)}."
    )


def load_image_frames(image, width: int, height: int, resize_mode: str = "fit") -> torch.Tensor:
    r"""
    Resize an image with ffmpeg exactly as the original I2V preprocessing does.

    Args:
        image: a file path or encoded bytes (bit-identical with the original, which pipes the file to ffmpeg), or a
            PIL image / uint8 ``(H, W, 3)`` array (sent to ffmpeg as lossless PNG; for a JPEG this differs slightly
            from passing the file, because ffmpeg then resizes RGB instead of the JPEG's YUV).
        width, height: output size in pixels.
        resize_mode: ``"fit"`` (the original default: scale to ``width x height``, aspect not kept), ``"crop"``
            (scale to cover, centre crop) or ``"pad"`` (scale to fit inside, pad black, centred).

    Returns:
        uint8 tensor ``(1, height, width, 3)`` (RGB).
    """
    if resize_mode == "fit":
        filters = f"scale={width}:{height}"
    elif resize_mode == "crop":
        filters = f"scale={width}:{height}:force_original_aspect_ratio=increase,crop={width}:{height}"
    elif resize_mode == "pad":
        filters = (
            f"scale={width}:{height}:force_original_aspect_ratio=decrease,"
            f"pad={width}:{height}:(ow-iw)/2:(oh-ih)/2:color=black"
        )
    else:
        raise ValueError(f"`resize_mode` must be one of {RESIZE_MODES}, got {resize_mode!r}.")
    args = ["-f", "image2pipe", "-i", "pipe:0", "-vf", filters, "-frames:v", "1"]
    args += ["-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:"]
    return _run_ffmpeg(args, _image_bytes(image), height, width)[:1]


def load_video_frames(
    video: str | os.PathLike,
    fps: int,
    width: int,
    height: int,
    num_frames: int | None = None,
    max_seconds: int = 5,
) -> torch.Tensor:
    r"""
    Read a video with ffmpeg, resample it to ``fps`` and resize it, as the original V2V preprocessing does.

    Args:
        video: path of a video file.
        fps: output frame rate (ffmpeg ``fps`` filter: frames are dropped or repeated, never blended).
        width, height: output size in pixels (aspect not kept).
        num_frames: keep the FIRST ``num_frames`` frames (the original V2V pipeline keeps 32). When `None`, keep the
            LAST whole seconds: ``min(n // fps * fps, max_seconds * fps)`` frames, or 1 frame for a clip shorter than
            one second.
        max_seconds: upper bound on the kept seconds when ``num_frames`` is `None`.

    Returns:
        uint8 tensor ``(T, height, width, 3)`` (RGB).
    """
    if not isinstance(video, (str, os.PathLike)):
        raise TypeError(f"`video` must be the path of a video file, got {type(video)}.")
    if not os.path.isfile(video):
        raise ValueError(f"`video` file {video!r} does not exist.")
    args = ["-ss", "0", "-i", os.fspath(video), "-vf", f"fps=fps={fps},scale={width}:{height}"]
    args += ["-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:"]
    frames = _run_ffmpeg(args, None, height, width)
    if num_frames is not None:
        return frames[:num_frames]
    total = frames.shape[0]
    keep = 1 if total < fps else min(total // fps * fps, max_seconds * fps)
    return frames[-keep:]


def frames_to_video(frames: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    r"""
    uint8 frames ``(T, H, W, 3)`` -> VAE input ``(1, 3, T, H, W)`` in ``[-1, 1]`` (``x / 127.5 - 1`` in float32, then
    cast to ``dtype``, as the original).
    """
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"`frames` must be uint8 RGB frames of shape (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}."
        )
    video = frames.permute(3, 0, 1, 2).unsqueeze(0)
    return (video / 127.5 - 1.0).to(dtype)


def video_to_uint8(video: torch.Tensor) -> torch.Tensor:
    r"""
    Decoded video ``(B, C, T, H, W)`` in about ``[-1, 1]`` -> uint8 frames ``(B, T, C, H, W)``.

    ``x * 127.5 + 127.5``, clamped to [0, 255] and truncated toward zero, computed in ``video``'s own dtype (a
    bfloat16 decode is therefore rounded to bfloat16 at each step, as in the original).
    """
    if video.ndim != 5:
        raise ValueError(f"`video` must be (batch, channels, frames, height, width), got {tuple(video.shape)}.")
    frames = (video * 127.5 + 127.5).clamp(0, 255).to(torch.uint8)
    return frames.permute(0, 2, 1, 3, 4)


def postprocess_video(video: torch.Tensor, output_type: str = "np"):
    r"""
    Decoded video ``(B, C, T, H, W)`` -> pipeline output, quantised to uint8 exactly like the original.

    Args:
        video: the VAE's decoded video.
        output_type: ``"pt"``: float32 tensor ``(B, T, C, H, W)`` in ``[0, 1]``; ``"np"``: float32 array
            ``(B, T, H, W, C)`` in ``[0, 1]`` (both are the uint8 frames divided by 255); ``"pil"``: a list (per
            video) of lists of PIL images.
    """
    frames = video_to_uint8(video)
    if output_type == "pt":
        return frames.float() / 255.0
    frames = frames.permute(0, 1, 3, 4, 2).cpu().numpy()
    if output_type == "np":
        return frames.astype(np.float32) / 255.0
    if output_type == "pil":
        return [[PIL.Image.fromarray(frame) for frame in clip] for clip in frames]
    raise ValueError(f"`output_type` must be 'pt', 'np' or 'pil', got {output_type!r}.")
