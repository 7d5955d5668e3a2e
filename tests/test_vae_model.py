"""AutoencoderMagi behaviour that needs no reference data: save/load, the tile plan's rules, chunk-wise decoding,
slicing, offloading, bf16, and the errors for inputs the VAE cannot take."""

import diffusers
import pytest
import torch

from diffusers_magi import AutoencoderMagi

from .conftest import relative_max_error


def tiny_vae(seed: int = 0, **config) -> AutoencoderMagi:
    """A small VAE (width 256 = one unpatch channel) with every parameter random, in eval mode."""
    config = {"sample_size": 32, "sample_frames": 8, "num_attention_heads": 4, "num_layers": 1, **config}
    model = AutoencoderMagi(**config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model


def random_video(*shape, seed: int = 1) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _public_config(model) -> dict:
    return {key: value for key, value in model.config.items() if not key.startswith("_")}


@pytest.fixture(scope="module")
def vae() -> AutoencoderMagi:
    return tiny_vae()


@pytest.fixture(autouse=True)
def _default_tiling(vae):
    vae.enable_tiling(256, 256, 12, 0.25, 0.0)
    vae.disable_slicing()
    yield


@torch.no_grad()
def test_save_load_round_trip_is_bit_exact(vae, tmp_path):
    vae.save_pretrained(tmp_path)
    # AutoModel resolves the class through diffusers_magi's registration (diffusers 0.42.1 needs a str path there).
    for loaded in (AutoencoderMagi.from_pretrained(tmp_path), diffusers.AutoModel.from_pretrained(str(tmp_path))):
        assert type(loaded) is AutoencoderMagi
        assert _public_config(loaded) == _public_config(vae)
        for (name, ours), (_, theirs) in zip(vae.state_dict().items(), loaded.state_dict().items(), strict=True):
            assert torch.equal(ours, theirs), name
        x = random_video(1, 3, 8, 32, 32)
        assert torch.equal(loaded.encode(x).latent_dist.parameters, vae.encode(x).latent_dist.parameters)
        z = vae.encode(x).latent_dist.mode()
        assert torch.equal(loaded.decode(z).sample, vae.decode(z).sample)


def test_default_config_is_the_original_pipeline_setting():
    with torch.device("meta"):
        model = AutoencoderMagi()
    assert model.config.scaling_factor == 0.18215
    assert (model.spatial_compression_ratio, model.temporal_compression_ratio) == (8, 4)
    assert model.use_tiling and not model.use_slicing
    plan = (
        model.tile_sample_min_height,
        model.tile_sample_min_width,
        model.tile_sample_min_num_frames,
        model.spatial_tile_overlap_factor,
        model.temporal_tile_overlap_factor,
    )
    assert plan == (256, 256, 12, 0.25, 0.0)


@torch.no_grad()
def test_shapes_and_single_frame_paths(vae):
    vae.disable_tiling()
    video = random_video(2, 3, 8, 48, 40)
    posterior = vae.encode(video).latent_dist
    assert posterior.parameters.shape == (2, 32, 2, 6, 5)
    assert vae.decode(posterior.mode()).sample.shape == (2, 3, 8, 48, 40)

    # An image encodes as the image repeated to 4 frames; one latent frame decodes to the first of 4 frames.
    image = video[:, :, :1]
    repeated = vae.encode(image.expand(-1, -1, 4, -1, -1)).latent_dist.parameters
    assert torch.equal(vae.encode(image).latent_dist.parameters, repeated)
    z = posterior.mode()[:, :, :1]
    assert torch.equal(vae.decode(z).sample, vae.decoder(z)[:, :, :1])


@torch.no_grad()
def test_tiles_covering_the_input_equal_the_one_shot_pass(vae):
    video = random_video(1, 3, 12, 48, 40)
    z = random_video(1, 16, 3, 6, 5)
    tiled = vae.encode(video).latent_dist.parameters, vae.decode(z).sample
    vae.disable_tiling()
    assert torch.equal(tiled[0], vae.encode(video).latent_dist.parameters)
    assert torch.equal(tiled[1], vae.decode(z).sample)


@torch.no_grad()
def test_temporal_tiles_are_independent_spans(vae):
    video = random_video(1, 3, 25, 32, 32)
    latent = vae.encode(video).latent_dist.parameters
    # 12 + 12 + 1 frames -> 3 + 3 + 1 latent frames; the last span takes the single-image path.
    assert latent.shape[2] == 7
    vae.disable_tiling()
    assert torch.equal(latent[:, :, 3:6], vae.encode(video[:, :, 12:24]).latent_dist.parameters)
    assert torch.equal(latent[:, :, 6:], vae.encode(video[:, :, 24:]).latent_dist.parameters)

    # A 4-latent-frame chunk decodes as 3 + 1 latent frames: 12 + 1 frames, as in the original.
    vae.enable_tiling()
    assert vae.decode(random_video(1, 16, 4, 4, 4)).sample.shape[2] == 13


@torch.no_grad()
def test_chunk_decode_equals_slice_of_full_decode(vae):
    """The pipeline decodes each 6-latent-frame chunk on its own: the result equals slicing a decode of the whole
    video, so nothing of earlier chunks is needed (memory does not grow with the chunks already decoded)."""
    vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32)  # spatial tiles too: 48x40 -> 2x2
    chunks = random_video(1, 16, 18, 6, 5)
    full = vae.decode(chunks).sample
    assert full.shape == (1, 3, 72, 48, 40)
    for k in range(3):
        alone = vae.decode(chunks[:, :, 6 * k : 6 * (k + 1)]).sample
        assert torch.equal(alone, full[:, :, 24 * k : 24 * (k + 1)])


