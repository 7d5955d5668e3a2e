"""Training data for MAGI-1 LoRAs: a folder of captioned videos, encoded once into a cache of latents and T5 captions.

Data folder (`--data DIR`), either layout:

* videos with a caption file of the same name beside each: `clip_001.mp4` + `clip_001.txt` (`.mp4`, `.mov`,
  `.webm`, `.mkv`, `.avi`, `.gif`; subfolders are searched);
* a `metadata.jsonl` with one JSON object per line, `{"file_name": "clips/a.mp4", "text": "a red fox ..."}`, paths
  relative to the folder (the Hugging Face `datasets` "videofolder" convention).

Each clip is resampled to `fps` (ffmpeg `fps` filter), scaled to cover `width x height` keeping its aspect and
centre-cropped (ffmpeg `scale` + `crop`), and its first `num_frames` frames (whole chunks of 24 frames) are encoded by
the VAE (posterior mode, times `scaling_factor`, as the pipelines encode a prefix). The caption is cleaned and encoded
by T5 as `MagiPipeline.encode_prompt` does. Both are written to `cache_dir` as one safetensors file per clip, named by
a hash of the clip file, its caption and the settings, so a second run (or a resumed one) reads the cache instead of
running the VAE and T5 again.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

VIDEO_EXTENSIONS = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".gif")
FRAMES_PER_CHUNK = 24  # 6 latent frames x the VAE's 4x temporal compression
METADATA_FILE = "metadata.jsonl"


@dataclass(frozen=True)
class MagiClip:
    """One training clip: a video file and its caption."""

    video: Path
    caption: str


def find_clips(data_dir: os.PathLike) -> List[MagiClip]:
    """The clips of a data folder (see the module docstring), sorted by path. A `ValueError` names the folder when it
    holds no clip, the video when its caption is missing, the line when `metadata.jsonl` is malformed."""
    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"--data {str(data_dir)!r} is not a folder.")
    metadata = root / METADATA_FILE
    clips = []
    if metadata.is_file():
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                video, caption = root / entry["file_name"], entry["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(
                    f"{metadata}: line {number} must be a JSON object with 'file_name' and 'text', got {line[:200]!r}."
                ) from None
            if not video.is_file():
                raise ValueError(
                    f"{metadata}: line {number} names {entry['file_name']!r}, which does not exist in {root}."
                )
            clips.append(MagiClip(video, str(caption)))
    else:
        for video in sorted(path for path in root.rglob("*") if path.suffix.lower() in VIDEO_EXTENSIONS):
            caption_file = video.with_suffix(".txt")
            if not caption_file.is_file():
                raise ValueError(
                    f"The video {str(video)!r} has no caption: put its caption in {str(caption_file)!r} (or list every "
                    f"clip with its text in {str(root / METADATA_FILE)!r})."
                )
            clips.append(MagiClip(video, caption_file.read_text(encoding="utf-8").strip()))
    if not clips:
        raise ValueError(
            f"--data {str(data_dir)!r} holds no training clip: expected videos ({', '.join(VIDEO_EXTENSIONS)}) each with "
            f"a same-name .txt caption, or a {METADATA_FILE} with 'file_name' and 'text' per line."
        )
    return sorted(clips, key=lambda clip: str(clip.video))


def check_num_frames(num_frames: int) -> None:
    if num_frames < FRAMES_PER_CHUNK or num_frames % FRAMES_PER_CHUNK:
        raise ValueError(
            f"--num-frames must be a positive multiple of {FRAMES_PER_CHUNK} (MAGI-1 works in chunks of "
            f"{FRAMES_PER_CHUNK} frames), got {num_frames}."
        )


def check_clip_lengths(clips: Sequence[MagiClip], num_frames: int, fps: int) -> None:
    """A `ValueError` naming the first clip shorter than `num_frames` frames at `fps` (or than one chunk)."""
    import imageio_ffmpeg

    for clip in clips:
        _, seconds = imageio_ffmpeg.count_frames_and_secs(str(clip.video))
        frames = int(round(seconds * fps))
        if frames < num_frames:
            raise ValueError(
                f"The clip {str(clip.video)!r} has about {frames} frames at {fps} fps ({seconds:.2f} s), fewer than "
                f"--num-frames {num_frames}"
                + (f" (one chunk is {FRAMES_PER_CHUNK} frames)" if frames < FRAMES_PER_CHUNK else "")
                + "; remove it or lower --num-frames."
            )


def load_clip_frames(video: os.PathLike, num_frames: int, height: int, width: int, fps: int) -> torch.Tensor:
    """The first `num_frames` frames of `video` at `fps`, scaled to cover `width x height` and centre-cropped:
    uint8 `(num_frames, height, width, 3)`."""
    from ..pipelines.video_processing_magi import _run_ffmpeg

    crop = f"fps=fps={fps},scale={width}:{height}:force_original_aspect_ratio=increase,crop={width}:{height}"
    frames = _run_ffmpeg(
        ["-i", os.fspath(video), "-vf", crop, "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:"], None, height, width
    )
    if frames.shape[0] < num_frames:
        raise ValueError(
            f"The clip {str(video)!r} has {frames.shape[0]} frames at {fps} fps, fewer than --num-frames {num_frames}; "
            "remove it or lower --num-frames."
        )
    return frames[:num_frames]


def _cache_key(clip: MagiClip, settings: Dict) -> str:
    stat = clip.video.stat()
    record = dict(
        settings, video=str(clip.video.resolve()), size=stat.st_size, mtime=stat.st_mtime_ns, caption=clip.caption
    )
    return hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def clip_cache_files(
    clips: Sequence[MagiClip],
    cache_dir: os.PathLike,
    height: int,
    width: int,
    num_frames: int,
    fps: int,
    model_id: str,
) -> List[Path]:
    """The cache file of each clip (in clip order), whether it exists yet or not: named by a hash of the clip file
    (path, size, modification time), its caption, the settings and `model_id`."""
    settings = dict(height=height, width=width, num_frames=num_frames, fps=fps, model=model_id)
    return [Path(cache_dir) / f"clip-{_cache_key(clip, settings)}.safetensors" for clip in clips]


def prompt_cache_file(text: str, cache_dir: os.PathLike, model_id: str) -> Path:
    """The cache file of the T5 encoding of `text` (a validation prompt) for `model_id`."""
    key = hashlib.sha1(json.dumps(dict(model=model_id, text=text)).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"prompt-{key}.safetensors"


@torch.no_grad()
def encode_prompt_cached(
    pipe, text: str, cache_dir: Path, model_id: str, device: Optional[torch.device] = None
) -> Dict[str, torch.Tensor]:
    """`pipe.encode_prompt(text)` through the cache: `{"prompt_embeds": (L, C), "prompt_attention_mask": (L,)}`. The
    text encoder goes to `device` only when the cache lacks the prompt, and back to the CPU after."""
    path = prompt_cache_file(text, cache_dir, model_id)
    if not path.is_file():
        pipe.text_encoder.to(device)
        embeds, mask = pipe.encode_prompt(text, device=device)
        pipe.text_encoder.to("cpu")
        save_file(
            {
                "prompt_embeds": embeds[0].float().cpu().contiguous(),
                "prompt_attention_mask": mask[0].cpu().contiguous(),
            },
            path,
        )
    return load_file(path)


@torch.no_grad()
def encode_clips(
    pipe,
    clips: Sequence[MagiClip],
    cache_dir: os.PathLike,
    height: int,
    width: int,
    num_frames: int,
    fps: int,
    model_id: str,
    device: Optional[torch.device] = None,
    progress: bool = True,
) -> List[Path]:
    """Encode every clip not yet in `cache_dir` (latents `(channels, frames, height / 8, width / 8)` float32, the
    valid caption tokens `(tokens, text_dim)` float32) and return the cache files, one per clip, in clip order.

    Two passes, so that one model at a time is on `device`: the VAE encodes the clips the cache lacks, then the text
    encoder their captions; each goes back to the CPU after its pass (neither is touched when the cache is complete,
    so a pipeline without them reads a complete cache)."""
    from tqdm.auto import tqdm

    from ..pipelines.video_processing_magi import frames_to_video

    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    files = clip_cache_files(clips, cache_dir, height, width, num_frames, fps, model_id)
    missing = [(clip, path) for clip, path in zip(clips, files) if not path.is_file()]
    if not missing:
        return files
    vae = pipe.vae.to(device)
    latents = {}
    for clip, path in tqdm(missing, desc="Encoding clips (VAE)", disable=not progress):
        frames = load_clip_frames(clip.video, num_frames, height, width, fps)
        video = frames_to_video(frames).to(device, vae.dtype)
        latents[path] = (
            (vae.encode(video).latent_dist.mode() * vae.config.scaling_factor)[0].float().cpu().contiguous()
        )
    vae.to("cpu")
    pipe.text_encoder.to(device)
    for clip, path in tqdm(missing, desc="Encoding captions (T5)", disable=not progress):
        embeds, mask = pipe.encode_prompt(clip.caption, device=device)
        tokens = embeds[0][mask[0].bool()].float().cpu().contiguous()
        save_file(
            {"latents": latents[path], "prompt_embeds": tokens},
            path,
            metadata={"video": str(clip.video), "caption": clip.caption},
        )
    pipe.text_encoder.to("cpu")
    return files


class MagiCachedClips(torch.utils.data.Dataset):
    """The cached clips: items `{"latents": (C, F, h, w), "prompt_embeds": (L, C), "prompt_attention_mask": (L,)}`,
    captions padded with zeros to `text_length` tokens."""

    def __init__(self, files: Sequence[Path], text_length: int):
        self.files = list(files)
        self.text_length = text_length

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        item = load_file(self.files[index])
        tokens = item["prompt_embeds"][: self.text_length]
        embeds = torch.zeros(self.text_length, tokens.shape[-1])
        embeds[: tokens.shape[0]] = tokens
        mask = torch.zeros(self.text_length, dtype=torch.int64)
        mask[: tokens.shape[0]] = 1
        return {"latents": item["latents"], "prompt_embeds": embeds, "prompt_attention_mask": mask}
