"""Argument checks of the MAGI-1 pipelines that run before any heavy work, and the memory estimate of a request.

Plain functions, called from the pipelines' `check_inputs`: each raises a `TypeError` (wrong type) or a `ValueError`
(wrong value) naming the argument and what to pass instead, so that a bad request fails in microseconds instead of
after loading, allocating or denoising. `estimate_generation_memory` adds up what a generation allocates on its
execution device (latents, one transformer call's activations, the KV cache, one chunk's decode, and the weights
that offloading moves in, `weights_moved_in`) with the arithmetic of `benchmarks/memory_plan.py`, and
`check_generation_fits` refuses a request that cannot fit.
"""

import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np
import torch

GiB = 2**30


# ----------------------------------------------------------------------------------------------------------------
# Types and values
# ----------------------------------------------------------------------------------------------------------------
def _type_name(value: Any) -> str:
    return type(value).__name__


def check_int(value: Any, name: str, minimum: Optional[int] = None, allow_none: bool = False) -> None:
    """`value` must be an integer (a `bool` or a `float` such as `4.0` is not), at least `minimum`."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        hint = f" (e.g. {name}={int(value)})" if isinstance(value, float) and value.is_integer() else ""
        raise TypeError(f"`{name}` must be an int, got {value!r} ({_type_name(value)}){hint}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be at least {minimum}, got {value}.")


def check_bool(value: Any, name: str) -> bool:
    """`value` must be `True` or `False` (a string such as `"false"`, which is truthy, or a number is not); returns
    it."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r} ({_type_name(value)}).")
    return value


def check_float(value: Any, name: str, allow_none: bool = False) -> None:
    """`value` must be a finite real number (an int or a float; a `bool` or a string is not)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a float, got {value!r} ({_type_name(value)}).")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value}.")


def check_tensor(value: Any, name: str, allow_none: bool = True) -> None:
    """`value` must be a `torch.Tensor` (or `None` when allowed); a numpy array gets a hint."""
    if value is None and allow_none:
        return
    if isinstance(value, np.ndarray):
        raise TypeError(
            f"`{name}` must be a torch.Tensor, got a numpy array; pass torch.from_numpy({name}) (on the pipeline's "
            "device and dtype)."
        )
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {_type_name(value)}.")


def check_finite(value: Optional[torch.Tensor], name: str) -> None:
    """A `ValueError` naming `name` when the tensor holds NaN or infinite values (they would give black frames);
    `None` and meta tensors pass."""
    if value is None or value.is_meta or not (value.is_floating_point() or value.is_complex()):
        return
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(
            f"`{name}` holds {bad} non-finite value(s) (NaN or inf) out of {value.numel()}; they would propagate into "
            "every frame. Check how it was computed (e.g. a float16 overflow) before passing it."
        )


def check_generation_sizes(
    height: Any = None, width: Any = None, num_frames: Any = None, num_inference_steps: Any = None
) -> None:
    """Types and lower bounds of the size arguments (`None` means "use the default"). Divisibility depends on the
    model and is checked by the pipeline."""
    for name, value in (("height", height), ("width", width), ("num_frames", num_frames)):
        check_int(value, name, minimum=1, allow_none=True)
    check_int(num_inference_steps, "num_inference_steps", minimum=1, allow_none=True)


def check_num_videos_per_prompt(num_videos_per_prompt: Any) -> None:
    check_int(num_videos_per_prompt, "num_videos_per_prompt", minimum=1)


def check_generators(generator: Any, batch_size: int) -> None:
    """A `torch.Generator`, `None`, or a list of exactly `batch_size` generators (Diffusers' rule: one per video of
    the effective batch, `len(prompts) * num_videos_per_prompt`)."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, list):
        raise TypeError(f"`generator` must be a torch.Generator or a list of them, got {_type_name(generator)}.")
    if len(generator) != batch_size:
        raise ValueError(
            f"You have passed a list of generators of length {len(generator)}, but requested an effective batch size "
            f"of {batch_size}. Make sure the batch size matches the length of the generators."
        )
    for index, item in enumerate(generator):
        if not isinstance(item, torch.Generator):
            raise TypeError(f"`generator[{index}]` must be a torch.Generator, got {_type_name(item)}.")


