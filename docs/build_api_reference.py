"""Write `docs/api.md`, the API reference, from the docstrings and signatures of the public objects.

    python docs/build_api_reference.py

`tests/test_docs.py` checks that the committed file is up to date, so the reference never drifts from the code.
"""

import argparse
import inspect
import sys
from pathlib import Path

import diffusers_magi
import diffusers_magi.conversion
from diffusers_magi import app, cli, loaders, loading, tiny_random, training
from diffusers_magi.training import train_lora

OUTPUT = Path(__file__).resolve().parent / "api.md"

SECTIONS = {
    "Pipelines": [
        "MagiPipeline",
        "MagiImageToVideoPipeline",
        "MagiVideoToVideoPipeline",
        "MagiPipelineOutput",
        "MagiChunkOutput",
        "MagiSession",
        "MagiSessionProgress",
        "MagiSessionInterrupted",
        "write_video_stream",
    ],
    "Models": ["MagiTransformer3DModel", "MagiKVCache", "AutoencoderMagi"],
    "Scheduler and guidance": ["MagiChunkScheduler", "MagiGuidance"],
    "Modular Diffusers": ["MagiModularPipeline", "MagiAutoBlocks"],
}
OWN_METHODS_OF = {"MagiImageToVideoPipeline": ["__call__"], "MagiVideoToVideoPipeline": ["__call__"]}
INTERNAL_METHODS = {"register_to_config"}  # overrides of Diffusers plumbing, not user API


def _docstring(obj) -> str:
    return inspect.cleandoc(obj.__doc__) if obj.__doc__ else "(no docstring)"


def _signature(name: str, obj) -> str:
    try:
        return f"{name}{inspect.signature(obj)}"
    except (TypeError, ValueError):
        return name


def _public_methods(cls):
    names = OWN_METHODS_OF.get(cls.__name__)
    members = vars(cls)
    for name in names or sorted(members):
        member = members[name]
        if isinstance(member, (classmethod, staticmethod)):
            member = member.__func__
        if (name.startswith("_") and name != "__call__") or name in INTERNAL_METHODS:
            continue
        if not callable(member) or isinstance(member, type):
            continue
        yield name, member


def _document(name: str, obj) -> list:
    lines = [f"### `{name}`", ""]
    if inspect.isclass(obj):
        lines += ["```python", _signature(name, obj), "```", "", _docstring(obj), ""]
        for method_name, method in _public_methods(obj):
            lines += [f"#### `{name}.{method_name}`", "", "```python", _signature(method_name, method), "```", ""]
            lines += [_docstring(method), ""]
    else:
        lines += ["```python", _signature(name, obj), "```", "", _docstring(obj), ""]
    return lines


def build() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `docs/build_api_reference.py`; do not edit by hand.",
        "",
    ]
    for section, names in SECTIONS.items():
        lines += [f"## {section}", ""]
        for name in names:
            lines += _document(name, getattr(diffusers_magi, name))
    lines += ["## Conversion (`diffusers_magi.conversion`)", ""]
    for name in sorted(getattr(diffusers_magi.conversion, "__all__", None) or dir(diffusers_magi.conversion)):
        obj = getattr(diffusers_magi.conversion, name)
        if not name.startswith("_") and inspect.isfunction(obj):
            lines += _document(name, obj)
    lines += ["## LoRA (`diffusers_magi.loaders`)", ""]
    for name in ("MagiLoraLoaderMixin", "MagiPeftAdapterMixin", "adapter_incompatible_modules"):
        lines += _document(name, getattr(loaders, name))
    lines += ["## Training (`diffusers_magi.training`)", ""]
    for name in training.__all__:
        lines += _document(name, getattr(training, name))
    lines += ["## Loading (`diffusers_magi.loading`)", ""]
    lines += _document("load_pipeline", loading.load_pipeline)
    lines += ["## Tiny random pipeline (`diffusers_magi.tiny_random`)", ""]
    lines += _document("tiny_random_pipeline", tiny_random.tiny_random_pipeline)
    parser = cli.build_parser()
    parser.formatter_class = lambda prog: argparse.ArgumentDefaultsHelpFormatter(prog, width=110)
    lines += ["## Command line: `magi-generate`", "", "```", parser.format_help().rstrip(), "```", ""]
    parser = train_lora.build_parser()
    parser.formatter_class = lambda prog: argparse.ArgumentDefaultsHelpFormatter(prog, width=110)
    lines += ["## Command line: `magi-train-lora`", "", "```", parser.format_help().rstrip(), "```", ""]
    lines += ["## Web app (`diffusers_magi.app`, see app.md)", ""]
    for name in ("build_app", "valid_step_counts"):
        lines += _document(name, getattr(app, name))
    parser = app.build_parser()
    parser.formatter_class = lambda prog: argparse.ArgumentDefaultsHelpFormatter(prog, width=110)
    lines += ["## Command line: `magi-app`", "", "```", parser.format_help().rstrip(), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    OUTPUT.write_text(build())
    print(f"wrote {OUTPUT}", file=sys.stderr)
