"""`magi-app`: a web app (Gradio) that streams a MAGI-1 video into the page chunk by chunk while the user steers it.

    magi-app --model tiny-random                       # a smoke test on any machine, http://127.0.0.1:7860
    magi-app --model path/to/converted-folder --device cuda

Each browser tab runs its own open-ended `MagiSession` (kept in the tab's `gr.State`, never on the pipeline): the
page shows every chunk as soon as it is final, a new prompt can be typed at any time (it drives the video from the
first chunk that has not started denoising, shown on a timeline), the generation can be stopped, continued, and the
mp4 so far downloaded. An image (image-to-video) or a video (continuation) can be given as the start.

The live view is Gradio's streaming video (HLS), which needs `ffmpeg` and `ffprobe` on the PATH; without them it
shows the newest chunk as a clip. The mp4 so far is written with the `imageio-ffmpeg` binary either way: every chunk
is encoded once to its own clip, and the whole video is the clips joined without re-encoding.
"""

import argparse
import contextlib
import html
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from .loading import ORIGINAL_REPO_ID, TINY_RANDOM
from .pipelines.pipeline_magi import SIZE_MULTIPLE, MagiPipeline
from .pipelines.session_magi import MagiSession, MagiSessionInterrupted
from .pipelines.video_export_magi import write_video_stream

FPS = 24
# Colours of the prompts on the timeline, in the order they were typed (then repeated).
TIMELINE_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f")


def valid_step_counts(pipe: MagiPipeline, up_to: Optional[int] = None) -> List[int]:
    """Steps per chunk the pipeline's scheduler accepts: multiples of its window size and of its number of noise
    bands, up to `up_to` (default: twice the pipeline's default step count, at least 64)."""
    config = pipe.scheduler.config
    multiple = math.lcm(config.window_size, max(len(config.noise2clean_kvrange), 1))
    up_to = up_to or max(64, 2 * pipe.config.default_num_inference_steps)
    return list(range(multiple, up_to + 1, multiple))


@dataclass
class _PromptSwitch:
    first_chunk: int  # generated chunk from which the prompt applies
    text: str


class TabSession:
    """The state of one browser tab: its `MagiSession`, the chunk clips written so far and the prompt timeline.

    Created empty per tab (the initial value of a `gr.State`, copied for every tab), filled by `start`."""

    def __init__(self):
        self.session: Optional[MagiSession] = None
        self.folder: Optional[str] = None
        self.clips: List[str] = []
        self.prompts: List[_PromptSwitch] = []
        self.video_path: Optional[str] = None  # the mp4 so far
        self.num_frames = 0  # frames in it
        self.streaming = threading.Lock()  # held while an event of this tab is generating

    def __deepcopy__(self, memo):  # gr.State copies its initial value for every tab: a fresh, empty state
        return TabSession()

    def start(self, session: MagiSession, prompt: str, root: str) -> None:
        self.close()
        self.session = session
        self.folder = tempfile.mkdtemp(prefix="tab-", dir=root)
        self.clips, self.prompts, self.video_path, self.num_frames = [], [_PromptSwitch(0, prompt)], None, 0

    def add_chunk(self, frames) -> Tuple[str, str]:
        """Encode one chunk's frames `(batch, frames, H, W, 3)` to its own clip and write the mp4 so far (the clips
        joined without re-encoding) under a new name. Returns `(clip, video so far)`.

        A new name per chunk, never a file replaced in place: the browser may still be fetching the previous mp4 (a
        server that sends a path it has measured must find the same file when it reads it). The mp4 before the
        previous one is deleted, so the folder holds the clips and two mp4s however long the video gets."""
        index = len(self.clips)
        clip = write_video_stream([frames], os.path.join(self.folder, f"chunk_{index:05d}.mp4"), fps=FPS)
        self.clips.append(clip)
        self.num_frames += frames.shape[1]
        video = os.path.join(self.folder, f"magi-video-{len(self.clips):05d}-chunks.mp4")
        _join_clips(self.clips, video, os.path.join(self.folder, "clips.txt"))
        if len(self.clips) > 2:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.folder, f"magi-video-{len(self.clips) - 2:05d}-chunks.mp4"))
        self.video_path = video
        return clip, video

    def close(self) -> None:
        """Stop the tab's generation and delete its files (the tab was closed, or a new video replaces them)."""
        if self.session is not None:
            self.session.interrupt()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.session, self.folder = None, None


