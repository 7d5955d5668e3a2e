"""Parity of MagiTransformer3DModel (+ MagiKVCache + MagiGuidance) with the original MAGI-1 code.

Every DiT case of the reference data (`tests/reference_data.py`: the full set or the in-repository subset) of kind
`dit_forward` (direct forward calls) or `dispatcher_sequence`
(guided calls, possibly sharing one KV cache) is replayed call by call; every output must satisfy
max|ours - reference| / max(1, max|reference|) <= 1e-4 in float32. fp8 checkpoints have their own tests.
"""

import pytest
import torch

from diffusers_magi import MagiGuidance, MagiKVCache

from .conftest import FULL_REFERENCE, relative_max_error
from .reference_cases import Case, attention_starts, dit_case_names, original_config, run_forward_call, step_size

TOLERANCE = 1e-4
FORWARD_CASES = dit_case_names("dit_forward")
DISPATCHER_CASES = dit_case_names("dispatcher_sequence")


def _assert_close(ours, reference, what):
    error = relative_max_error(ours, reference)
    assert error <= TOLERANCE, f"{what}: relative max error {error:.3e} > {TOLERANCE}"


def _distilled(case) -> bool:
    return bool(case.original_config["engine_config"]["distill"])


def test_reference_cases_are_found(reference_dir):
    assert "a_forward_single_chunk" in FORWARD_CASES and "c_dispatcher_kv_cache" in DISPATCHER_CASES
    if FULL_REFERENCE:
        assert "b_forward_multi_chunk" in FORWARD_CASES and "d_dispatcher_cfg1_distill" in DISPATCHER_CASES


@pytest.mark.parametrize("name", FORWARD_CASES)
def test_forward_case(reference_dir, name):
    """Direct `VideoDiTModel.forward` calls: (x, t, caption rows, key ranges, caption_dropout_mask)."""
    case = Case(name)
    for call in case.calls():
        output = run_forward_call(case, call, case.transformer)
        _assert_close(output, case.outputs[f"call{call['index']}.out"], f"{name} call{call['index']}")


def test_padding_tokens_have_no_influence(reference_dir):
    case = Case("a_forward_single_chunk")
    captions, masks = case.captions(case.calls()[0])
    scrambled = torch.where(masks[..., None].bool(), captions, torch.randn_like(captions) * 10)
    args = (case.inputs["call0.x"], case.inputs["call0.t"])
    reference = case.transformer(*args, captions[None], masks[None]).sample
    assert torch.equal(case.transformer(*args, scrambled[None], masks[None]).sample, reference)


def test_chunk_causality(reference_dir):
    """Changing the last chunk leaves the outputs of the earlier chunks bit-identical (three chunks at three times,
    the reference checkpoint and caption of case a)."""
    case = Case("a_forward_single_chunk")
    x, t = torch.randn(1, 16, 18, 4, 4), torch.tensor([[0.92, 0.55, 0.08]])
    captions, masks = (tensor.expand(3, *tensor.shape[1:]) for tensor in case.captions(case.calls()[0]))
    changed = x.clone()
    changed[:, :, 12:] = torch.randn_like(changed[:, :, 12:])
    outputs = [case.transformer(inp, t, captions[None], masks[None]).sample for inp in (x, changed)]
    assert torch.equal(outputs[0][:, :, :12], outputs[1][:, :, :12])
    assert not torch.equal(outputs[0][:, :, 12:], outputs[1][:, :, 12:])


def _guidance(case) -> MagiGuidance:
    runtime, engine = case.original_config["runtime_config"], case.original_config["engine_config"]
    return MagiGuidance(
        mode="distilled" if runtime["cfg_number"] == 1 else "three_branch",
        cfg_t_range=runtime["cfg_t_range"],
        prev_chunk_scales=runtime["prev_chunk_scales"],
        text_scales=runtime["text_scales"],
        nearly_clean_threshold=engine["distill_nearly_clean_chunk_threshold"],
    )


