"""Parity of MagiTransformer3DModel (+ MagiKVCache + MagiGuidance) with the original MAGI-1 code.

Cases a-d of `../shared/reference/dit/` (see its README): direct forward calls, a sequence of dispatcher calls sharing
one KV cache, three-branch guidance and the distilled one-branch path. Each recorded call is replayed in order and
every output must satisfy max|ours - reference| / max(1, max|reference|) <= 1e-4 in float32.
"""

import json
from functools import lru_cache

import pytest
import torch
from safetensors.torch import load_file

from diffusers_magi import MagiKVCache
from diffusers_magi.conversion import load_original_transformer
from diffusers_magi.pipelines.guidance_magi import MagiGuidance

from .conftest import relative_max_error

TOLERANCE = 1e-4


@lru_cache(maxsize=None)
def _transformer(reference_dir, name):
    checkpoint = reference_dir / "dit" / "checkpoints" / name
    return load_original_transformer(str(checkpoint / "config.json"), str(checkpoint))


class Case:
    """Inputs/outputs/description of one reference case."""

    def __init__(self, reference_dir, name):
        folder = reference_dir / "dit" / name
        self.inputs = load_file(str(folder / "inputs.safetensors"))
        self.outputs = load_file(str(folder / "outputs.safetensors"))
        self.description = json.loads((folder / "case.json").read_text())
        self.transformer = _transformer(reference_dir, self.description["checkpoint"]["load_dir"].split("/")[-1])
        self.tokens_per_chunk = 24  # 6 latent frames x (4/2) x (4/2) patches

    def calls(self):
        return self.description["calls"]

    def captions(self, call):
        """(rows, 800, C) captions and (rows, 800) masks of a call, from the caption bank."""
        rows = self.tensor(call["args"]["y_rows"])
        return self.inputs["caption_bank"][rows], self.inputs["mask_bank"][rows]

    def tensor(self, descriptor):
        return self.inputs[descriptor["key"]]

    def attention_starts(self, kv_range, slice_point):
        """Our `attention_chunk_starts` from the original's token `kv_range` (one row per chunk)."""
        starts = []
        for chunk, (start, end) in enumerate(kv_range.tolist()):
            assert end == (slice_point + chunk + 1) * self.tokens_per_chunk, "ranges always end at their own chunk"
            assert start % self.tokens_per_chunk == 0
            starts.append(start // self.tokens_per_chunk)
        return starts


def _step_size(kwargs):
    """Shortcut step size of distilled models, by the rule in the reference README: num_steps / 2, except for
    12 steps where it is 8 / distill_interval."""
    interval = kwargs["distill_interval"]["tensor0d"]
    return 8 / interval if kwargs["num_steps"] == 12 else kwargs["num_steps"] / 2


def _assert_close(ours, reference, what):
    error = relative_max_error(ours, reference)
    assert error <= TOLERANCE, f"{what}: relative max error {error:.3e} > {TOLERANCE}"


@pytest.mark.parametrize("call_index", [0, 1])
def test_a_forward_single_chunk(reference_dir, call_index):
    case = Case(reference_dir, "a_forward_single_chunk")
    call = case.calls()[call_index]
    captions, masks = case.captions(call)
    output = case.transformer(
        case.inputs["call0.x"],
        case.inputs["call0.t"],
        captions[None],
        masks[None],
        caption_dropped=case.tensor(call["args"]["caption_dropout_mask"]),
    ).sample
    _assert_close(output, case.outputs[f"call{call_index}.out"], f"call{call_index}.out")


def test_a_padding_tokens_have_no_influence(reference_dir):
    case = Case(reference_dir, "a_forward_single_chunk")
    captions, masks = case.captions(case.calls()[0])
    scrambled = torch.where(masks[..., None].bool(), captions, torch.randn_like(captions) * 10)
    args = (case.inputs["call0.x"], case.inputs["call0.t"])
    reference = case.transformer(*args, captions[None], masks[None]).sample
    output = case.transformer(*args, scrambled[None], masks[None]).sample
    assert torch.equal(output, reference)


@pytest.mark.parametrize("call_index", [0, 1, 2])
def test_b_forward_multi_chunk(reference_dir, call_index):
    case = Case(reference_dir, "b_forward_multi_chunk")
    call = case.calls()[call_index]
    args = call["args"]
    x, t = case.tensor(args["x"]), case.tensor(args["t"])
    captions, masks = case.captions(call)
    batch_size, num_chunks = t.shape
    captions = captions.reshape(batch_size, num_chunks, *captions.shape[1:])
    masks = masks.reshape(batch_size, num_chunks, -1)
    if batch_size > 1:  # batched layout: every element attends to its own chunk (the original uses kv_range[0])
        starts = case.attention_starts(case.tensor(args["kv_range"])[:1], 0)
    else:
        starts = case.attention_starts(case.tensor(args["kv_range"]), 0)
    output = case.transformer(
        x, t, captions, masks, attention_chunk_starts=starts, caption_dropped=case.tensor(args["caption_dropout_mask"])
    ).sample
    _assert_close(output, case.outputs[f"call{call_index}.out"], f"call{call_index}.out")


def test_b_chunk_causality(reference_dir):
    """Changing the last chunk must leave the outputs of the earlier chunks bit-identical."""
    case = Case(reference_dir, "b_forward_multi_chunk")
    x, t = case.inputs["call0.x"], case.inputs["call0.t"]
    captions, masks = case.captions(case.calls()[0])
    changed = x.clone()
    changed[:, :, 12:] = torch.randn_like(changed[:, :, 12:])
    outputs = [case.transformer(inp, t, captions[None], masks[None]).sample for inp in (x, changed)]
    assert torch.equal(outputs[0][:, :, :12], outputs[1][:, :, :12])
    assert not torch.equal(outputs[0][:, :, 12:], outputs[1][:, :, 12:])


def _replay_dispatcher_case(reference_dir, name, cached_calls=()):
    """Replay every dispatcher call of a case through MagiGuidance. Calls listed in `cached_calls` share one
    MagiKVCache (in order); every other call gets a fresh cache, as recorded."""
    case = Case(reference_dir, name)
    config = json.loads((reference_dir / "dit" / case.description["checkpoint"]["config"]).read_text())
    runtime, engine = config["runtime_config"], config["engine_config"]
    guidance = MagiGuidance(
        mode="distilled" if runtime["cfg_number"] == 1 else "three_branch",
        cfg_t_range=runtime["cfg_t_range"],
        prev_chunk_scales=runtime["prev_chunk_scales"],
        text_scales=runtime["text_scales"],
        nearly_clean_threshold=engine["distill_nearly_clean_chunk_threshold"],
    )
    transformer = case.transformer
    shared_cache = MagiKVCache(transformer.config.num_layers)
    for call in case.calls():
        index, kwargs, args = call["index"], call["kwargs"], call["args"]
        cache = shared_cache if index in cached_calls else MagiKVCache(transformer.config.num_layers)
        num_chunks = kwargs["denoising_range_num"]
        x = case.tensor(args["x"])[:1]
        t = case.tensor(args["timestep"])[:1]
        captions, masks = case.captions(call)
        prompt, negative = captions[:num_chunks][None], captions[num_chunks:][None]
        prompt_mask, negative_mask = masks[:num_chunks][None], masks[num_chunks:][None]
        starts = case.attention_starts(case.tensor(args["kv_range"]), kwargs["slice_point"])
        step_size = _step_size(kwargs) if engine["distill"] else None
        common = dict(first_chunk_index=kwargs["slice_point"], attention_chunk_starts=starts, step_size=step_size)
        reference = case.outputs[f"call{index}.out"][:1]

        if kwargs.get("extract_prefix_video_feature"):
            # The guided output of a prefix call is discarded by the sampler; it is still checked (without cache).
            velocity = guidance.predict_velocity(transformer, x, t, prompt, prompt_mask, negative, negative_mask, **common)
            _assert_close(velocity, reference, f"{name} call{index}.out")
            written = guidance.cache_clean_chunks(transformer, x, t, negative, negative_mask, kv_cache=cache, **common)
            writer = 1 if guidance.mode == "three_branch" else 0
            _assert_close(written, case.outputs[f"call{index}.inner{writer}.out"], f"{name} call{index} cache pass")
        else:
            num_clean = int(kwargs["fwd_extra_1st_chunk"])
            velocity = guidance.predict_velocity(
                transformer,
                x,
                t,
                prompt,
                prompt_mask,
                negative,
                negative_mask,
                kv_cache=cache,
                num_clean_chunks=num_clean,
                **common,
            )
            _assert_close(velocity, reference[:, :, 6 * num_clean :], f"{name} call{index}.out")
            nearly_clean = float(t[0, num_clean]) > guidance.nearly_clean_threshold
            assert nearly_clean == kwargs["distill_nearly_clean_chunk"]
        _check_cache_contents(case, index, cache)


def _check_cache_contents(case, index, cache):
    """Every chunk our cache holds equals the original's cache buffer rows for that chunk ([key | value])."""
    for layer in range(len(cache)):
        key = f"call{index}.kv_cache.layer{layer}"
        if key not in case.outputs:
            return
        buffer = case.outputs[key]
        tokens = case.tokens_per_chunk
        for chunk in cache.chunk_indices:
            keys, values = cache.layer(layer).read(chunk, chunk + 1, torch.device("cpu"))
            ours = torch.cat([keys[0], values[0]], dim=-1)
            _assert_close(ours, buffer[chunk * tokens : (chunk + 1) * tokens], f"{key} chunk {chunk}")


def test_c_dispatcher_kv_cache(reference_dir):
    _replay_dispatcher_case(reference_dir, "c_dispatcher_kv_cache", cached_calls=range(6))


def test_d_dispatcher_cfg3_base(reference_dir):
    _replay_dispatcher_case(reference_dir, "d_dispatcher_cfg3_base")


def test_d_guidance_mix_of_recorded_branches(reference_dir):
    """The three-branch mix, applied to the original's own branch outputs, gives the original's guided output."""
    case = Case(reference_dir, "d_dispatcher_cfg3_base")
    guidance = MagiGuidance()
    for call in case.calls():
        index = call["index"]
        t = case.tensor(call["args"]["timestep"])[:1]
        num_chunks = t.shape[1]
        cond, prev = case.outputs[f"call{index}.inner0.out"], case.outputs[f"call{index}.inner1.out"]
        uncond = case.outputs[f"call{index}.inner2.out"]  # (num_chunks, C, 6, H, W): chunks as batch elements
        uncond = uncond.unflatten(0, (1, num_chunks)).transpose(1, 2).flatten(2, 3)
        mixed = guidance.combine(cond, prev, uncond, t, chunk_frames=6)
        assert torch.equal(mixed, case.outputs[f"call{index}.out"][:1])


def test_d_dispatcher_cfg1_distill(reference_dir):
    _replay_dispatcher_case(reference_dir, "d_dispatcher_cfg1_distill", cached_calls=(5, 6))
