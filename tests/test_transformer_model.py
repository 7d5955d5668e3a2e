"""MagiTransformer3DModel as a Diffusers model: loading, dtypes, KV-cache semantics, errors, special tokens."""

import copy
import json

import pytest
import torch

from diffusers_magi import MagiKVCache, MagiTransformer3DModel

from .tiny_models import tiny_transformer

# 24B-like features: SwiGLU, duplicated half-channel latents, x rescaling, another GQA ratio and head size.
LARGE_FAMILY = dict(
    in_channels=32,
    out_channels=32,
    half_channel_vae=True,
    x_rescale_factor=0.1,
    gated_linear_unit=True,
    num_attention_heads=8,
    num_key_value_heads=2,
    attention_head_dim=8,
)


def _inputs(batch_size=1, num_chunks=2, height=4, width=6, text_length=40, text_dim=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch_size, 16, 6 * num_chunks, height, width, generator=generator)
    timestep = torch.rand(batch_size, num_chunks, generator=generator)
    captions = torch.randn(batch_size, num_chunks, text_length, text_dim, generator=generator)
    mask = torch.zeros(batch_size, num_chunks, text_length)
    for row, length in enumerate(torch.randint(1, text_length, (batch_size * num_chunks,), generator=generator)):
        mask.view(-1, text_length)[row, :length] = 1
    return latents, timestep, captions, mask


@pytest.mark.parametrize("overrides", [{}, LARGE_FAMILY], ids=["4.5B-like", "24B-like"])
def test_forward_shapes_and_batch_independence(overrides):
    model = tiny_transformer(**overrides)
    latents, timestep, captions, mask = _inputs(batch_size=2)
    output = model(latents, timestep, captions, mask).sample
    assert output.shape == latents.shape and output.dtype == torch.float32
    assert torch.isfinite(output).all()
    # Batch rows are independent: row 1 alone gives the same result.
    single = model(latents[1:], timestep[1:], captions[1:], mask[1:]).sample
    torch.testing.assert_close(single[0], output[1], rtol=1e-5, atol=1e-5)


def test_half_channel_vae_duplicates_input_and_keeps_first_output_half():
    model = tiny_transformer(**LARGE_FAMILY)
    latents, timestep, captions, mask = _inputs()
    with pytest.raises(ValueError, match="channels"):
        model(torch.cat([latents, latents], dim=1), timestep, captions, mask)
    assert model(latents, timestep, captions, mask).sample.shape[1] == 16


