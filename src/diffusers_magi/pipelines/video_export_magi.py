"""Writing a streamed MAGI-1 video to an mp4 file while its chunks are still being generated."""

from typing import Iterable, Union

import numpy as np
import torch

from .pipeline_output import MagiChunkOutput


def _uint8_frames(frames, video_index: int) -> np.ndarray:
    """Frames of one video of a chunk, as uint8 `(frames, height, width, 3)`."""
    if isinstance(frames, list):  # "pil": one list of images per video
        return np.stack([np.asarray(image.convert("RGB")) for image in frames[video_index]])
    if isinstance(frames, torch.Tensor):  # "pt": (batch, frames, 3, H, W) in [0, 1]
        if frames.ndim != 5 or frames.shape[2] != 3:
            raise ValueError("write_video_stream needs decoded frames; generate with output_type 'np', 'pt' or 'pil'.")
        frames = frames[video_index].permute(0, 2, 3, 1).cpu().numpy()
    else:  # "np": (batch, frames, H, W, 3) in [0, 1]
        frames = frames[video_index]
    return np.round(np.clip(frames, 0.0, 1.0) * 255).astype(np.uint8)


def write_video_stream(
    chunks: Iterable[Union[MagiChunkOutput, np.ndarray, torch.Tensor, list]],
    output_path: str,
    fps: int = 24,
    video_index: int = 0,
    quality: float = 8.0,
) -> str:
    """Append each chunk's frames to an H.264 mp4 as soon as the chunk arrives (only one chunk is in memory).

    Args:
        chunks: what `pipe.stream(...)` yields (or the `frames` of each chunk), decoded (`output_type` `"np"`,
            `"pt"` or `"pil"`).
        output_path (`str`): the mp4 file to write.
        fps (`int`, defaults to 24): frame rate.
        video_index (`int`, defaults to 0): which video of a batch to write.
        quality (`float`, defaults to 8.0): imageio/ffmpeg quality (0-10).

    Returns:
        `output_path`.

    Example:
        ```py
        write_video_stream(pipe.stream(prompt="a fox runs through snow", num_frames=480), "fox.mp4")
        ```
    """
    import imageio

    writer = None
    try:
        for chunk in chunks:
            frames = _uint8_frames(chunk.frames if isinstance(chunk, MagiChunkOutput) else chunk, video_index)
            if writer is None:
                writer = imageio.get_writer(
                    output_path, fps=fps, codec="libx264", quality=quality, pixelformat="yuv420p", macro_block_size=1
                )
            for frame in frames:
                writer.append_data(frame)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise ValueError("write_video_stream received no chunk to write.")
    return output_path

