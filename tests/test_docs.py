"""The documentation stays true to the code: the API reference is regenerated from the docstrings, every link
between the docs points at an existing file, and every command block of the README and the docs runs as written (or
says what it needs)."""

import os
import re
import runpy
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from .conftest import REPO_ROOT

DOCS = REPO_ROOT / "docs"


def test_api_reference_is_up_to_date():
    build = runpy.run_path(str(DOCS / "build_api_reference.py"))["build"]
    assert (DOCS / "api.md").read_text() == build(), "docs/api.md is stale: run `python docs/build_api_reference.py`"


def test_every_public_name_is_documented():
    import diffusers_magi

    reference = (DOCS / "api.md").read_text()
    for name in diffusers_magi.__all__:
        assert f"### `{name}`" in reference, name


def test_links_between_docs_resolve():
    for page in [REPO_ROOT / "README.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+\.md)\)", page.read_text()):
            assert (page.parent / target).is_file(), f"{page.name} links to missing {target}"
        for target in re.findall(r"`(docs/[\w./-]+\.md)`", page.read_text()):
            assert (REPO_ROOT / target).is_file(), f"{page.name} names missing {target}"


# ---------------------------------------------------------------------------------------------------------------------
# Command blocks of the README and the docs run as written.
#
# Every fenced ```python / ```py / ```bash / ```sh / ```shell block of README.md and docs/**/*.md (new pages included;
# docs/api.md is generated from docstrings and left out) is run on this CPU machine, offline, in a scratch folder that
# links the repository's top-level entries (so `examples/...` paths resolve and outputs land in the scratch folder).
# A block that cannot run here says what it needs, for the reader, on the line right before its fence:
#
#     *Needs: a CUDA GPU and a folder written by `magi-convert`.*
#
# Per page, the shell blocks run first, in order (each with `bash -euo pipefail`), then the Python blocks, in order,
# as one script (later blocks use the names earlier ones define, as in a notebook).
# ---------------------------------------------------------------------------------------------------------------------

RUN_LANGUAGES = {"python": "python", "py": "python", "bash": "shell", "sh": "shell", "shell": "shell"}
MARKER = re.compile(r"^\s*\*Needs:(?P<reason>.*?)\*\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<language>[\w+-]*)\s*$")
BLOCK_TIMEOUT_S = 900


@dataclass
class CodeBlock:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str  # "python", "shell" or another fence language
    code: str
    marker: Optional[str]  # what the block needs (its "*Needs: ...*" line), if it cannot run here

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO_ROOT)}:{self.line}"


def doc_pages():
    return [REPO_ROOT / "README.md", *sorted(page for page in DOCS.rglob("*.md") if page.name != "api.md")]


def code_blocks(page: Path):
    lines = page.read_text().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        fence = FENCE.match(lines[index])
        if not fence:
            index += 1
            continue
        end = index + 1
        while end < len(lines) and not re.match(r"^\s*```\s*$", lines[end]):
            end += 1
        previous = next((line for line in reversed(lines[:index]) if line.strip()), "")
        marker = MARKER.match(previous)
        indent = len(fence.group("indent"))
        code = "\n".join(line[indent:] for line in lines[index + 1 : end])
        language = RUN_LANGUAGES.get(fence.group("language"), fence.group("language"))
        blocks.append(CodeBlock(page, index + 1, language, code, marker.group("reason").strip() if marker else None))
        index = end + 1
    return blocks


def test_docs_markers_say_what_a_block_needs():
    """Every "*Needs: ...*" line names something and sits right before a block that would otherwise run."""
    for page in doc_pages():
        marked = [block for block in code_blocks(page) if block.marker is not None]
        for block in marked:
            assert len(block.marker) > 3, f"{block.where}: the *Needs:* line must say what the block needs"
            assert block.language in ("python", "shell"), f"{block.where}: *Needs:* line on a block that is not run"
        markers = [line for line in page.read_text().splitlines() if MARKER.match(line)]
        assert len(markers) == len(marked), f"{page.name}: a *Needs:* line is not directly before a code block"


def _scratch_folder(tmp_path: Path) -> Path:
    for entry in REPO_ROOT.iterdir():
        if entry.name not in (".git", ".venv", ".ci-venv"):
            (tmp_path / entry.name).symlink_to(entry)
    return tmp_path


def _environment(tmp_path: Path) -> dict:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / ".hf-home"),  # an empty cache: nothing from an earlier download is found
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MPLBACKEND": "Agg",
    }


def _run(command, tmp_path, what, **kwargs):
    result = subprocess.run(
        command, cwd=tmp_path, env=_environment(tmp_path), capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S,
        **kwargs,
    )  # fmt: skip
    output = f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    assert result.returncode == 0, f"{what} failed (exit {result.returncode}):\n{output}"


@pytest.mark.slow
@pytest.mark.parametrize("page", doc_pages(), ids=lambda page: str(page.relative_to(REPO_ROOT)))
def test_docs_blocks_run_as_written(page, tmp_path):
    blocks = [block for block in code_blocks(page) if block.language in ("python", "shell") and block.marker is None]
    if not blocks:
        return  # nothing to run on this page: every block says what it needs (checked above)
    scratch = _scratch_folder(tmp_path)
    for block in (block for block in blocks if block.language == "shell"):
        _run(["bash", "-euo", "pipefail", "-c", block.code], scratch, f"shell block {block.where}")
    python = [block for block in blocks if block.language == "python"]
    if python:
        script = "\n\n".join(f"# --- {block.where}\n{block.code}" for block in python)
        (scratch / "docs_blocks.py").write_text(script)
        _run([sys.executable, "docs_blocks.py"], scratch, f"Python blocks {', '.join(b.where for b in python)}")