def test_x_rescale_factor_scales_input_and_output():
    """With the patch embedding and output projection scaled to compensate, x_rescale_factor changes nothing."""
    reference = tiny_transformer()
    rescaled = tiny_transformer(x_rescale_factor=0.1)
    rescaled.load_state_dict(reference.state_dict())
    with torch.no_grad():
        rescaled.patch_embedding.weight.mul_(10.0)
        rescaled.proj_out.weight.mul_(0.1)
    latents, timestep, captions, mask = _inputs()
    torch.testing.assert_close(
        rescaled(latents, timestep, captions, mask).sample,
        reference(latents, timestep, captions, mask).sample,
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.parametrize("overrides", [{}, LARGE_FAMILY], ids=["4.5B-like", "24B-like"])
def test_bfloat16_forward(tmp_path, overrides):
    model = tiny_transformer(**overrides)
    model.save_pretrained(tmp_path)
    latents, timestep, captions, mask = _inputs()
    reference = model(latents, timestep, captions, mask).sample

    loaded = MagiTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert loaded.patch_embedding.weight.dtype == torch.float32  # _keep_in_fp32_modules
    assert loaded.blocks[0].attn.norm_q.weight.dtype == torch.float32
    assert loaded.blocks[0].attn.to_q.weight.dtype == torch.bfloat16
    fully_cast = tiny_transformer(**overrides).to(torch.bfloat16)
    for candidate in (loaded, fully_cast):
        output = candidate(latents.to(torch.bfloat16), timestep, captions.to(torch.bfloat16), mask).sample
        assert output.dtype == torch.float32 and torch.isfinite(output).all()
    # bf16 stays close to float32 (loose: a smoke check that nothing is mis-cast, not a precision claim).
    output = loaded(latents, timestep, captions, mask).sample
    assert (output - reference).norm() / reference.norm() < 0.05


def test_save_load_round_trip_is_bit_exact(tmp_path):
    """Config and every tensor survive the round trip bit for bit, and so do the outputs.

    The loaded tensors are views into the safetensors buffer at unaligned addresses, and CPU BLAS kernels sum in an
    alignment-dependent order, so the outputs are compared after copying the loaded weights to fresh (aligned)
    storage; without the copy they differ by float32 rounding only."""
    model = tiny_transformer(step_size_conditioning=True)
    model.save_pretrained(tmp_path)
    loaded = MagiTransformer3DModel.from_pretrained(tmp_path)
    public = lambda config: json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))  # noqa: E731
    assert public(loaded.config) == public(model.config)
    for (name, tensor), (loaded_name, loaded_tensor) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert name == loaded_name and torch.equal(tensor, loaded_tensor), name
    latents, timestep, captions, mask = _inputs()
    args = (latents, timestep, captions, mask)
    torch.testing.assert_close(model(*args, step_size=4.0).sample, loaded(*args, step_size=4.0).sample)
    realigned = copy.deepcopy(loaded)
    assert torch.equal(model(*args, step_size=4.0).sample, realigned(*args, step_size=4.0).sample)


def test_auto_model_and_diffusers_namespace_resolve_the_class(tmp_path):
    import diffusers
    from diffusers import AutoModel

    tiny_transformer().save_pretrained(tmp_path / "transformer")
    loaded = AutoModel.from_pretrained(str(tmp_path), subfolder="transformer")
    assert isinstance(loaded, MagiTransformer3DModel)
    assert diffusers.MagiTransformer3DModel is MagiTransformer3DModel


def test_kv_cache_is_written_only_on_request_and_replaces_recomputation():
    """Chunk 1 attending to chunk 0 gives the same output whether chunk 0 is in the same call or in the cache."""
    model = tiny_transformer()
    latents, timestep, captions, mask = _inputs(num_chunks=2)
    full = model(latents, timestep, captions, mask, attention_chunk_starts=[0, 0]).sample

    cache = MagiKVCache(model.config.num_layers)
    model(latents[:, :, :6], timestep[:, :1], captions[:, :1], mask[:, :1], kv_cache=cache)
    assert cache.chunk_indices == [] and cache.nbytes() == 0
    model(latents[:, :, :6], timestep[:, :1], captions[:, :1], mask[:, :1], kv_cache=cache, num_chunks_to_cache=1)
    assert cache.chunk_indices == [0]
    chunk1 = model(
        latents[:, :, 6:],
        timestep[:, 1:],
        captions[:, 1:],
        mask[:, 1:],
        first_chunk_index=1,
        attention_chunk_starts=[0],
        kv_cache=cache,
    ).sample
    torch.testing.assert_close(chunk1, full[:, :, 6:], rtol=1e-5, atol=1e-5)

    cache.drop_chunks_before(1)
    assert cache.chunk_indices == [] and cache.nbytes() == 0


def test_kv_cache_offload_to_storage_device():
    model = tiny_transformer()
    latents, timestep, captions, mask = _inputs(num_chunks=1)
    cache = MagiKVCache(model.config.num_layers, storage_device="cpu")
    model(latents, timestep, captions, mask, kv_cache=cache, num_chunks_to_cache=1)
    keys, values = cache.layer(0).read(0, 1, torch.device("cpu"))
    assert keys.shape == (1, 6 * 2 * 3, 2, 16) and values.shape == keys.shape
    assert cache.nbytes() == 2 * model.config.num_layers * keys.numel() * keys.element_size()


