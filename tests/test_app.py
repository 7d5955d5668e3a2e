"""The web app (`diffusers_magi.app`, `magi-app`) served for real on a free local port with the tiny random pipeline,
driven once through `gradio_client` (the API a program sees) and once in a headless Chromium (what a person sees).

The client test checks what the app promises: the video arrives chunk by chunk, a prompt typed mid-run drives the
chunks from the index the app reports, Stop stops it, and the download is a playable mp4 holding exactly the frames
received, which equal a direct session with the same seed and that prompt switch (`chunk_prompts`); Continue after
Stop goes on with the same video.
"""

import os
import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusers_magi.app import TabSession, build_app, valid_step_counts
from diffusers_magi.pipelines import write_video_stream
from diffusers_magi.tiny_random import tiny_random_pipeline

CHROMIUM = "/usr/bin/chromium"
SIZE = 64
STEPS = 4
SEED = 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_random_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def app_files(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("app-files")


@pytest.fixture(scope="module")
def app_url(pipe, app_files):
    demo = build_app(pipe, default_size=SIZE, output_dir=str(app_files))
    port = _free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def _read_video(path) -> np.ndarray:
    """Every frame of an mp4, uint8 `(frames, H, W, 3)` (imageio's ffmpeg reader)."""
    import imageio

    reader = imageio.get_reader(path, format="FFMPEG")
    try:
        return np.stack([frame for frame in reader])  # (list(reader) asks its length: inf)
    finally:
        reader.close()


def _chunks_made(status: str) -> int:
    match = re.search(r"(\d+) chunk\(s\) made", status)
    assert match, status
    return int(match.group(1))


def test_valid_step_counts_are_what_the_scheduler_accepts(pipe):
    counts = valid_step_counts(pipe)
    assert pipe.config.default_num_inference_steps in counts
    for steps in range(1, counts[-1] + 1):
        try:
            pipe.scheduler._check_step_count(steps)
            accepted = True
        except ValueError:
            accepted = False
        assert accepted == (steps in counts), steps


def test_app_through_gradio_client(app_url, pipe, tmp_path):
    from gradio_client import Client

    client = Client(app_url, verbose=False, download_files=str(tmp_path / "client"))
    old, new = "a red fox runs through the snow", "a blue bird flies over the ocean"
    job = client.submit(old, None, None, SIZE, SIZE, STEPS, SEED, api_name="/generate")
    videos, switch_at, stopped = {}, None, False
    deadline = time.monotonic() + 240
    for live, download, timeline, status in job:
        assert time.monotonic() < deadline, "the app took too long"
        made = _chunks_made(status)
        if download["value"] is not None:
            videos[made] = download["value"]  # the mp4 so far, after `made` chunks
        if switch_at is None and len(videos) >= 2:  # two chunks received: switch the prompt mid-run
            timeline, message = client.predict(new, api_name="/switch_prompt")
            switch_at = int(re.search(r"New prompt from chunk (\d+)", message).group(1))
            assert switch_at >= made  # applied from a chunk that has not started
            assert f"from chunk {switch_at}: {new}" in timeline and "from chunk 0: " + old in timeline
        if switch_at is not None and not stopped and made > switch_at:  # a chunk of the new prompt is in
            assert "stopped" in client.predict(api_name="/stop")
            stopped = True
    assert stopped and job.status().success
    assert "Stopped" in status
    total = max(videos)
    assert total > switch_at

    # The download: a playable mp4 with every frame received, the earlier downloads being its beginning.
    frames = _read_video(videos[total])
    assert frames.shape == (total * 24, SIZE, SIZE, 3)
    first_two = _read_video(videos[min(videos)])
    np.testing.assert_array_equal(frames[: len(first_two)], first_two)

    # Equal to a direct session with the prompt switch at the reported chunk, written the same way.
    direct = pipe.start_session(
        chunk_prompts={0: old, switch_at: new}, height=SIZE, width=SIZE, num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(SEED),
    )  # fmt: skip
    expected = TabSession()
    expected.start(direct, old, str(tmp_path))
    for chunk in direct.chunks(total):
        expected.add_chunk(chunk.frames)
    np.testing.assert_array_equal(frames, _read_video(expected.video_path))
    # ... and not to the run without the switch (the new prompt shows from its chunk on).
    unswitched = pipe.start_session(
        prompt=old, height=SIZE, width=SIZE, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED)
    )
    unswitched_frames = np.concatenate([chunk.frames[0] for chunk in unswitched.chunks(total)])
    differs = np.abs(np.round(unswitched_frames * 255) - frames.astype(np.float64)).reshape(total, -1).mean(axis=1)
    assert differs[switch_at:].min() > differs[:switch_at].max(), differs