@pytest.mark.parametrize("name", DISPATCHER_CASES)
def test_dispatcher_case(reference_dir, name):
    """`forward_dispatcher` calls replayed through MagiGuidance, in order; calls that shared one InferenceParams in
    the original share one MagiKVCache here, every other call gets a fresh one."""
    case = Case(name)
    guidance = _guidance(case)
    transformer = case.transformer
    caches = {}
    for call in case.calls():
        index, kwargs, args = call["index"], call["kwargs"], call["args"]
        shared = tuple((args.get("inference_params") or {}).get("shared_by_calls", ()))
        cache = caches.setdefault(shared, MagiKVCache(transformer.config.num_layers)) if index in shared else (
            MagiKVCache(transformer.config.num_layers)
        )
        num_chunks = kwargs["denoising_range_num"]
        x, t = case.tensor(args["x"])[:1], case.tensor(args["timestep"])[:1]
        captions, masks = case.captions(call)  # rows: [caption rows of the chunks ; null rows of the chunks]
        prompt, negative = captions[:num_chunks][None], captions[num_chunks:][None]
        prompt_mask, negative_mask = masks[:num_chunks][None], masks[num_chunks:][None]
        tokens = case.tokens_per_chunk(x, num_chunks)
        common = dict(
            first_chunk_index=kwargs["slice_point"],
            attention_chunk_starts=attention_starts(case.tensor(args["kv_range"]), kwargs["slice_point"], tokens),
            step_size=step_size(kwargs) if _distilled(case) else None,
        )
        reference = case.outputs[f"call{index}.out"][:1]

        if kwargs.get("extract_prefix_video_feature"):
            # A prefix call's guided output is discarded by the sampler; check it too (without touching the cache),
            # then store the prefix with the pass that writes the cache.
            velocity = guidance.predict_velocity(transformer, x, t, prompt, prompt_mask, negative, negative_mask, **common)
            _assert_close(velocity, reference, f"{name} call{index}")
            written = guidance.cache_clean_chunks(transformer, x, t, negative, negative_mask, kv_cache=cache, **common)
            writer = 1 if guidance.mode == "three_branch" else 0
            _assert_close(written, case.outputs[f"call{index}.inner{writer}.out"], f"{name} call{index} cache pass")
        else:
            num_clean = int(kwargs["fwd_extra_1st_chunk"])
            velocity = guidance.predict_velocity(
                transformer, x, t, prompt, prompt_mask, negative, negative_mask, kv_cache=cache, num_clean_chunks=num_clean, **common
            )
            frames = x.shape[2] // num_chunks
            _assert_close(velocity, reference[:, :, frames * num_clean :], f"{name} call{index}")
            assert (float(t[0, num_clean]) > guidance.nearly_clean_threshold) == kwargs.get("distill_nearly_clean_chunk", False)
        _check_cache_contents(case, index, cache, tokens)


def _check_cache_contents(case, index, cache, tokens):
    """Every chunk our cache holds equals the original's cache buffer rows for that chunk ([key | value])."""
    for layer in range(len(cache)):
        key = f"call{index}.kv_cache.layer{layer}"
        if key not in case.outputs:
            return
        for chunk in cache.chunk_indices:
            keys, values = cache.layer(layer).read(chunk, chunk + 1, torch.device("cpu"))
            reference = case.outputs[key][chunk * tokens : (chunk + 1) * tokens]
            _assert_close(torch.cat([keys[0], values[0]], dim=-1), reference, f"{key} chunk {chunk}")


@pytest.mark.parametrize(
    "name", [name for name in DISPATCHER_CASES if original_config(name)["runtime_config"]["cfg_number"] == 3]
)
def test_guidance_mix_of_recorded_branches(reference_dir, name):
    """The three-branch mix applied to the original's own branch outputs gives the original's guided output, bit
    for bit (calls that re-run a clean first chunk pass that chunk through unguided, so they are left out)."""
    case = Case(name)
    guidance = _guidance(case)
    for call in case.calls():
        index = call["index"]
        if call["kwargs"].get("fwd_extra_1st_chunk"):
            continue
        t = case.tensor(call["args"]["timestep"])[:1]
        num_chunks = t.shape[1]
        cond, prev = case.outputs[f"call{index}.inner0.out"], case.outputs[f"call{index}.inner1.out"]
        uncond = case.outputs[f"call{index}.inner2.out"]  # (num_chunks, C, frames, H, W): chunks as batch elements
        uncond = uncond.unflatten(0, (1, num_chunks)).transpose(1, 2).flatten(2, 3)
        mixed = guidance.combine(cond, prev, uncond, t, chunk_frames=cond.shape[2] // num_chunks)
        assert torch.equal(mixed, case.outputs[f"call{index}.out"][:1])