def check_cfg_t_range(cfg_t_range: Optional[Sequence[Any]]) -> None:
    """Band edges of the guidance scales: finite numbers in `[0, 1]`, non-decreasing."""
    if cfg_t_range is None:
        return
    if isinstance(cfg_t_range, (str, bytes)) or not isinstance(cfg_t_range, Sequence):
        raise TypeError(f"`cfg_t_range` must be a list of floats, got {_type_name(cfg_t_range)}.")
    for index, edge in enumerate(cfg_t_range):
        check_float(edge, f"cfg_t_range[{index}]")
        if not 0.0 <= edge <= 1.0:
            raise ValueError(f"`cfg_t_range[{index}]` must lie in [0, 1] (time 0 = noise, 1 = clean), got {edge}.")
    if any(later < earlier for earlier, later in zip(cfg_t_range, cfg_t_range[1:])):
        raise ValueError(f"`cfg_t_range` must be non-decreasing, got {list(cfg_t_range)}.")


def check_scaling_factor(scaling_factor: Any) -> None:
    """The VAE's `scaling_factor`: latents are divided by it before decoding, so 0 or a non-finite value is an
    error."""
    check_float(scaling_factor, "vae.config.scaling_factor")
    if scaling_factor == 0:
        raise ValueError(
            "vae.config.scaling_factor is 0; latents are divided by it before decoding. MAGI-1's VAE uses 0.18215: "
            "fix the VAE folder's config.json."
        )


def check_prompt_embeds_length(
    prompt_embeds: Optional[torch.Tensor], text_length: int, name: str = "prompt_embeds"
) -> None:
    """`prompt_embeds` must be `(batch, text_length, dim)` (or per chunk `(batch, chunks, text_length, dim)`), with
    the transformer's caption length `text_length`."""
    if prompt_embeds is None:
        return
    check_tensor(prompt_embeds, name)
    if prompt_embeds.ndim not in (3, 4) or prompt_embeds.shape[-2] != text_length:
        raise ValueError(
            f"`{name}` must have shape (batch, {text_length}, text_dim) or (batch, chunks, {text_length}, text_dim): "
            f"the transformer's text_length is {text_length}; got {tuple(prompt_embeds.shape)}. Pad or cut the "
            f"encoder output to {text_length} tokens."
        )


def check_callback_outputs(
    callback_outputs: Any, callback_name: str, expected_shapes: Mapping[str, Sequence[int]]
) -> Dict[str, Any]:
    """What `callback_on_step_end` returned: a dict; any tensor it returns for a name in `expected_shapes` (e.g.
    `"latents"`) must keep that shape and be finite. Returns the dict."""
    if not isinstance(callback_outputs, dict):
        raise TypeError(
            f"`callback_on_step_end` ({callback_name}) must return a dict (of the tensors it changes, or {{}}), got "
            f"{_type_name(callback_outputs)}."
        )
    for key, shape in expected_shapes.items():
        if key not in callback_outputs:
            continue
        value = callback_outputs[key]
        check_tensor(value, f"callback_on_step_end()['{key}']", allow_none=False)
        if tuple(value.shape) != tuple(shape):
            raise ValueError(
                f"`callback_on_step_end` ({callback_name}) returned `{key}` of shape {tuple(value.shape)}; it must "
                f"keep the shape {tuple(shape)}."
            )
        check_finite(value, f"callback_on_step_end()['{key}']")
    return callback_outputs