def _direct_video(pipe, tmp_path, num_chunks, **kwargs) -> np.ndarray:
    """A session run directly (not through the app), its chunks written as the app writes them, read back."""
    session = pipe.start_session(
        height=SIZE, width=SIZE, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED), **kwargs
    )
    tmp_path.mkdir(parents=True, exist_ok=True)
    tab = TabSession()
    tab.start(session, "direct", str(tmp_path))
    for chunk in session.chunks(num_chunks):
        tab.add_chunk(chunk.frames)
    return _read_video(tab.video_path)


def test_tabs_run_independent_sessions(app_url, pipe, tmp_path):
    """Two tabs (two clients, two Gradio sessions) generate at the same time with their own prompts; stopping one
    does not stop the other, and each tab's video equals its own direct session."""
    from gradio_client import Client

    prompts = {"a": "a cat walks in the city at night", "b": "waves on the beach at sunset"}
    clients = {tab: Client(app_url, verbose=False, download_files=str(tmp_path / tab)) for tab in prompts}
    jobs = {
        tab: clients[tab].submit(prompts[tab], None, None, SIZE, SIZE, STEPS, SEED, api_name="/generate")
        for tab in prompts
    }

    def wait_for(tab, chunks):
        deadline = time.monotonic() + 180
        while True:
            outputs = jobs[tab].outputs()
            if outputs and _chunks_made(outputs[-1][3]) >= chunks:
                return _chunks_made(outputs[-1][3])
            assert not jobs[tab].done() and time.monotonic() < deadline, f"tab {tab} stopped early"
            time.sleep(0.1)

    wait_for("a", 2)
    wait_for("b", 2)
    clients["a"].predict(api_name="/stop")
    stopped_a = jobs["a"].result()  # tab a ends ...
    made_a = _chunks_made(stopped_a[3])
    made_b = _chunks_made(jobs["b"].outputs()[-1][3])
    wait_for("b", made_b + 2)  # ... while tab b goes on
    assert not jobs["b"].done()
    clients["b"].predict(api_name="/stop")
    stopped_b = jobs["b"].result()
    for tab, final in (("a", stopped_a), ("b", stopped_b)):
        made = _chunks_made(final[3])
        frames = _read_video(final[1]["value"])
        assert frames.shape[0] == 24 * made
        expected = _direct_video(pipe, tmp_path / f"direct-{tab}", made, prompt=prompts[tab])
        np.testing.assert_array_equal(frames, expected)
    assert _chunks_made(stopped_a[3]) == made_a


