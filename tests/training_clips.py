"""A tiny captioned-video training set made in the test: squares moving across a grey background."""

from pathlib import Path

import imageio.v2 as imageio
import numpy as np

CLIPS = (((230, 40, 40), "a red square moves right"), ((40, 40, 230), "a blue square moves down"))


def write_moving_squares(folder: Path, num_frames: int = 48, size: int = 64, captions: bool = True) -> Path:
    """Two clips (`clip0.mp4`, `clip1.mp4`, 24 fps) of a square moving right / down, with `.txt` captions."""
    folder.mkdir(parents=True, exist_ok=True)
    side = size // 4
    for index, (color, caption) in enumerate(CLIPS):
        frames = []
        for t in range(num_frames):
            frame = np.full((size, size, 3), 90, np.uint8)
            offset = int(t * (size - side) / max(num_frames - 1, 1))
            top, left = (size // 3, offset) if index == 0 else (offset, size // 3)
            frame[top : top + side, left : left + side] = color
            frames.append(frame)
        imageio.mimwrite(folder / f"clip{index}.mp4", frames, fps=24, macro_block_size=1)
        if captions:
            (folder / f"clip{index}.txt").write_text(caption)
    return folder
