"""`magi-generate` checks every argument that needs no model before loading one, and reports every error as one line
without a traceback; an interrupted stream (exception, Ctrl-C, SIGTERM) leaves an mp4 that ends at the last whole
chunk and the CLI says how many it holds; ffmpeg failures quote ffmpeg's own message."""

import errno
import os
import signal
from unittest import mock

import imageio
import numpy as np
import pytest

from diffusers_magi import cli
from diffusers_magi.pipelines import video_export_magi
from diffusers_magi.pipelines.video_export_magi import ffmpeg_error_summary, write_video_stream

FRAMES = 8  # frames per synthetic chunk


def chunk(value: float, size: int = 32):
    return np.full((1, FRAMES, size, size, 3), value, dtype=np.float32)


def frame_count(path) -> int:
    with imageio.get_reader(str(path)) as reader:
        return sum(1 for _ in reader)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--height", "0"], "--height 0: height and width must be positive multiples of 16"),
        (["--width", "40"], "--width 40"),
        (["--num-frames", "0"], "--num-frames must be at least 1"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--fps", "0"], "--fps must be at least 1"),
        (["--cfg-t-range", "0", "nan"], "`--cfg-t-range[1]` must be finite"),
        (["--text-scales", "inf"], "`--text-scales` must be finite"),
        (["--device", "cuda:5"], "--device cuda:5 names a device this machine does not have"),
        (["--kv-cache-device", "potato"], "--kv-cache-device potato is not a device"),
        (["--model", "./no/such/folder"], "does not exist"),
    ],
)
def test_bad_arguments_fail_before_loading(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    with mock.patch.object(cli, "load_pipeline", side_effect=AssertionError("loaded")) as load:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["--model", "tiny-random", "--prompt", "x", *flags])
    assert exit_info.value.code == 2 and not load.called
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error, error


def test_output_folder_and_non_pipeline_folder(tmp_path, capsys):
    (tmp_path / "video.mp4").mkdir()
    with pytest.raises(SystemExit):
        cli.main(["--model", "tiny-random", "--prompt", "x", "--output", str(tmp_path / "video.mp4")])
    assert "is a folder" in capsys.readouterr().err
    (tmp_path / "random").mkdir()
    with pytest.raises(SystemExit):
        cli.main(["--model", str(tmp_path / "random"), "--prompt", "x", "--output", str(tmp_path / "o.mp4")])
    assert "without model_index.json" in capsys.readouterr().err


def test_a_broken_model_folder_is_one_line(tmp_path, capsys):
    folder = tmp_path / "converted"
    folder.mkdir()
    (folder / "model_index.json").write_text("{not json")
    code = cli.main(["--model", str(folder), "--prompt", "x", "--output", str(tmp_path / "o.mp4")])
    error = capsys.readouterr().err
    assert code == 1 and error.startswith("magi-generate: error: could not load --model") and error.count("\n") == 1


class FakePipeline:
    """Stands in for a loaded pipeline: `stream` yields synthetic chunks, then does `then` (raise / signal)."""

    def __init__(self, num_chunks: int, then):
        self.num_chunks, self.then = num_chunks, then

    def stream(self, **kwargs):
        def chunks():
            for index in range(self.num_chunks):
                yield chunk(index / 4)
            self.then()

        return chunks()


def _interrupt():
    raise KeyboardInterrupt


def _sigterm():
    os.kill(os.getpid(), signal.SIGTERM)


def _failure():
    raise RuntimeError("CUDA out of memory")


@pytest.mark.parametrize(
    "num_chunks, then, code, message",
    [
        (2, _interrupt, 130, "interrupted; {out} holds the first 2 whole chunk(s)"),
        (1, _sigterm, 130, "interrupted; {out} holds the first 1 whole chunk(s)"),
        (3, _failure, 1, "CUDA out of memory; {out} holds the first 3 whole chunk(s)"),
        (0, _interrupt, 130, "interrupted before the first chunk; no video was written"),
    ],
)
def test_interrupted_stream_keeps_the_whole_chunks(tmp_path, capsys, num_chunks, then, code, message):
    out = tmp_path / "video.mp4"
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    with mock.patch.object(cli, "load_pipeline", return_value=FakePipeline(num_chunks, then)):
        assert cli.main(["--model", "tiny-random", "--prompt", "x", "--output", str(out)]) == code
    error = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert error == f"magi-generate: error: {message.format(out=out)}"
    if num_chunks:
        assert frame_count(out) == num_chunks * FRAMES
    else:
        assert not out.exists()
    assert signal.getsignal(signal.SIGTERM) is sigterm_handler  # restored


def test_ctrl_c_while_a_chunk_is_written_is_held_until_it_is_whole(tmp_path):
    original = video_export_magi._FfmpegWriter.write

    def write_then_interrupt(self, frames):
        signal.raise_signal(signal.SIGINT)  # arrives in the middle of writing the chunk
        original(self, frames)

    out = tmp_path / "video.mp4"
    with mock.patch.object(video_export_magi._FfmpegWriter, "write", write_then_interrupt):
        with pytest.raises(KeyboardInterrupt):
            write_video_stream([chunk(0.1), chunk(0.9)], str(out))
    assert frame_count(out) == FRAMES  # the first chunk, whole


