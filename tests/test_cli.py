"""`magi-generate`: end to end with the tiny random pipeline, and clear errors for bad flags."""

import imageio.v2 as imageio
import numpy as np
import PIL.Image
import pytest

from diffusers_magi.cli import main

SMALL = ["--model", "tiny-random", "--height", "32", "--width", "32"]


def _frames(path):
    return imageio.mimread(path)


def test_text_to_video_writes_the_mp4(tmp_path, capsys):
    output = tmp_path / "t2v.mp4"
    assert main([*SMALL, "--prompt", "a fox runs", "--num-frames", "48", "--output", str(output)]) == 0
    frames = _frames(output)
    assert len(frames) == 48 and frames[0].shape == (32, 32, 3)
    assert "wrote" in capsys.readouterr().out


def test_chunk_prompts_from_file_and_flags(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat runs\n\na dog jumps\n")
    from_file, from_flags = tmp_path / "file.mp4", tmp_path / "flags.mp4"
    main([*SMALL, "--chunk-prompts", str(prompts), "--num-frames", "48", "--output", str(from_file)])
    main([*SMALL, "--chunk-prompt", "a cat runs", "--chunk-prompt", "a dog jumps", "--num-frames", "48", "--output", str(from_flags)])
    assert np.array_equal(np.stack(_frames(from_file)), np.stack(_frames(from_flags)))


def test_image_and_video_to_video(tmp_path):
    image = tmp_path / "first.png"
    PIL.Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(image)
    i2v = tmp_path / "i2v.mp4"
    main([*SMALL, "--prompt", "a cat", "--image", str(image), "--num-frames", "24", "--output", str(i2v)])
    assert len(_frames(i2v)) == 48  # two chunks: the image's chunk and one more

    v2v = tmp_path / "v2v.mp4"
    main([*SMALL, "--prompt", "a cat", "--video", str(i2v), "--num-prefix-frames", "8", "--num-frames", "24", "--output", str(v2v)])
    # Chunk 0 keeps its 4 latent frames after the 2 of the prefix; the original's per-chunk decode (temporal tiles of
    # 3 latent frames, a last tile of 1 latent frame decodes to 1 frame) makes them 12 + 1 frames; then 24.
    assert len(_frames(v2v)) == 13 + 24


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prompt", "x", "--image", "missing.png"], "--image 'missing.png' is not a readable file"),
        (["--prompt", "x", "--video", "missing.mp4"], "--video 'missing.mp4' is not a readable file"),
        (["--prompt", "x", "--output", "/nonexistent-folder/out.mp4"], "does not exist or is not writable"),
        (["--prompt", "x", "--output", "out.gif"], "must be an .mp4 file"),
        (["--num-frames", "24"], "pass --prompt"),
        (["--prompt", "x", "--chunk-prompt", "y"], "cannot be combined"),
        (["--prompt", "x", "--offload", "model", "--device", "cpu"], "with --device cpu use --offload none"),
        (["--prompt", "x", "--height", "30"], "multiples of 16"),
        (["--prompt", "x", "--steps", "6"], "multiple of window_size"),
        (["--prompt", "x", "--offload", "everything"], "invalid choice"),
        (["--prompt", "x", "--variant", "9B_turbo"], "invalid choice"),
    ],
)
def test_bad_flags_exit_with_a_clear_message(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "tiny-random", "--height", "32", "--width", "32", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unreadable_video_file_is_reported(tmp_path, capsys):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    with pytest.raises(SystemExit):
        main([*SMALL, "--prompt", "x", "--video", str(broken), "--output", str(tmp_path / "o.mp4")])
    assert "ffmpeg could not read" in capsys.readouterr().err


def test_original_layout_needs_the_special_tokens_file(tmp_path, capsys):
    """The default model is the original Hub repository; without special_tokens.npz the error says where to get it."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--prompt", "x", "--output", str(tmp_path / "o.mp4")])
    assert exit_info.value.code == 2
    assert "--special-tokens-file special_tokens.npz" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--prompt", "x", "--variant", "24B_distill", "--special-tokens-file", "nope.npz", "--output", str(tmp_path / "o.mp4")])
    assert "--special-tokens-file 'nope.npz' is not a readable file" in capsys.readouterr().err