def _join_clips(clips: List[str], output: str, list_file: str) -> None:
    """Concatenate mp4 clips of the same encoding into `output` with ffmpeg's concat demuxer (stream copy)."""
    import imageio_ffmpeg

    with open(list_file, "w", encoding="utf-8") as file:
        file.writelines(f"file '{os.path.basename(clip)}'\n" for clip in clips)
    partial = f"{output}.part.mp4"
    command = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-hide_banner", "-loglevel", "error",
        "-f", "concat", "-safe", "0", "-i", list_file, "-c", "copy", "-movflags", "+faststart", partial,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ffmpeg could not join the chunk clips into {output}: {result.stderr.strip()[-500:]}")
    os.replace(partial, output)


def timeline_html(tab: TabSession) -> str:
    """Which prompt drives which chunk: one cell per chunk (filled when made, faded while in flight or planned),
    coloured by prompt, and a legend `from chunk k: prompt`."""
    if tab.session is None:
        return "<div class='magi-timeline'><em>No video yet: type a prompt and press Generate.</em></div>"
    done, in_flight = _chunk_counts(tab)
    shown = max(done + in_flight, tab.prompts[-1].first_chunk + 1)
    cells = []
    for chunk in range(shown):
        which = max(i for i, switch in enumerate(tab.prompts) if switch.first_chunk <= chunk)
        colour = TIMELINE_COLOURS[which % len(TIMELINE_COLOURS)]
        state = "made" if chunk < done else "in flight" if chunk < done + in_flight else "planned"
        opacity = 1.0 if state == "made" else 0.45 if state == "in flight" else 0.2
        cells.append(
            f"<span class='magi-chunk' data-chunk='{chunk}' data-prompt='{which}' data-state='{state}' "
            f"title='chunk {chunk} ({state}): {html.escape(tab.prompts[which].text, quote=True)}' "
            "style='display:inline-block;"
            f"min-width:1.8em;margin:1px;padding:2px 3px;text-align:center;color:white;font-size:0.8em;"
            f"background:{colour};opacity:{opacity};border-radius:3px'>{chunk}</span>"
        )
    legend = "".join(
        f"<li><span style='color:{TIMELINE_COLOURS[i % len(TIMELINE_COLOURS)]}'>&#9632;</span> from chunk "
        f"{switch.first_chunk}: {html.escape(switch.text)}</li>"
        for i, switch in enumerate(tab.prompts)
    )
    return (
        "<div class='magi-timeline'><div style='font-size:0.85em;opacity:0.8'>Timeline: which prompt drives which "
        "chunk (solid: made, faded: in flight or planned)</div>"
        f"<div>{''.join(cells)}</div>"
        f"<ul style='list-style:none;padding-left:0;margin:4px 0'>{legend}</ul></div>"
    )


def _status(tab: TabSession, message: str = "") -> str:
    if tab.session is None:
        return message
    progress = tab.session.progress
    done, in_flight = _chunk_counts(tab)
    speed = f", {progress.seconds_per_chunk:.1f} s per chunk" if progress.seconds_per_chunk else ""
    state = "stopped" if progress.interrupted else "generating" if tab.streaming.locked() else "ready"
    return (
        f"{message + ' ' if message else ''}{state}: {done} chunk(s) made ({tab.num_frames} frames, "
        f"{tab.num_frames / FPS:.0f} s), {in_flight} in flight{speed}."
    )


def _chunk_counts(tab: TabSession) -> Tuple[int, int]:
    """Chunks in the page's video, and chunks started but not in it yet."""
    progress = tab.session.progress
    done = len(tab.clips)
    return done, progress.chunks_done + progress.chunks_in_flight - done