# ----------------------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------------------
def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def tokens_per_chunk(
    transformer_config: Any, height: int, width: int, chunk_width: int = 6, vae_scale: int = 8
) -> int:
    """Transformer tokens of one latent chunk of a `height x width` video."""
    _, patch_h, patch_w = _get(transformer_config, "patch_size", (1, 2, 2))
    return chunk_width * (height // vae_scale // patch_h) * (width // vae_scale // patch_w)


def kv_chunk_bytes(transformer_config: Any, tokens: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Keys and values of one chunk of `tokens` tokens in all layers."""
    layers = _get(transformer_config, "num_layers")
    heads = _get(transformer_config, "num_key_value_heads")
    head_dim = _get(transformer_config, "attention_head_dim")
    return 2 * layers * tokens * heads * head_dim * dtype.itemsize


@dataclass
class GenerationMemoryEstimate:
    """Bytes a generation allocates on its execution device, by part (see `estimate_generation_memory`)."""

    latents: int
    transformer_activations: int
    attention_scores: int
    kv_cache: int
    decode: int
    weights: int

    @property
    def total(self) -> int:
        return (
            self.latents
            + self.transformer_activations
            + self.attention_scores
            + self.kv_cache
            + self.decode
            + self.weights
        )

    def describe(self) -> str:
        parts = {
            "latents": self.latents,
            "transformer activations": self.transformer_activations,
            "attention scores": self.attention_scores,
            "KV cache": self.kv_cache,
            "decode": self.decode,
            "weights moved in": self.weights,
        }
        return ", ".join(f"{name} {value / GiB:.2f} GiB" for name, value in parts.items() if value)


def estimate_generation_memory(
    transformer_config: Any,
    vae_config: Any,
    batch_size: int,
    height: int,
    width: int,
    window_chunks: int,
    kv_cache_chunks: int,
    dtype: torch.dtype = torch.bfloat16,
    num_chunks: int = 1,
    chunk_width: int = 6,
    guidance_branches: int = 1,
    fused_attention: bool = True,
    kv_cache_on_device: bool = True,
    weights_bytes: int = 0,
) -> GenerationMemoryEstimate:
    """Upper estimate of the bytes a generation allocates on its execution device.

    Args:
        transformer_config, vae_config: the models' configs (or dicts).
        batch_size (`int`): videos generated together (`len(prompts) * num_videos_per_prompt`).
        height, width (`int`): video size in pixels.
        window_chunks (`int`): chunks in flight in one transformer call (the scheduler's `window_size`, at most).
        kv_cache_chunks (`int`): the most clean chunks the KV cache holds (attention-range bound of the plan).
        dtype (`torch.dtype`): the transformer's compute dtype.
        num_chunks (`int`): chunks of the video (the latents of all of them live until the end).
        chunk_width (`int`): latent frames per chunk.
        guidance_branches (`int`): transformer passes per call (3 for three-branch guidance, 1 for distilled); they run
            one after the other, but each branch keeps its own KV cache.
        fused_attention (`bool`): whether attention runs a fused kernel (GPUs); otherwise (CPU math path) each chunk's
            `queries x keys` scores per head are materialised in float32.
        kv_cache_on_device (`bool`): `False` when the cache lives elsewhere (`kv_cache_device="cpu"`).
        weights_bytes (`int`): weights the call moves onto the device and holds there at once, beyond what is
            already allocated (`weights_moved_in`: 0 without offloading, where they are already there).

    The figures follow `benchmarks/memory_plan.py` (latents in float32; activations of one block with the FFN
    intermediate and the attention projections alive; the KV cache as kept by the plan; one chunk decoded, tiled).
    """
    hidden = _get(transformer_config, "hidden_size")
    ffn = _get(transformer_config, "ffn_dim")
    heads = _get(transformer_config, "num_attention_heads")
    head_dim = _get(transformer_config, "attention_head_dim")
    in_channels = _get(transformer_config, "in_channels")
    gated = bool(_get(transformer_config, "gated_linear_unit", False))
    latent_channels = _get(vae_config, "latent_channels", in_channels)
    scale = _get(vae_config, "patch_size", 8)
    item = dtype.itemsize

    tokens = tokens_per_chunk(transformer_config, height, width, chunk_width, scale)
    in_flight = batch_size * window_chunks * tokens
    latent_frame = latent_channels * (height // scale) * (width // scale)
    # every chunk's latents (float32) + the window's noise, model output and guidance branch outputs
    latents = 4 * batch_size * chunk_width * latent_frame * (num_chunks + window_chunks * (2 + guidance_branches))
    # one block: input, residual, norm, q/k/v, cross-attention q and output (~8 hidden-wide copies), FFN intermediate
    # (twice as wide when gated), the rotary tables (float32) and the text projection
    per_token = item * (8 * hidden + (3 if gated else 2) * ffn) + 4 * 2 * 3 * (head_dim // 8) * 2
    transformer_activations = in_flight * per_token
    keys_per_chunk = (kv_cache_chunks + window_chunks) * tokens
    attention_scores = 0 if fused_attention else batch_size * tokens * keys_per_chunk * heads * 4
    kv_cache = batch_size * guidance_branches * kv_cache_chunks * kv_chunk_bytes(transformer_config, tokens, dtype)
    if not kv_cache_on_device:  # one layer's keys and values are moved in at a time
        kv_cache //= max(_get(transformer_config, "num_layers"), 1)
    frames = chunk_width * _get(vae_config, "patch_size_t", 4)
    vae_dim = _get(vae_config, "num_attention_heads", 16) * _get(vae_config, "attention_head_dim", 64)
    tile_tokens = min(frames // 4 * (height // scale) * (width // scale), 3 * 32 * 32 * 4)
    # decoded frames (float32, before and after post-processing) + one tile through the ViT decoder
    decode = batch_size * (2 * frames * height * width * 3 * 4 + tile_tokens * vae_dim * item * 12)
    return GenerationMemoryEstimate(
        latents=latents,
        transformer_activations=transformer_activations,
        attention_scores=attention_scores,
        kv_cache=kv_cache,
        decode=decode,
        weights=weights_bytes,
    )


def available_memory(device: Union[str, torch.device]) -> int:
    """Bytes that can still be allocated on `device`: free accelerator memory (CUDA), or the available RAM (CPU,
    `psutil.virtual_memory().available`, else `MemAvailable` of /proc/meminfo)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    if device.type != "cpu":
        raise ValueError(f"available_memory knows CPU and CUDA devices, got {device}.")
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    raise RuntimeError("Cannot tell the available memory of this machine (no psutil, no /proc/meminfo).")


# ----------------------------------------------------------------------------------------------------------------
# Offloading: which weights a call moves onto the execution device
# ----------------------------------------------------------------------------------------------------------------
OFFLOADING_MODES = ("none", "model", "sequential", "group")


def _accelerate_hooks(module: torch.nn.Module) -> list:
    """accelerate's hooks on `module` itself (a `SequentialHook` unpacked)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", [hook]))


def _group_offloading_hooks(component: torch.nn.Module) -> list:
    """Diffusers' group offloading hooks of `component`'s modules (`enable_group_offload`), one per module."""
    hooks = []
    for module in component.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook("group_offloading") if registry is not None else None
        if hook is not None:
            hooks.append(hook)
    return hooks


def _component_offloading(component: torch.nn.Module) -> str:
    try:
        from accelerate.hooks import AlignDevicesHook, CpuOffload
    except ImportError:  # no accelerate, no accelerate hooks
        AlignDevicesHook = CpuOffload = ()
    if _group_offloading_hooks(component):
        return "group"
    if any(isinstance(hook, CpuOffload) for hook in _accelerate_hooks(component)):
        return "model"
    for module in component.modules():
        if any(isinstance(hook, AlignDevicesHook) and hook.offload for hook in _accelerate_hooks(module)):
            return "sequential"
    return "none"


def offloading_mode(components: Mapping[str, Any]) -> str:
    """The offloading the pipeline's `components` carry, read off their hooks: `"group"` (Diffusers' group offloading
    hooks, `enable_group_offload`), `"model"` (accelerate's `CpuOffload`, `enable_model_cpu_offload`), `"sequential"`
    (accelerate's `AlignDevicesHook` with offloaded weights, `enable_sequential_cpu_offload`), else `"none"` (a
    `device_map` placement moves nothing during a call)."""
    modes = {_component_offloading(module) for module in components.values() if isinstance(module, torch.nn.Module)}
    return next((mode for mode in OFFLOADING_MODES[1:] if mode in modes), "none")


def _on_device(tensor: torch.Tensor, device: torch.device) -> bool:
    return tensor.device.type == device.type and (device.index is None or tensor.device.index in (None, device.index))


def _bytes_off_device(tensors, device: torch.device) -> int:
    """Bytes of the distinct `tensors` that are not on `device` yet (a meta tensor counts its full size)."""
    unique = {id(tensor): tensor for tensor in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values() if not _on_device(t, device))


def _model_offload_bytes(components: Sequence[torch.nn.Module], device: torch.device) -> int:
    """accelerate's model offloading moves a model in when it runs and moves out only its predecessor in the chain
    (`model_cpu_offload_seq`). So the last model of the chain (the VAE) stays on the device from its first call to
    the end of the generation, while the models before it take turns: the transformer and the VAE are both there
    while chunks are denoised and decoded in turn. Moved in at once: the chain's last model(s) plus the largest of
    the others (only what is not on the device already)."""
    from accelerate.hooks import CpuOffload

    hooks = {id(component): hook for component in components for hook in _accelerate_hooks(component)}
    hooks = {key: hook for key, hook in hooks.items() if isinstance(hook, CpuOffload)}
    predecessors = {id(getattr(hook.prev_module_hook, "model", None)) for hook in hooks.values()}
    sizes = {id(c): _bytes_off_device([*c.parameters(), *c.buffers()], device) for c in components if id(c) in hooks}
    last = sum(size for key, size in sizes.items() if key not in predecessors)
    return last + max((size for key, size in sizes.items() if key in predecessors), default=0)


def _sequential_offload_bytes(component: torch.nn.Module, device: torch.device) -> int:
    """accelerate's sequential offloading keeps every module's own weights on the meta device and moves them in for
    that module's forward, so what is on the device at once is one module's weights and those of the modules it runs
    inside: the heaviest chain from the component down to a leaf."""

    def chain(module: torch.nn.Module) -> int:
        own = _bytes_off_device([*module.parameters(recurse=False), *module.buffers(recurse=False)], device)
        return own + max((chain(child) for child in module.children()), default=0)

    return chain(component)


def _group_offload_bytes(component: torch.nn.Module, device: torch.device) -> int:
    """Diffusers' group offloading moves one group (`num_blocks_per_group` blocks, or one leaf) in at a time, the next
    one as well while the current one runs when it prefetches with CUDA streams (`use_stream=True`); the group of the
    component's own top-level weights (embedders, norms, projections) stays in for the component's whole forward."""
    groups = {id(hook.group): hook for hook in _group_offloading_hooks(component)}
    resident, largest, prefetch = 0, 0, 1
    for hook in groups.values():
        group = hook.group
        tensors = [tensor for module in group.modules for tensor in (*module.parameters(), *module.buffers())]
        size = _bytes_off_device([*tensors, *group.parameters, *group.buffers], device)
        if group.offload_leader is component:
            resident += size
        else:
            largest = max(largest, size)
            prefetch = 2 if group.stream is not None else prefetch
    return resident + prefetch * largest


def weights_moved_in(components: Mapping[str, Any], device: Union[str, torch.device]) -> int:
    """Bytes of weights a call moves onto `device` and holds there at once, on top of what is already allocated.

    Why only these: `available_memory` measures what is still free, so weights already on `device` are outside it
    (CUDA's free memory excludes them; the CPU's available RAM excludes weights loaded into RAM) and must not be
    counted a second time. What offloading moves in during the call is not outside it yet:

    * no offloading: nothing (the weights stay where they are; on the execution device they are already allocated);
    * model offloading (`enable_model_cpu_offload`): whole models, the last of the offload sequence (the VAE) plus the
      largest of the others at once (see `_model_offload_bytes`);
    * sequential offloading (`enable_sequential_cpu_offload`): about one module's weights (the heaviest chain of
      nested modules);
    * group offloading (`enable_group_offload`): one group (two when prefetching with streams) plus the component's
      top-level weights.

    Components are not offloaded at the same time (they run one after the other), so the largest figure over them
    counts. Tensors already on `device` are left out in every mode, so offloading onto the CPU (whose weights already
    are in RAM) adds nothing.
    """
    device = torch.device(device)
    modules = [module for module in components.values() if isinstance(module, torch.nn.Module)]
    modes = {id(module): _component_offloading(module) for module in modules}
    model_offloaded = [module for module in modules if modes[id(module)] == "model"]
    sizes = [_model_offload_bytes(model_offloaded, device)] if model_offloaded else []
    for module in modules:
        if modes[id(module)] == "sequential":
            sizes.append(_sequential_offload_bytes(module, device))
        elif modes[id(module)] == "group":
            sizes.append(_group_offload_bytes(module, device))
    return max(sizes, default=0)


def check_generation_fits(
    estimate: Union[GenerationMemoryEstimate, int],
    device: Union[str, torch.device],
    offloading: str = "none",
    kv_cache_on_device: bool = True,
    allow_oversized: bool = False,
    limit_bytes: Optional[int] = None,
) -> None:
    """Refuse, before allocating, a request whose estimate exceeds what `device` has left.

    Args:
        estimate: `estimate_generation_memory(...)` or a byte count; its `weights` are those the call moves in
            (`weights_moved_in`).
        device: the execution device.
        offloading (`str`): the pipeline's offloading (`offloading_mode`: `"none"`, `"model"`, `"sequential"`,
            `"group"`); the advice names the offloading that would move less.
        kv_cache_on_device (`bool`): whether the KV cache lives on `device` (else `kv_cache_device='cpu'` is not
            advised again).
        allow_oversized (`bool`): skip the check (for experts who know better, e.g. with swap or unified memory).
        limit_bytes (`int`, *optional*): the limit to use instead of `available_memory(device)`.

    Raises:
        ValueError: giving the estimate (and its parts), the limit and every setting that lowers the estimate.
    """
    if offloading not in OFFLOADING_MODES:
        raise ValueError(f"`offloading` must be one of {OFFLOADING_MODES}, got {offloading!r}.")
    if allow_oversized:
        return
    total = estimate.total if isinstance(estimate, GenerationMemoryEstimate) else int(estimate)
    limit = available_memory(device) if limit_bytes is None else limit_bytes
    if total <= limit:
        return
    device = torch.device(device)
    where = "available RAM" if device.type == "cpu" else f"free memory on {device}"
    parts = f" ({estimate.describe()})" if isinstance(estimate, GenerationMemoryEstimate) else ""
    advice = [
        "a smaller height/width (memory grows with the pixels per chunk)",
        "a smaller num_frames (the latents of every chunk are kept to the end)",
        "fewer prompts or num_videos_per_prompt (the batch)",
    ]
    if device.type != "cpu":  # on the CPU, offloaded weights stay in the same RAM
        if kv_cache_on_device:
            advice.append("kv_cache_device='cpu'")
        if offloading == "none":
            advice.append(
                "offloading: pipe.enable_model_cpu_offload() (whole models in turn), or enable_group_offload(...) / "
                "enable_sequential_cpu_offload() (about one block at a time)"
            )
        elif offloading == "model":
            advice.append(
                "enable_group_offload(...) or enable_sequential_cpu_offload() instead of model offloading (which "
                "holds whole models on the device)"
            )
        elif offloading == "group":
            advice.append("group offloading with num_blocks_per_group=1, without use_stream")
    raise ValueError(
        f"This request needs about {total / GiB:.1f} GiB on {device}{parts}, but the {where} is "
        f"{limit / GiB:.1f} GiB (offloading: {offloading}). Use {'; '.join(advice)}; or pass allow_oversized=True to "
        "run it anyway."
    )