def test_continue_after_stop_goes_on_with_the_same_video(app_url, pipe, tmp_path):
    """Stop, then Continue: generation goes on in the same tab where it stopped; the final mp4 holds every chunk,
    the one at the stop being its beginning, and equals the uninterrupted direct session."""
    from gradio_client import Client

    prompt = "a sailing boat on a calm lake"
    client = Client(app_url, verbose=False, download_files=str(tmp_path / "client"))

    def run_until(job, chunks):
        deadline = time.monotonic() + 180
        while not (job.outputs() and _chunks_made(job.outputs()[-1][3]) >= chunks):
            assert not job.done() and time.monotonic() < deadline, job.outputs()[-1:] or job.status()
            time.sleep(0.1)
        assert "stopped" in client.predict(api_name="/stop")
        return job.result()

    first = run_until(client.submit(prompt, None, None, SIZE, SIZE, STEPS, SEED, api_name="/generate"), 2)
    made_first = _chunks_made(first[3])
    assert "Stopped" in first[3]
    at_stop = _read_video(first[1]["value"])
    continued = client.submit(api_name="/resume")
    final = run_until(continued, made_first + 2)
    assert continued.status().success and "Continued." in continued.outputs()[0][3]
    made = _chunks_made(final[3])
    assert made >= made_first + 2
    frames = _read_video(final[1]["value"])
    assert frames.shape == (24 * made, SIZE, SIZE, 3)
    np.testing.assert_array_equal(frames[: len(at_stop)], at_stop)
    np.testing.assert_array_equal(frames, _direct_video(pipe, tmp_path / "direct", made, prompt=prompt))


@pytest.mark.parametrize("mode", ["image", "video"])
def test_app_starts_from_an_image_or_a_video(app_url, pipe, tmp_path, mode):
    """An uploaded image gives an image-to-video session, an uploaded video a continuation, equal to the direct
    `MagiImageToVideoPipeline` / `MagiVideoToVideoPipeline` session from the same file."""
    from gradio_client import Client, handle_file
    from PIL import Image

    from diffusers_magi.pipelines import MagiImageToVideoPipeline, MagiVideoToVideoPipeline

    rng = np.random.default_rng(1)
    if mode == "image":
        path = str(tmp_path / "first.png")
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
        inputs, direct_pipe = (handle_file(path), None), MagiImageToVideoPipeline.from_pipe(pipe)
    else:
        prefix = rng.random((1, 32, SIZE, SIZE, 3), dtype=np.float32)
        path = write_video_stream([prefix], str(tmp_path / "prefix.mp4"))
        inputs, direct_pipe = (None, handle_file(path)), MagiVideoToVideoPipeline.from_pipe(pipe)
    client = Client(app_url, verbose=False, download_files=str(tmp_path / "client"))
    job = client.submit("a dog runs on the grass", *inputs, SIZE, SIZE, STEPS, SEED, api_name="/generate")
    deadline = time.monotonic() + 180
    while not (job.outputs() and _chunks_made(job.outputs()[-1][3]) >= 2):
        assert not job.done() and time.monotonic() < deadline, job.outputs()[-1:] if job.outputs() else job.status()
        time.sleep(0.1)
    client.predict(api_name="/stop")
    final = job.result()
    made = _chunks_made(final[3])
    expected = _direct_video(direct_pipe, tmp_path / "direct", made, prompt="a dog runs on the grass", **{mode: path})
    np.testing.assert_array_equal(_read_video(final[1]["value"]), expected)


