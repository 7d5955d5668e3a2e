"""`torch.compile` of the MAGI-1 transformer: no graph breaks, a 16-chunk video compiles no more graphs than a
4-chunk one, within torch's default `recompile_limit` (8), and the compiled generation equals eager: bit for bit with
the `eager` / `aot_eager` backends (which run the traced graphs with the eager kernels) when both use the same
self-attention form, to float rounding with the default forms (a traced call runs the chunks as batch rows, an eager
one loops over the chunks).

The traced self-attention is one call with the chunks as batch rows (`_chunks_as_batch_attention`) and the window is
described to the blocks by tensor shapes and plain ints only, so the graphs do not depend on the number of chunks in
a call or on their indices."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from diffusers_magi.models.kv_cache_magi import MagiKVCache

from .tiny_models import tiny_pipeline, tiny_transformer, tiny_transformer_inputs

DEFAULT_RECOMPILE_LIMIT = 8


def _generate(pipe, num_chunks, **kwargs):
    return pipe(
        "a cat runs",
        num_frames=24 * num_chunks,
        height=32,
        width=32,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).frames


def test_transformer_call_with_cache_traces_without_graph_breaks():
    transformer = tiny_transformer()
    latents, timestep, embeds, mask = tiny_transformer_inputs()
    mask[:, 1, 30:] = 0  # padding in one chunk's caption
    cache = MagiKVCache(transformer.config.num_layers)
    transformer(latents[:, :, :6], timestep[:, :1], embeds[:, :1], mask[:, :1], kv_cache=cache, num_chunks_to_cache=1)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(transformer)(
        latents, timestep, embeds, mask, first_chunk_index=1, attention_chunk_starts=[0, 0], kv_cache=cache, num_chunks_to_cache=1
    )
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def _compiled_graphs(pipe, compile_transformer, num_chunks, **kwargs):
    """(compiled generation, graphs compiled, graph breaks) on a fresh dynamo cache, with torch's default limits."""
    assert torch._dynamo.config.recompile_limit == DEFAULT_RECOMPILE_LIMIT
    torch._dynamo.reset()
    eager_transformer = pipe.transformer
    compile_transformer(pipe)
    counters.clear()
    try:
        output = _generate(pipe, num_chunks, **kwargs)
    finally:
        pipe.transformer = eager_transformer
    return output, counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def _compile_blocks(pipe):
    pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="eager")


def _compile_whole_model(pipe):
    pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, backend="aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize(
    "compile_transformer, guidance",
    [
        (_compile_blocks, {}),
        (_compile_blocks, dict(guidance_mode="distilled", kv_cache_device="cpu")),
        (_compile_whole_model, {}),
        (_compile_whole_model, dict(guidance_mode="distilled")),
    ],
    ids=["blocks-base", "blocks-distilled-cache-on-cpu", "whole-model-base", "whole-model-distilled"],
)
def test_a_longer_video_compiles_no_more_graphs_and_equals_eager(compile_transformer, guidance):
    graphs = {}
    for num_chunks in (4, 16):
        pipe = tiny_pipeline(with_vae=False)
        pipe.transformer.set_chunk_attention("chunks_as_batch")  # the form a traced call uses, eagerly too
        eager = _generate(pipe, num_chunks, **guidance)
        compiled, graphs[num_chunks], breaks = _compiled_graphs(pipe, compile_transformer, num_chunks, **guidance)
        assert breaks == 0
        assert torch.equal(compiled, eager), num_chunks
    assert 0 < graphs[16] <= graphs[4] <= DEFAULT_RECOMPILE_LIMIT, graphs


@pytest.mark.slow
def test_whole_model_compile_distilled_with_offloaded_cache_equals_eager():
    """With the default forms (the per-chunk loop eagerly, chunks as batch rows traced), distilled guidance with its
    nearly-clean pass (a copy of the chunk attending only to itself, in a call of its own) and the KV cache on the
    CPU."""
    pipe = tiny_pipeline(with_vae=False)
    kwargs = dict(guidance_mode="distilled", kv_cache_device="cpu")
    eager = _generate(pipe, 4, **kwargs)
    compiled, graphs, breaks = _compiled_graphs(pipe, _compile_whole_model, 4, **kwargs)
    assert breaks == 0 and graphs <= DEFAULT_RECOMPILE_LIMIT
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5 * eager.abs().max().item())  # forms agree