@torch.no_grad()
def test_spatial_tiles_cross_fade_and_change_the_result(vae):
    """With 32-pixel tiles on a 48x48 input the tiles overlap and are blended: the output shape is preserved, the
    top-left corner (covered by one tile only, before any blend region) equals the one-shot pass of that tile."""
    vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32)
    z = random_video(1, 16, 3, 6, 6)
    tiled = vae.decode(z).sample
    assert tiled.shape == (1, 3, 12, 48, 48)
    vae.disable_tiling()
    first_tile = vae.decode(z[:, :, :, :4, :4]).sample
    assert torch.equal(tiled[..., :24, :24], first_tile[..., :24, :24])
    assert not torch.allclose(tiled, vae.decode(z).sample)


@torch.no_grad()
def test_slicing_matches_batched(vae):
    video = random_video(2, 3, 12, 32, 32)
    batched = vae.encode(video).latent_dist.parameters
    z = batched[:, :16]
    decoded = vae.decode(z).sample
    vae.enable_slicing()
    torch.testing.assert_close(vae.encode(video).latent_dist.parameters, batched, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(vae.decode(z).sample, decoded, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_bfloat16_smoke(vae):
    video = random_video(1, 3, 12, 32, 32)
    reference = vae.decode(vae.encode(video).latent_dist.mode()).sample
    vae_bf16 = tiny_vae().to(torch.bfloat16)
    latent = vae_bf16.encode(video.to(torch.bfloat16)).latent_dist.mode()
    decoded = vae_bf16.decode(latent).sample
    assert latent.dtype == decoded.dtype == torch.bfloat16
    assert torch.isfinite(decoded.float()).all()
    assert relative_max_error(decoded, reference) < 0.1


@torch.no_grad()
def test_group_offload_and_device_map_give_the_same_output(vae, tmp_path):
    video = random_video(1, 3, 12, 32, 32)
    reference = vae(video).sample
    offloaded = tiny_vae()
    cpu = torch.device("cpu")
    offloaded.enable_group_offload(
        onload_device=cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1
    )
    assert torch.equal(offloaded(video).sample, reference)

    vae.save_pretrained(tmp_path)
    # A tiny CPU budget sends whole transformer blocks (never split: _no_split_modules) to disk.
    mapped = AutoencoderMagi.from_pretrained(
        tmp_path, device_map="auto", max_memory={"cpu": "3MB"}, offload_folder=tmp_path / "offload"
    )
    assert "disk" in set(mapped.hf_device_map.values())
    assert torch.equal(mapped(video).sample, reference)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((3, 8, 32, 32), "must be a video"),
        ((1, 4, 8, 32, 32), "has 4 channels"),
        ((1, 3, 8, 36, 32), "multiples of 8"),
        ((1, 3, 14, 32, 32), r"14 frames.*\[12, 2\].*trim the video to 13"),
        ((1, 3, 6, 32, 32), r"6 frames.*trim the video to 4"),
    ],
)
def test_encode_rejects_inputs_it_cannot_take(vae, shape, match):
    with pytest.raises(ValueError, match=match):
        vae.encode(torch.zeros(shape))


def test_untiled_encode_rejects_frames_that_are_not_a_multiple_of_4(vae):
    vae.disable_tiling()
    with pytest.raises(ValueError, match=r"3 frames.*patch_size_t=4.*trim the video to 1"):
        vae.encode(torch.zeros(1, 3, 3, 32, 32))


@pytest.mark.parametrize("shape, match", [((16, 2, 4, 4), "must be latents"), ((1, 4, 2, 4, 4), "has 4 channels")])
def test_decode_rejects_wrong_latents(vae, shape, match):
    with pytest.raises(ValueError, match=match):
        vae.decode(torch.zeros(shape))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tile_sample_min_height": 36}, "tile_sample_min_height"),
        ({"tile_sample_min_num_frames": 10}, "tile_sample_min_num_frames"),
        ({"spatial_tile_overlap_factor": 1.0}, "spatial_tile_overlap_factor"),
        ({"tile_sample_min_width": 40}, "tile_sample_min_width`=40 with overlap 0.25"),
        ({"temporal_tile_overlap_factor": 0.25}, "tile_sample_min_num_frames`=12 with overlap 0.25"),
    ],
)
def test_enable_tiling_rejects_plans_that_misalign_tiles(vae, kwargs, match):
    with pytest.raises(ValueError, match=match):
        vae.enable_tiling(**kwargs)


def test_config_rejects_a_width_the_decoder_cannot_unpatchify():
    with pytest.raises(ValueError, match="multiple of patch_size_t"):
        AutoencoderMagi(num_attention_heads=2, attention_head_dim=64)
