"""`torch.compile` of the MAGI-1 transformer: no graph breaks, the compiled generation equals eager bit for bit
(`eager` / `aot_eager` backends, which run the traced graphs with the eager kernels), and once the window has reached
its steady state a longer video compiles no new graph.

A generation calls the transformer with a fixed set of window layouts (chunks in flight, clean re-run, cached chunks
read); each is one graph, so these tests raise `torch._dynamo.config.recompile_limit` above Diffusers' default of 8
(see docs/performance.md)."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from diffusers_magi.models.kv_cache_magi import MagiKVCache

from .tiny_models import tiny_pipeline, tiny_transformer, tiny_transformer_inputs

RECOMPILE_LIMIT = 64


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


@pytest.mark.slow
def test_compiled_repeated_blocks_equal_eager_and_stop_compiling_in_the_steady_state():
    pipe = tiny_pipeline(with_vae=False)
    eager = {n: _generate(pipe, n) for n in (4, 12)}
    torch._dynamo.reset()
    pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
    new_graphs = {}
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        for num_chunks in (4, 8, 12):
            counters.clear()
            output = _generate(pipe, num_chunks)
            assert not counters["graph_break"]
            new_graphs[num_chunks] = counters["stats"]["unique_graphs"]
            if num_chunks in eager:
                assert torch.equal(output, eager[num_chunks])
    # 8 chunks reach the steady window layouts a 4-chunk video never has; 12 chunks need no new graph.
    assert new_graphs[4] > 0 and new_graphs[12] == 0, new_graphs


@pytest.mark.slow
def test_whole_model_compile_distilled_with_offloaded_cache_equals_eager():
    pipe = tiny_pipeline(with_vae=False)
    kwargs = dict(guidance_mode="distilled", kv_cache_device="cpu")
    eager = _generate(pipe, 2, **kwargs)
    torch._dynamo.reset()
    pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        counters.clear()
        compiled = _generate(pipe, 2, **kwargs)
    assert not counters["graph_break"]
    assert torch.equal(compiled, eager)


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
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        counters.clear()
        compiled = generate()
    assert not counters["graph_break"]
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(compiled, eager))