def test_app_refuses_bad_input_with_a_clear_message(app_url, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError
    from PIL import Image

    client = Client(app_url, verbose=False, download_files=str(tmp_path / "client"))
    image = str(tmp_path / "first.png")
    Image.new("RGB", (SIZE, SIZE)).save(image)
    video = write_video_stream([np.zeros((1, 8, SIZE, SIZE, 3), np.float32)], str(tmp_path / "prefix.mp4"))
    for arguments, message in (
        (("  ", None, None, SIZE, SIZE, STEPS, 0), "Type a prompt first"),
        (("a fox", handle_file(image), handle_file(video), SIZE, SIZE, STEPS, 0), "not both"),
        (("a fox", None, None, SIZE, SIZE, STEPS, 2**63), "seed must be a whole number"),
        (("a fox", None, None, SIZE, SIZE, STEPS, -1), "less than minimum"),
        (("a fox", None, None, 72, SIZE, STEPS, 0), "multiples of 16"),
    ):
        with pytest.raises(AppError, match=message):
            client.predict(*arguments, api_name="/generate")
    with pytest.raises(AppError, match="Press Generate first"):
        client.predict("a bird", api_name="/switch_prompt")
    with pytest.raises(AppError, match="Nothing to continue"):
        client.predict(api_name="/resume")
    assert "Not generating" in client.predict(api_name="/stop")


def test_tab_session_joins_clips_of_any_length(tmp_path, pipe):
    """Chunks of different lengths (a video-to-video chunk overlapping the prefix is shorter) join into one mp4."""
    session = pipe.start_session(prompt="x", height=SIZE, width=SIZE, num_inference_steps=STEPS)
    tab = TabSession()
    tab.start(session, "x", str(tmp_path))
    rng = np.random.default_rng(0)
    videos = []
    for length in (24, 10, 24):
        videos.append(tab.add_chunk(rng.random((1, length, SIZE, SIZE, 3), dtype=np.float32))[1])
    assert _read_video(tab.video_path).shape == (58, SIZE, SIZE, 3)
    # Each mp4 so far has a name of its own (one being downloaded is never replaced); the folder keeps the last two.
    assert len(set(videos)) == 3
    assert sorted(name for name in os.listdir(tab.folder) if name.startswith("magi-video")) == [
        os.path.basename(video) for video in videos[1:]
    ]
    folder = tab.folder
    tab.close()
    assert not os.path.exists(folder) and session.interrupted


def test_space_entry_point_serves_the_app(tmp_path):
    """`python app.py` (the Hugging Face Spaces entry point, through `magi-app`'s `main`) serves the page."""
    import subprocess
    import sys
    import urllib.request

    from .conftest import REPO_ROOT

    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "app.py"), "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    assert response.status == 200 and "MAGI-1" in response.read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline, "the app did not start within 120 s"
                time.sleep(0.5)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_magi_app_rejects_bad_arguments(capsys):
    from diffusers_magi.app import main

    for argv, message in ((["--size", "100"], "multiple of 16"), (["--max-sessions", "0"], "at least 1")):
        with pytest.raises(SystemExit):
            main(["--model", "tiny-random", *argv])
        assert message in capsys.readouterr().err


def test_app_in_headless_chromium(app_url, app_files, tmp_path):
    """A person's view: the first chunk plays in the page, a prompt switch shows on the timeline; closing the tab
    stops its generation."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"needs Debian's chromium at {CHROMIUM}: as root, apt-get update && apt-get install -y chromium")
    before = set(app_files.iterdir())
    screenshot = tmp_path / "app.png"
    drive_browser(app_url, screenshot)
    assert screenshot.stat().st_size > 10_000
    (folder,) = set(app_files.iterdir()) - before  # the browser tab's clips
    deadline, counts = time.monotonic() + 90, []
    while len(counts) < 8 or len(set(counts[-8:])) > 1:  # no new chunk for 4 s: the generation stopped
        assert time.monotonic() < deadline, f"closing the tab did not stop its generation ({counts[-1]} chunks)"
        counts.append(len(list(folder.glob("chunk_*.mp4"))))
        time.sleep(0.5)


def drive_browser(url: str, screenshot: Path, size: int = SIZE) -> None:
    """Open the app in headless Chromium, type a prompt, press Generate, wait until the first chunk plays, switch
    the prompt, wait for a chunk of the new prompt on the timeline, save a screenshot, and close the tab."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(url)
            page.locator("#magi-prompt textarea").fill("a red fox runs through the snow")
            page.locator("#magi-generate").click()
            # The first chunk plays: the page's video element has advanced.
            page.wait_for_function(
                "() => { const v = document.querySelector('#magi-live video'); return v && v.currentTime > 0.2; }",
                timeout=120_000,
            )
            page.locator("#magi-prompt textarea").fill("a blue bird flies over the ocean at sunset")
            page.locator("#magi-switch").click()
            expect(page.locator("#magi-status")).to_contain_text("New prompt from chunk", timeout=60_000)
            made = page.locator("#magi-timeline .magi-chunk[data-prompt='1'][data-state='made']")
            expect(made.first).to_be_visible(timeout=120_000)
            page.screenshot(path=str(screenshot), full_page=True)
            page.close(run_before_unload=True)  # closing the tab while it generates
        finally:
            browser.close()
