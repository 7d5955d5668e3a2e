"""Writing a streamed MAGI-1 video to an mp4 file while its chunks are still being generated.

Frames go to an ffmpeg process (the `imageio-ffmpeg` binary) through a pipe, one chunk at a time. The file always
ends at the last whole chunk: a chunk is written with Ctrl-C and SIGTERM held back until its last frame is in the
pipe, and on any error or interruption ffmpeg is told the video ended and finishes the file (ffmpeg runs in its own
session, so a Ctrl-C in the terminal does not kill it mid-file). When ffmpeg itself fails, the error quotes the last
lines of its log, not its banner.
"""

import contextlib
import os
import signal
import subprocess
import tempfile
import threading
from typing import Callable, Iterable, Optional, Union

import numpy as np
import torch

from .pipeline_output import MagiChunkOutput

# ffmpeg log lines that say nothing about an error.
_NOISE_PREFIXES = (
    "ffmpeg version", "built with", "configuration:", "lib", "Input #", "Output #", "Stream", "Metadata", "Duration",
    "encoder", "Side data", "Press [q]", "frame=", "Conversion failed", "cpb:",
)  # fmt: skip


# Follow-up lines ffmpeg prints after the error that caused them.
_CONSEQUENCES = (
    "Task finished with error code", "Terminating thread", "Could not open encoder before EOF", "Nothing was written",
    "Error sending frames to consumers", "Error while filtering", "Error muxing",
)  # fmt: skip


def ffmpeg_error_summary(log: str, max_lines: int = 3) -> str:
    """The last `max_lines` meaningful lines of an ffmpeg log: banner, stream listings, progress and the follow-up
    lines of its shutdown dropped, so what remains says why it failed."""
    lines = [line.strip() for line in log.replace("\r", "\n").splitlines()]
    meaningful = [
        line
        for line in lines
        if line
        and not line.startswith(_NOISE_PREFIXES)
        and not any(consequence in line for consequence in _CONSEQUENCES)
    ]
    return " | ".join(meaningful[-max_lines:]) or "ffmpeg exited without a message"


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


@contextlib.contextmanager
def _signals_held_back():
    """Hold SIGINT and SIGTERM until the block ends, then deliver them (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(received):
            signal.raise_signal(sig)


class _FfmpegWriter:
    """An H.264 mp4 fed raw RGB frames through ffmpeg's stdin; its log goes to a temporary file (read on failure)."""

    def __init__(self, path: str, width: int, height: int, fps: int, quality: float):
        import imageio_ffmpeg

        self.path = path
        self._log = tempfile.TemporaryFile()
        crf = int((1 - quality / 10.0) * 51)  # imageio's mapping of quality 0-10 for libx264
        command = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-hide_banner", "-loglevel", "error",
            "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{width}x{height}", "-pix_fmt", "rgb24", "-r", str(fps),
            "-i", "-", "-an", "-vcodec", "libx264", "-pix_fmt", "yuv420p", "-crf", str(crf), path,
        ]  # fmt: skip
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            start_new_session=os.name == "posix",
        )

    def _failure(self, what: str) -> RuntimeError:
        self._log.seek(0)
        log = self._log.read().decode("utf-8", errors="replace")
        return RuntimeError(f"ffmpeg could not write {self.path} ({what}): {ffmpeg_error_summary(log)}")

    def write(self, frames: np.ndarray) -> None:
        try:
            self._process.stdin.write(np.ascontiguousarray(frames).tobytes())
        except (BrokenPipeError, OSError):
            self._process.wait()
            raise self._failure(f"exit code {self._process.returncode}") from None

    def close(self) -> None:
        """Tell ffmpeg the video ended and wait for it to finish the file."""
        try:
            self._process.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        code = self._process.wait()
        try:
            if code != 0:
                raise self._failure(f"exit code {code}")
        finally:
            self._log.close()


def write_video_stream(
    chunks: Iterable[Union[MagiChunkOutput, np.ndarray, torch.Tensor, list]],
    output_path: str,
    fps: int = 24,
    video_index: int = 0,
    quality: float = 8.0,
    on_chunk_written: Optional[Callable[[int], None]] = None,
) -> str:
    """Append each chunk's frames to an H.264 mp4 as soon as the chunk arrives (only one chunk is in memory).

    If the stream stops early (an exception, Ctrl-C, or SIGTERM where a handler turns it into an exception), the
    file is finished and holds every whole chunk written so far; the exception then propagates.

    Args:
        chunks: what `pipe.stream(...)` yields (or the `frames` of each chunk), decoded (`output_type` `"np"`,
            `"pt"` or `"pil"`).
        output_path (`str`): the mp4 file to write.
        fps (`int`, defaults to 24): frame rate.
        video_index (`int`, defaults to 0): which video of a batch to write.
        quality (`float`, defaults to 8.0): imageio/ffmpeg quality (0-10).
        on_chunk_written (`Callable[[int], None]`, *optional*): called with the number of whole chunks in the file
            after each chunk.

    Returns:
        `output_path`.

    Raises:
        ValueError: the stream yielded no chunk (nothing is written).
        RuntimeError: ffmpeg failed; the message quotes its log.

    Example:
        ```py
        write_video_stream(pipe.stream(prompt="a fox runs through snow", num_frames=480), "fox.mp4")
        ```
    """
    writer = None
    written = 0
    try:
        for chunk in chunks:
            frames = _uint8_frames(chunk.frames if isinstance(chunk, MagiChunkOutput) else chunk, video_index)
            if frames.ndim != 4 or frames.shape[-1] != 3:
                raise ValueError(f"write_video_stream needs RGB frames (frames, H, W, 3), got shape {frames.shape}.")
            with _signals_held_back():
                if writer is None:
                    writer = _FfmpegWriter(output_path, frames.shape[2], frames.shape[1], fps, quality)
                writer.write(frames)
            written += 1
            if on_chunk_written is not None:
                on_chunk_written(written)
    finally:
        if writer is not None:
            with _signals_held_back():
                writer.close()
    if writer is None:
        raise ValueError("write_video_stream received no chunk to write.")
    return output_path