def build_app(
    pipe: MagiPipeline,
    default_size: int = 720,
    max_size: int = 1280,
    output_dir: Optional[str] = None,
    live_stream: Optional[bool] = None,
    max_concurrent_sessions: Optional[int] = 4,
):
    """The Gradio app around a loaded pipeline (text-to-video; image- and video-to-video through `from_pipe`).

    Args:
        pipe (`MagiPipeline`): the loaded pipeline (any of the three classes); it is only read.
        default_size (`int`, defaults to 720): initial height and width (a multiple of 16).
        max_size (`int`, defaults to 1280): largest height and width offered.
        output_dir (`str`, *optional*): where each tab writes its chunk clips and its mp4 so far (default: a new
            temporary folder). A closed tab's generation stops at once; its files are deleted when Gradio drops
            the tab's state (an hour later).
        live_stream (`bool`, *optional*): show the video as Gradio's streaming video (needs `ffmpeg` and `ffprobe`
            on the PATH) rather than the newest chunk as a clip; default: when both are found.
        max_concurrent_sessions (`int`, *optional*, defaults to 4): tabs generating at the same time (others wait in
            the queue); `None` for no limit. They share the device's compute and add up their memory.

    Returns:
        `gr.Blocks`: launch it with `.queue().launch(...)` (or `.launch()`, which queues).
    """
    import gradio as gr

    from .pipelines import MagiImageToVideoPipeline, MagiPipeline as TextPipeline, MagiVideoToVideoPipeline

    if default_size % SIZE_MULTIPLE or not SIZE_MULTIPLE <= default_size <= max_size:
        raise ValueError(
            f"default_size must be a multiple of {SIZE_MULTIPLE} in [{SIZE_MULTIPLE}, max_size={max_size}], got "
            f"{default_size}."
        )
    if live_stream is None:
        live_stream = shutil.which("ffmpeg") is not None and shutil.which("ffprobe") is not None
    root = os.path.abspath(output_dir or tempfile.mkdtemp(prefix="magi-app-"))
    os.makedirs(root, exist_ok=True)
    gr.set_static_paths([root])  # the clips and mp4s are served from here, not copied into Gradio's cache
    pipelines = {
        "text": TextPipeline.from_pipe(pipe) if type(pipe) is not TextPipeline else pipe,
        "image": MagiImageToVideoPipeline.from_pipe(pipe),
        "video": MagiVideoToVideoPipeline.from_pipe(pipe),
    }
    steps = valid_step_counts(pipe)
    default_steps = pipe.config.default_num_inference_steps
    if default_steps not in steps:
        default_steps = steps[0]

    def updates(tab: TabSession, message: str = "", clip: Optional[str] = None):
        """Values of (live video, download, timeline, status); the live video only changes with a new chunk."""
        live = clip if clip is not None else gr.skip()
        download = gr.DownloadButton(value=tab.video_path, interactive=tab.video_path is not None)
        return live, download, timeline_html(tab), _status(tab, message)

    def stream(tab: TabSession, message: str):
        """Generate chunk after chunk into the page until the session is interrupted."""
        if not tab.streaming.acquire(blocking=False):
            raise gr.Error("This tab is already generating; press Stop first.")
        try:
            yield updates(tab, message)
            while True:
                try:
                    chunk = tab.session.next_chunk()
                except MagiSessionInterrupted:
                    break
                except Exception as error:  # the session stays at the failed call: Continue retries it
                    raise gr.Error(f"Generation failed ({type(error).__name__}: {error}); press Continue to retry.")
                clip, _ = tab.add_chunk(chunk.frames)
                yield updates(tab, clip=clip)
            yield updates(tab, "Stopped; press Continue to go on.")
        finally:
            tab.streaming.release()

    open_tabs: Dict[str, TabSession] = {}  # by Gradio session, to stop a tab's generation when it is closed

    def generate(tab, prompt, image, video, height, width, num_inference_steps, seed, request: gr.Request):
        if tab.streaming.locked():
            raise gr.Error("This tab is already generating; press Stop first.")
        if not prompt or not prompt.strip():
            raise gr.Error("Type a prompt first.")
        if image and video:
            raise gr.Error("Give an image (image-to-video) or a video (continuation), not both.")
        if seed is None or seed != int(seed) or not 0 <= seed < 2**63:
            raise gr.Error(f"The seed must be a whole number in [0, 2**63), got {seed!r}.")
        kwargs = dict(
            prompt=prompt.strip(),
            height=int(height),
            width=int(width),
            num_inference_steps=int(num_inference_steps),
            generator=torch.Generator().manual_seed(int(seed)),
            output_type="np",
        )
        mode = "image" if image else "video" if video else "text"
        if image:
            kwargs["image"] = image
        if video:
            kwargs["video"] = video
        try:
            session = pipelines[mode].start_session(**kwargs)
        except (ValueError, TypeError) as error:
            raise gr.Error(str(error))
        tab.start(session, prompt.strip(), root)
        open_tabs[request.session_hash] = tab
        yield from stream(tab, "Started.")

    def resume(tab):
        if tab.session is None:
            raise gr.Error("Nothing to continue: press Generate first.")
        tab.session.resume()
        yield from stream(tab, "Continued.")

    def tab_closed(request: gr.Request):
        """The tab was closed or reloaded: stop its generation now (its files go when Gradio drops its state)."""
        tab = open_tabs.pop(request.session_hash, None)
        if tab is not None and tab.session is not None:
            tab.session.interrupt()

    def stop(tab):
        if tab.session is None or not tab.streaming.locked():
            return _status(tab, "Not generating.")
        tab.session.interrupt()
        return _status(tab, "Stopping after the transformer call in progress.")

    def switch_prompt(tab, prompt):
        if tab.session is None:
            raise gr.Error("Press Generate first; the prompt then drives the video until you switch it.")
        text = (prompt or "").strip()
        try:
            first_chunk = tab.session.set_prompt(text)
        except (ValueError, TypeError) as error:
            raise gr.Error(str(error))
        tab.prompts = [switch for switch in tab.prompts if switch.first_chunk < first_chunk]
        tab.prompts.append(_PromptSwitch(first_chunk, text))
        return timeline_html(tab), _status(tab, f"New prompt from chunk {first_chunk}.")

    with gr.Blocks(title="MAGI-1: steer a video while it is made") as demo:
        gr.Markdown(
            "## MAGI-1: steer a video while it is made\n"
            "Type a prompt and press **Generate**: the video streams in chunk by chunk (24 frames each) and goes on "
            "until you press **Stop**. Edit the prompt and press **Switch prompt** (or Enter) at any time: it drives "
            "the video from the first chunk that has not started yet (see the timeline). **Continue** goes on after "
            "a stop; **Download** gives the mp4 so far."
        )
        tab_state = gr.State(TabSession(), delete_callback=lambda tab: tab.close())
        with gr.Row():
            with gr.Column(scale=3):
                live = gr.Video(
                    label="Video",
                    streaming=live_stream,
                    autoplay=True,
                    interactive=False,
                    height=420,
                    elem_id="magi-live",
                )
                timeline = gr.HTML(timeline_html(TabSession()), label="Timeline", elem_id="magi-timeline")
                status = gr.Markdown("", elem_id="magi-status")
            with gr.Column(scale=2):
                prompt = gr.Textbox(
                    label="Prompt", lines=2, placeholder="a red fox runs through fresh snow", elem_id="magi-prompt"
                )
                with gr.Row():
                    generate_button = gr.Button("Generate", variant="primary", elem_id="magi-generate")
                    switch_button = gr.Button("Switch prompt", elem_id="magi-switch")
                with gr.Row():
                    stop_button = gr.Button("Stop", variant="stop", elem_id="magi-stop")
                    resume_button = gr.Button("Continue", elem_id="magi-continue")
                    download = gr.DownloadButton("Download mp4", interactive=False, elem_id="magi-download")
                with gr.Accordion("Start from an image or a video", open=False):
                    image = gr.Image(label="First frame (image-to-video)", type="filepath", sources=["upload"])
                    video = gr.Video(label="Video to continue (video-to-video)", sources=["upload"])
                with gr.Accordion("Size, steps, seed", open=False):
                    height = gr.Slider(SIZE_MULTIPLE, max_size, value=default_size, step=SIZE_MULTIPLE, label="Height")
                    width = gr.Slider(SIZE_MULTIPLE, max_size, value=default_size, step=SIZE_MULTIPLE, label="Width")
                    num_inference_steps = gr.Dropdown(steps, value=default_steps, label="Steps per chunk")
                    seed = gr.Number(0, precision=0, minimum=0, label="Seed")

        outputs = [live, download, timeline, status]
        generate_button.click(
            generate,
            [tab_state, prompt, image, video, height, width, num_inference_steps, seed],
            outputs,
            api_name="generate",
            concurrency_limit=max_concurrent_sessions,
            concurrency_id="generation",
        )
        resume_button.click(
            resume,
            [tab_state],
            outputs,
            api_name="resume",
            concurrency_limit=max_concurrent_sessions,
            concurrency_id="generation"
        )
        stop_button.click(stop, [tab_state], [status], api_name="stop", concurrency_limit=None)
        gr.on(
            [switch_button.click, prompt.submit],
            switch_prompt,
            [tab_state, prompt],
            [timeline, status],
            api_name="switch_prompt",
            concurrency_limit=None,
        )
        demo.unload(tab_closed)
    return demo


