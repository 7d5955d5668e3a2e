"""Every example script runs end to end with the tiny random pipeline (and the notebook executes)."""

import subprocess
import sys

import imageio.v2 as imageio
import pytest

from .conftest import REPO_ROOT

EXAMPLES = REPO_ROOT / "examples"
TINY = ["--model", "tiny-random", "--height", "32", "--width", "32"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, extra, frames",
    [
        ("text_to_video.py", ["--num-frames", "48"], 48),
        ("image_to_video.py", ["--num-frames", "24"], 48),
        ("video_to_video.py", ["--num-frames", "24", "--num-prefix-frames", "8"], 13 + 24),
        ("long_video_streaming.py", ["--num-chunks", "3"], 72),
        ("chunk_prompts.py", [], 144),
    ],
)
def test_example_script(tmp_path, script, extra, frames):
    output = tmp_path / "out.mp4"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *TINY, *extra, "--output", str(output)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(imageio.mimread(str(output), memtest=False)) == frames


@pytest.mark.slow
def test_train_lora_example(tmp_path):
    """Trains a LoRA for a few steps on a generated two-clip folder, then generates with it."""
    from .training_clips import write_moving_squares

    data = write_moving_squares(tmp_path / "clips", num_frames=24, size=32)
    output = tmp_path / "out.mp4"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_lora.py"), *TINY, "--data", str(data), "--lora-dir", str(tmp_path / "lora"),
         "--max-steps", "3", "--output", str(output)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert len(imageio.mimread(str(output), memtest=False)) == 24


@pytest.mark.slow
def test_colab_notebook_runs_offline(tmp_path):
    """The notebook executes top to bottom; off Colab it uses the tiny random pipeline."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(str(EXAMPLES / "magi_colab.ipynb"), as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert (tmp_path / "fox.mp4").is_file() and (tmp_path / "forest.mp4").is_file()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    videos = [output for output in outputs if "<video" in output.get("data", {}).get("text/html", "")]
    assert len(videos) == 2  # both videos are shown inline