@pytest.mark.parametrize(
    "starts, first_chunk_index",
    [(None, 0), (0, 2), ((1, 1, 1), 1), ((1, 2, 4), 2)],
    ids=["causal-window", "cached-chunks", "same-starts", "own-starts"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunks_as_batch_equal_the_per_chunk_loop(starts, first_chunk_index, dtype):
    """The compile-friendly self-attention (chunks as batch rows with a key-padding mask) gives the per-chunk loop's
    result to float rounding (the longer, masked rows sum in another order), with PyTorch's math kernel and with the
    default CPU kernel."""
    from diffusers_magi.models.attention_magi import (
        ChunkAttentionLayout,
        _chunks_as_batch_attention,
        _per_chunk_attention,
    )

    tokens, num_chunks = 8, 3
    starts = first_chunk_index if starts is None else starts
    layout = ChunkAttentionLayout(tokens, first_chunk_index, starts, num_chunks=num_chunks)
    key_tokens = (layout.num_cached_chunks + num_chunks) * tokens
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, num_chunks * tokens, 4, 16, generator=generator).to(dtype).float()
    key, value = (torch.randn(2, key_tokens, 2, 16, generator=generator).to(dtype).float() for _ in range(2))
    for backend in ("_native_math", "native"):
        batched = _chunks_as_batch_attention(query, key, value, layout, backend)
        looped = _per_chunk_attention(query, key, value, layout, backend)
        torch.testing.assert_close(batched, looped, rtol=1e-5, atol=2e-6)


def test_set_chunk_attention_checks_its_argument_and_the_backend():
    transformer = tiny_transformer()
    latents, timestep, embeds, mask = tiny_transformer_inputs()
    with pytest.raises(ValueError, match="form must be None or one of"):
        transformer.set_chunk_attention("masked")
    transformer.set_chunk_attention("chunks_as_batch")
    transformer.set_attention_backend("_native_flash")
    with pytest.raises(ValueError, match="needs a backend that applies masks"):
        transformer(latents, timestep, embeds, mask)
    transformer.set_chunk_attention(None)
    assert transformer(latents, timestep, embeds, mask).sample.isfinite().all()


def test_backends_without_masks_gather_the_valid_caption_tokens():
    """Flash-type backends take no mask: cross-attention then gathers each chunk's valid tokens (the eager-only path)
    and gives the masked result; a chunk without valid tokens gets zeros on both paths."""
    from diffusers_magi.models.attention_magi import ChunkAttentionLayout, per_chunk_cross_attention

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 3 * 8, 4, 16, generator=generator)
    keys, values = (torch.randn(2, 3, 10, 2, 16, generator=generator) for _ in range(2))
    mask = torch.rand(2, 3, 10, generator=generator) > 0.4
    mask[1, 2] = False
    layout = ChunkAttentionLayout(8, 0, (0, 0, 0))
    masked = per_chunk_cross_attention(query, keys, values, mask, layout, backend="native")
    gathered = per_chunk_cross_attention(query, keys, values, mask, layout, backend="_native_flash")
    torch.testing.assert_close(gathered, masked, rtol=1e-5, atol=1e-6)
    assert torch.equal(masked[1, 16:], torch.zeros_like(masked[1, 16:]))


@pytest.mark.slow
def test_compiled_blocks_image_to_video_and_chunk_prompts_with_cache_on_cpu_equal_eager():
    import numpy as np
    import PIL.Image

    from diffusers_magi import MagiImageToVideoPipeline

    pipe = tiny_pipeline()
    pipe.transformer.set_chunk_attention("chunks_as_batch")
    i2v = MagiImageToVideoPipeline.from_pipe(pipe)
    i2v.set_progress_bar_config(disable=True)
    image = PIL.Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8))

    def generate():
        common = dict(num_frames=48, height=32, width=32, output_type="latent")
        return (
            i2v(image=image, prompt="a cat runs", generator=torch.Generator().manual_seed(0), **common).frames,
            pipe(chunk_prompts=["a cat runs", "a dog jumps"], kv_cache_device="cpu", generator=torch.Generator().manual_seed(0), **common).frames,
        )

    eager = generate()
    torch._dynamo.reset()
    pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
    counters.clear()
    compiled = generate()
    assert not counters["graph_break"]
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(compiled, eager))