def test_chunk_of_a_later_window_position_sees_rotary_offset():
    """first_chunk_index moves the window in time: the output changes (rope), but not when nothing else changes."""
    model = tiny_transformer()
    latents, timestep, captions, mask = _inputs(num_chunks=1)
    at_zero = model(latents, timestep, captions, mask).sample
    at_three = model(latents, timestep, captions, mask, first_chunk_index=3, attention_chunk_starts=[3]).sample
    # A chunk attending only to itself is invariant to a time shift up to float rounding (relative rotary positions).
    torch.testing.assert_close(at_three, at_zero, rtol=1e-4, atol=1e-4)


def test_errors_name_the_argument():
    model = tiny_transformer(step_size_conditioning=True)
    latents, timestep, captions, mask = _inputs(num_chunks=2)
    with pytest.raises(ValueError, match="divisible by the patch"):
        model(latents[..., :3, :], timestep, captions, mask, step_size=4.0)
    with pytest.raises(ValueError, match="channels"):
        model(latents[:, :8], timestep, captions, mask, step_size=4.0)
    with pytest.raises(ValueError, match="timestep"):
        model(latents, timestep[:, :1].expand(1, 5), captions, mask, step_size=4.0)
    with pytest.raises(ValueError, match="timestep must have shape"):
        model(latents, timestep.expand(3, -1), captions, mask, step_size=4.0)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(latents, timestep, captions[..., :5], mask, step_size=4.0)
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        model(latents, timestep, captions, mask[..., :5], step_size=4.0)
    with pytest.raises(ValueError, match="step_size"):
        model(latents, timestep, captions, mask)
    with pytest.raises(ValueError, match="attention_chunk_starts"):
        model(latents, timestep, captions, mask, attention_chunk_starts=[0, 2], step_size=4.0)
    with pytest.raises(ValueError, match="kv_cache"):
        model(latents, timestep, captions, mask, first_chunk_index=2, attention_chunk_starts=[0, 0], step_size=4.0)
    with pytest.raises(ValueError, match="kv_cache"):
        model(latents, timestep, captions, mask, num_chunks_to_cache=1, step_size=4.0)
    cache = MagiKVCache(model.config.num_layers)
    with pytest.raises(ValueError, match="no keys/values for chunk"):
        model(
            latents,
            timestep,
            captions,
            mask,
            first_chunk_index=2,
            attention_chunk_starts=[1, 1],
            kv_cache=cache,
            step_size=4.0,
        )
    with pytest.raises(ValueError, match="layers"):
        model(latents, timestep, captions, mask, kv_cache=MagiKVCache(5), step_size=4.0)


def test_special_token_lookup_errors():
    model = tiny_transformer(use_special_tokens=False)
    with pytest.raises(ValueError, match="special tokens"):
        model.special_token("hq")
    with pytest.raises(ValueError, match="Unknown special token"):
        tiny_transformer().special_token("sharp")


@pytest.mark.parametrize("backend", ["native", "_native_math"])
def test_grouped_query_attention_equals_sdpa_enable_gqa(backend):
    """On the CPU the query heads of each key/value head run as one longer query (`grouped_query_attention`): the
    same result as SDPA's own `enable_gqa`, head by head, with and without a key-padding mask."""
    import torch.nn.functional as F

    from diffusers_magi.models.attention_magi import grouped_query_attention

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(3, 10, 8, 16, generator=generator)
    key, value = (torch.randn(3, 7, 2, 16, generator=generator) for _ in range(2))
    key_padding = (torch.arange(7) < torch.tensor([7, 4, 1])[:, None])[:, None, None, :]
    for mask in (None, key_padding):
        expected = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask, enable_gqa=True
        ).transpose(1, 2)
        output = grouped_query_attention(query, key, value, attn_mask=mask, backend=backend)
        assert output.shape == query.shape
        torch.testing.assert_close(output, expected, rtol=1e-6, atol=1e-6)