def build_parser() -> argparse.ArgumentParser:
    from .cli import DTYPES, OFFLOAD_MODES
    from .conversion.presets import PRESETS

    parser = argparse.ArgumentParser(
        prog="magi-app",
        description="A web app that streams a MAGI-1 video chunk by chunk while you steer it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default=ORIGINAL_REPO_ID,
        help="as magi-generate: the original MAGI-1 repository (with --variant), a folder or Hub id written by "
        "magi-convert, or 'tiny-random' (tiny random weights: a smoke test, not a model)",
    )
    parser.add_argument("--variant", choices=sorted(PRESETS), help="MAGI-1 variant of the original layout")
    parser.add_argument(
        "--special-tokens-file", help="the original special_tokens.npz, needed with the original layout"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16; float32 for tiny-random")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device to generate on"
    )
    parser.add_argument("--offload", choices=OFFLOAD_MODES, default="none", help="CPU offloading of the components")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on")
    parser.add_argument("--size", type=int, help="initial height and width (default 64 for tiny-random, else 480)")
    parser.add_argument("--max-sessions", type=int, default=4, help="tabs generating at the same time")
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    return parser


def load_app_pipeline(args: argparse.Namespace) -> MagiPipeline:
    """The pipeline `args` name, loaded and placed as `magi-generate` does."""
    from . import cli

    return cli.load_pipeline(argparse.Namespace(**vars(args), image=None, video=None))


def main(argv: Optional[List[str]] = None) -> int:
    from .placement import check_device

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_device(args.device, "--device", described_as=f"--device {args.device}")
    except ValueError as error:
        parser.error(str(error))
    size = args.size or (64 if args.model == TINY_RANDOM else 480)
    if size % SIZE_MULTIPLE or size < SIZE_MULTIPLE:
        parser.error(f"--size {size}: a positive multiple of {SIZE_MULTIPLE}.")
    if args.max_sessions < 1:
        parser.error(f"--max-sessions must be at least 1, got {args.max_sessions}.")
    try:
        import gradio  # noqa: F401
    except ImportError:
        parser.error("the app needs Gradio: pip install 'diffusers-magi[app]'")
    try:
        pipe = load_app_pipeline(args)
    except (ValueError, TypeError, OSError, RuntimeError, ImportError) as error:
        print(f"magi-app: error: could not load --model {args.model}: {error}", file=sys.stderr)
        return 1
    demo = build_app(pipe, default_size=size, max_size=max(1280, size), max_concurrent_sessions=args.max_sessions)
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