def test_ffmpeg_failure_quotes_ffmpeg_not_its_banner(tmp_path):
    with pytest.raises(RuntimeError) as error:
        write_video_stream([chunk(0.5, size=33)], str(tmp_path / "odd.mp4"))
    message = str(error.value)
    assert message.startswith(f"ffmpeg could not write {tmp_path / 'odd.mp4'}") and "divisible by 2" in message
    assert "ffmpeg version" not in message and "configuration:" not in message


def test_ffmpeg_error_summary_drops_the_banner():
    log = (
        "ffmpeg version 7.0 Copyright (c) 2000-2024\n  built with gcc 13\n  configuration: --enable-gpl\n"
        "  libavutil      59.  8.100\nInput #0, rawvideo, from 'fd:':\n  Stream #0:0: Video: rawvideo\n"
        "[libx264 @ 0x1] width not divisible by 2 (33x33)\nError while opening encoder\nConversion failed!\n"
    )
    assert (
        ffmpeg_error_summary(log) == "[libx264 @ 0x1] width not divisible by 2 (33x33) | Error while opening encoder"
    )


def test_empty_stream_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="no chunk"):
        write_video_stream([], str(tmp_path / "empty.mp4"))
    assert not (tmp_path / "empty.mp4").exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
@pytest.mark.parametrize("step", ["opening", "second_chunk"])
def test_disk_errors_while_writing_are_one_line(tmp_path, capsys, code, step):
    """A file-system error where the mp4 is written (opening it, or writing a later chunk) ends as one line
    `magi-generate: error: <reason>: <file>`, exit 1, no traceback; a file already begun keeps its whole chunks."""
    out = tmp_path / "video.mp4"
    failure = OSError(code, os.strerror(code), str(out))
    if step == "opening":
        patch = mock.patch.object(video_export_magi._FfmpegWriter, "__init__", side_effect=failure)
        message = f"{os.strerror(code)}: {out} before the first chunk; no video was written"
    else:
        original, calls = video_export_magi._FfmpegWriter.write, []

        def write_then_fail(self, frames):
            calls.append(frames)
            if len(calls) > 1:
                raise failure
            original(self, frames)

        patch = mock.patch.object(video_export_magi._FfmpegWriter, "write", write_then_fail)
        message = f"{os.strerror(code)}: {out}; {out} holds the first 1 whole chunk(s)"
    with patch, mock.patch.object(cli, "load_pipeline", return_value=FakePipeline(3, lambda: None)):
        assert cli.main(["--model", "tiny-random", "--prompt", "x", "--output", str(out)]) == 1
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert error.splitlines()[-1] == f"magi-generate: error: {message}"
    assert error.count("magi-generate:") == 1
    if step == "opening":
        assert not out.exists()
    else:
        assert frame_count(out) == FRAMES


OFFLINE = "magi-generate: error: could not download {model} and it is not in the local cache ({reason}). Connect"


def test_a_model_neither_online_nor_cached_is_one_line(tmp_path, capsys):
    """Offline (or the Hub unreachable) with nothing cached: one line saying so and what to pass instead, for a
    Diffusers repository (Diffusers wraps the cache miss in an OSError caused by the connection error) and for the
    original layout (huggingface_hub's LocalEntryNotFoundError as is)."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    out = str(tmp_path / "o.mp4")
    model = "diffusers-magi-tests/never-cached"
    offline = OfflineModeIsEnabled(f"Cannot reach https://huggingface.co/api/models/{model}: offline mode is enabled.")
    with mock.patch("diffusers.pipelines.pipeline_utils.model_info", side_effect=offline):
        code = cli.main(["--model", model, "--prompt", "x", "--output", out, "--device", "cpu"])
    error = capsys.readouterr().err
    assert code == 1 and "Traceback" not in error and error.count("magi-generate:") == 1, error
    line = error.splitlines()[-1]
    assert line.startswith(OFFLINE.format(model=model, reason=offline)), line
    assert line.endswith("or --model tiny-random for a smoke test.")

    cache_miss = LocalEntryNotFoundError("An error happened while trying\nto locate the files.\nNothing is cached.")
    special_tokens = tmp_path / "special_tokens.npz"
    special_tokens.write_bytes(b"")
    with mock.patch("huggingface_hub.snapshot_download", side_effect=cache_miss):
        code = cli.main(
            ["--prompt", "x", "--output", out, "--device", "cpu", "--special-tokens-file", str(special_tokens)]
        )
    error = capsys.readouterr().err
    assert code == 1 and "Traceback" not in error and error.count("\n") == 1, error
    assert error.startswith(OFFLINE.format(model="sand-ai/MAGI-1", reason="Nothing is cached."))
