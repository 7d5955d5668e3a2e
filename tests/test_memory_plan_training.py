"""`benchmarks/memory_plan_training.py`: its LoRA count is PEFT's, its activation figures grow as they must, it runs at
toy size, and `docs/training.md` holds its current output."""

import importlib.util
import subprocess
import sys

import pytest

from .conftest import REPO_ROOT
from .tiny_models import tiny_transformer


@pytest.fixture(scope="module")
def training_plan():
    spec = importlib.util.spec_from_file_location(
        "memory_plan_training", REPO_ROOT / "benchmarks" / "memory_plan_training.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_plan_training"] = module
    spec.loader.exec_module(module)
    return module


def test_lora_parameter_count_is_what_peft_adds(training_plan):
    from peft import LoraConfig

    model = tiny_transformer()
    before = sum(parameter.numel() for parameter in model.parameters())
    model.add_adapter(LoraConfig(r=8, target_modules=training_plan.TARGETS))
    added = sum(parameter.numel() for parameter in model.parameters()) - before
    assert training_plan.lora_parameters(tiny_transformer(), 8, training_plan.TARGETS) == added


def test_activations_grow_with_the_clip_and_checkpointing_saves_memory(training_plan):
    plan = training_plan.build_plan(small=True)
    clips = plan["models"]["tiny"]["clips"]
    for short, long in zip(training_plan.CLIP_CHUNKS, training_plan.CLIP_CHUNKS[1:]):
        assert clips[short]["checkpointing"] < clips[long]["checkpointing"]
    for figures in clips.values():
        assert 0 < figures["checkpointing"] < figures["no_checkpointing"]


def test_block_measurement_counts_the_backward(training_plan):
    import memory_plan
    from diffusers_magi import MagiTransformer3DModel

    config = memory_plan.SMALL_TRANSFORMERS["tiny"]
    block = training_plan.block_training_bytes(
        memory_plan.meta_model(MagiTransformer3DModel, **config), 96, 2, 4, training_plan.TARGETS
    )
    assert block["input"] == 2 * 96 * config["hidden_size"] * 2  # bfloat16 tokens of two chunks
    assert block["input"] < block["saved"] < block["peak"]


def test_memory_plan_training_runs_at_toy_size():
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "memory_plan_training.py"), "--small"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "toy configuration" in result.stdout and "| tiny | 2 (48 frames, 192 tokens) |" in result.stdout


def test_docs_training_md_holds_the_current_plan(training_plan):
    doc = (REPO_ROOT / "docs" / "training.md").read_text()
    generated = doc.split(training_plan.DOC_BEGIN, 1)[1].split(training_plan.DOC_END, 1)[0].strip()
    assert generated == training_plan.report(
        training_plan.build_plan()
    ), "run `python benchmarks/memory_plan_training.py --update-doc docs/training.md`"
