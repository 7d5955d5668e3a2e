"""Pixel-side helpers of the pipelines: uint8 quantisation (truncation, in the video's dtype), the [-1, 1] mapping,
the V2V clip-length rule on short clips, output types and input errors. ffmpeg parity itself is in
test_vae_parity.py (the preprocess cases)."""

import imageio.v2 as imageio
import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_magi.pipelines.video_processing_magi import (
    frames_to_video,
    load_image_frames,
    load_video_frames,
    postprocess_video,
    video_to_uint8,
)


def test_video_to_uint8_truncates_clamps_and_orders_frames():
    values = torch.tensor([-1.5, -1.0, -0.2, 0.0, 0.57, 0.999, 1.0, 1.2])
    video = values.reshape(1, 1, 1, 1, 8).expand(2, 3, 4, 1, 8).clone()
    video[1, :, 2] = 0.0
    frames = video_to_uint8(video)
    assert frames.shape == (2, 4, 3, 1, 8) and frames.dtype == torch.uint8
    # numpy in float32 (the video's dtype), floor after the clamp = truncation
    scale = np.float32(127.5)
    expected = np.floor(np.clip(values.numpy() * scale + scale, 0, 255)).astype(np.uint8)
    assert frames[0, 0, 0, 0].tolist() == expected.tolist()  # floor of 0.999 * 127.5 + 127.5 = 254.87 is 254
    assert frames[1, 2].eq(127).all() and frames[1, 1, 0, 0].tolist() == expected.tolist()


def test_video_to_uint8_computes_in_bfloat16_for_a_bfloat16_decode():
    video = torch.linspace(-1, 1, 4001).reshape(1, 1, 1, 1, -1).to(torch.bfloat16)
    # Each step rounded to bfloat16, as the original's arithmetic on a bf16 decoder output.
    stepwise = ((video.float() * 127.5).bfloat16().float() + 127.5).bfloat16().float().clamp(0, 255).floor()
    assert torch.equal(video_to_uint8(video).flatten().long(), stepwise.flatten().long())
    float32 = video_to_uint8(video.float())
    assert not torch.equal(video_to_uint8(video), float32)


def test_frames_to_video_maps_uint8_to_minus_one_one():
    frames = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16, 1).expand(2, -1, -1, 3)
    video = frames_to_video(frames)
    assert video.shape == (1, 3, 2, 16, 16) and video.dtype == torch.float32
    assert video.min() == -1 and video.max() == 1
    assert torch.equal(video[0, 1, 1], frames[1, ..., 1] / 127.5 - 1)
    assert frames_to_video(frames, torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        frames_to_video(frames.float())


def test_postprocess_output_types():
    video = torch.rand(1, 3, 2, 8, 16) * 2 - 1
    frames = postprocess_video(video, "pt")
    assert frames.shape == (1, 2, 3, 8, 16) and frames.dtype == torch.float32
    assert torch.equal(frames * 255, video_to_uint8(video).float())
    array = postprocess_video(video, "np")
    assert array.shape == (1, 2, 8, 16, 3) and array.dtype == np.float32
    assert np.array_equal(array, frames.permute(0, 1, 3, 4, 2).numpy())
    images = postprocess_video(video, "pil")
    assert len(images) == 1 and len(images[0]) == 2 and images[0][0].size == (16, 8)
    with pytest.raises(ValueError, match="output_type"):
        postprocess_video(video, "latent")


def _write_clip(path, num_frames):
    frames = [np.full((32, 32, 3), 8 * i, dtype=np.uint8) for i in range(num_frames)]
    imageio.mimwrite(path, frames, fps=24, macro_block_size=16)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """24 fps clips of 30 frames (1.25 s) and of 10 frames (under a second)."""
    folder = tmp_path_factory.mktemp("clips")
    return _write_clip(folder / "long.mp4", 30), _write_clip(folder / "short.mp4", 10)


def test_v2v_keeps_first_frames_or_last_whole_seconds(clips):
    long_clip, short_clip = clips
    everything = load_video_frames(long_clip, 24, 16, 16, num_frames=100)
    assert everything.shape == (30, 16, 16, 3) and everything.dtype == torch.uint8
    assert torch.equal(load_video_frames(long_clip, 24, 16, 16, num_frames=5), everything[:5])
    assert torch.equal(load_video_frames(long_clip, 24, 16, 16), everything[-24:])  # the last whole second
    assert load_video_frames(long_clip, 12, 16, 16, max_seconds=1).shape[0] == 12  # resampled, capped at 1 s
    # Fewer than fps frames: only the last frame is kept.
    short = load_video_frames(short_clip, 24, 16, 16, num_frames=100)
    assert short.shape[0] == 10
    assert torch.equal(load_video_frames(short_clip, 24, 16, 16), short[-1:])


def test_image_inputs_and_errors(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    from_array = load_image_frames(image, 30, 20)
    assert from_array.shape == (1, 20, 30, 3)
    assert torch.equal(from_array[0], torch.from_numpy(image))  # same size: ffmpeg copies the RGB pixels
    path = tmp_path / "image.png"
    PIL.Image.fromarray(image).save(path)
    assert torch.equal(load_image_frames(path, 30, 20), from_array)
    assert torch.equal(load_image_frames(PIL.Image.fromarray(image), 30, 20), from_array)
    assert load_image_frames(path, 16, 16, resize_mode="pad")[0, 0, 0].tolist() == [0, 0, 0]  # top padding row
    with pytest.raises(ValueError, match="resize_mode"):
        load_image_frames(path, 16, 16, resize_mode="stretch")
    with pytest.raises(TypeError, match="`image`"):
        load_image_frames(1234, 16, 16)
    with pytest.raises(ValueError, match="ffmpeg could not read"):
        load_image_frames(b"not an image", 16, 16)
    with pytest.raises(ValueError, match="does not exist"):
        load_video_frames(tmp_path / "missing.mp4", 24, 16, 16)
