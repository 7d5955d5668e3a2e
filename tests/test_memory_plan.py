"""`benchmarks/memory_plan.py`: its counts agree with the real objects (weights loaded by `from_pretrained`, activations
of a real CPU run, the KV cache of a real generation), its offload modes are ordered as they should be, and
`docs/memory.md` holds its current output."""

import importlib.util
import sys

import pytest
import torch

from diffusers_magi import MagiTransformer3DModel
from diffusers_magi.models.attention_magi import ChunkAttentionLayout
from diffusers_magi.models.kv_cache_magi import MagiKVCache, MagiKVCacheLayer

from .conftest import REPO_ROOT
from .tiny_models import tiny_pipeline, tiny_transformer


@pytest.fixture(scope="module")
def memory_plan():
    spec = importlib.util.spec_from_file_location("memory_plan", REPO_ROOT / "benchmarks" / "memory_plan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_plan"] = module
    spec.loader.exec_module(module)
    return module


def test_live_tensor_bytes_counts_allocations_not_views_or_existing_tensors(memory_plan):
    weight = torch.ones(256, 256)
    counter = memory_plan.LiveTensorBytes([weight])
    with counter:
        transposed = weight.t()  # a view of an existing tensor: nothing allocated
        first = torch.ones(1024)  # 4 KiB
        second = first * 2  # 4 KiB more, both alive
        del first
        third = second.view(32, 32) + 1  # `first` is gone: still 8 KiB at most
    assert counter.peak == 8192 and counter.live == 8192
    del transposed, second, third


def test_weight_bytes_equal_a_bfloat16_model_loaded_with_from_pretrained(memory_plan, tmp_path):
    tiny_transformer().save_pretrained(tmp_path)
    loaded = MagiTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    planned = memory_plan.transformer_bytes(memory_plan.meta_model(MagiTransformer3DModel, **dict(loaded.config)))
    assert planned["total"] == sum(p.numel() * p.element_size() for p in loaded.parameters())
    assert planned["block"] == sum(p.numel() * p.element_size() for p in loaded.blocks[0].parameters())


def test_activation_count_on_the_meta_device_equals_a_real_cpu_run(memory_plan, monkeypatch):
    """A SwiGLU block reading the KV cache: the meta-device measurement (attention as a fused kernel) allocates what
    the real block allocates on the CPU with SDPA's fused flash kernel (`_native_flash`; the default for bfloat16 on
    CPU is the math kernel of the reference evaluation, which also holds the attention scores) and the kernel's own
    grouped-query attention, as on a GPU (on the CPU `grouped_query_attention` folds the query heads instead, which
    copies a chunk's queries and outputs once more)."""
    from diffusers_magi.models import attention_magi

    def kernel_grouped_query_attention(query, key, value, attn_mask=None, backend=None):
        # looked up at call time: the meta-device measurement replaces `dispatch_attention_fn` with a fused kernel
        return attention_magi.dispatch_attention_fn(query, key, value, attn_mask=attn_mask, enable_gqa=True, backend=backend)

    monkeypatch.setattr(attention_magi, "grouped_query_attention", kernel_grouped_query_attention)
    config = dict(
        num_layers=1, hidden_size=256, num_attention_heads=8, num_key_value_heads=4, attention_head_dim=32, ffn_dim=512,
        gated_linear_unit=True, text_dim=64, text_length=160, condition_dim=64, cross_attention_dim=256,
    )
    tokens, num_chunks, cached = 96, 3, 1
    planned = memory_plan.transformer_call_bytes(memory_plan.meta_model(MagiTransformer3DModel, **config), tokens, num_chunks, cached)

    model = MagiTransformer3DModel(**config)
    model.set_attention_backend("_native_flash")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not memory_plan._keeps_fp32(model, name):
                parameter.data = parameter.data.to(torch.bfloat16)
    hidden = torch.randn(1, num_chunks * tokens, 256, dtype=torch.bfloat16)
    condition = torch.randn(1, num_chunks, 64, dtype=torch.bfloat16)
    rotary = tuple(torch.randn(num_chunks * tokens, 12) for _ in range(2))
    text = torch.randn(1, num_chunks, 160, 256, dtype=torch.bfloat16)
    text_mask = torch.ones(1, num_chunks, 160, dtype=torch.bool)
    cache = MagiKVCacheLayer()
    keys = torch.randn(1, cached * tokens, 4, 32, dtype=torch.bfloat16)
    cache.write(0, keys, keys, cached)
    layout = ChunkAttentionLayout(tokens, cached, (0,) * num_chunks)
    counter = memory_plan.LiveTensorBytes(memory_plan._existing(model.blocks[0], hidden, condition, *rotary, text, text_mask))
    with torch.no_grad(), counter:
        model.blocks[0](hidden, condition, rotary, layout, text, text_mask, cache)
    assert planned == counter.peak + hidden.numel() * 2 + 2 * rotary[0].numel() * 4


def test_kv_cache_bound_equals_the_fullest_cache_of_a_generation(memory_plan, monkeypatch):
    shapes = memory_plan.plan_shapes()
    pipe = tiny_pipeline()
    fullest = []
    original_drop = MagiKVCache.drop_chunks_before

    def record_and_drop(cache, chunk_index):  # after every call, before the cache forgets chunks
        fullest.append(cache.nbytes())
        original_drop(cache, chunk_index)

    monkeypatch.setattr(MagiKVCache, "drop_chunks_before", record_and_drop)
    list(pipe.stream(prompt="a cat", num_frames=24 * 5, num_inference_steps=4, output_type="latent", height=32, width=32))
    tokens = memory_plan.tokens_per_chunk(pipe.transformer.config, 32, 32)
    per_chunk = memory_plan.kv_chunk_bytes(pipe.transformer, tokens, torch.float32)
    assert max(fullest) == shapes["cache_chunks"] * per_chunk


def test_offload_modes_never_need_more_than_less_offloading(memory_plan):
    plan = memory_plan.build_plan(small=True)
    for precision in ("bf16", "fp8"):
        peaks = list(memory_plan.peaks_for(plan, "tiny", precision, "toy").values())
        assert peaks[:3] == sorted(peaks[:3], reverse=True)  # none >= model offload >= model offload + CPU cache
        assert peaks[3] <= peaks[2]  # block-level group offload below model offload
    text = memory_plan.report(plan, small=True)
    assert "### Weights (GiB)" in text and "### Peak accelerator memory, tiny (GiB, one GPU)" in text


@pytest.mark.slow
def test_docs_memory_md_holds_the_current_plan(memory_plan):
    doc = (REPO_ROOT / "docs" / "memory.md").read_text()
    expected = memory_plan.report(memory_plan.build_plan())
    assert memory_plan.generated_part(doc) == expected, "run `python benchmarks/memory_plan.py --update-doc docs/memory.md`"
