"""Run the original MAGI-1 inference code (a checkout of SandAI-org/MAGI-1) on the CPU, in float32, in one process.

The original imports CUDA-only packages and calls CUDA-only functions. `import_original(checkout)` makes its
`inference` package importable, `init_single_process()` sets up its parallel state as its own entry code does (here
with gloo and a world of one), and `cpu_runtime()` (entered around every call into the original) lets its DiT and
sampler run on the CPU. Nothing of the original is copied here; these are stand-ins for what it imports:

Stubbed while the original is imported, and only then (so nothing else in the process sees them):

* `flash_attn`: `flash_attn_func` -> PyTorch SDPA; `flash_attn_varlen_func` -> one SDPA per sequence of `cu_seqlens`
  (a sequence without keys gives zeros, as the kernel does); `layers.rotary.apply_rotary_emb` -> the rotate-half
  rotary embedding (not interleaved) in plain torch.
* `flashinfer`: `gemm.bmm_fp8` -> float32 batched matmul times both scales; `activation.silu_and_mul` -> silu(a) * b.
* `triton` / `triton.language`: enough for `@triton.jit` and `tl.constexpr` to import; no kernel is ever launched.

The text encoder module (`inference.model.t5`) and the `inference.pipeline` package's `__init__` (which imports the
VAE and video writing) are replaced by placeholders: they are not part of DiT sampling, so their dependencies (ftfy,
bs4, timm, ffmpeg) need not be installed. The original needs einops.

Patched in the original's modules, for good:

* `dit_module.range_mod_triton` (the Triton kernel behind `bias_modulate_add`) -> the same per-token gating (each
  token's row of gates picked by its condition index) in plain torch;
* `video_generate.SampleTransport` -> builds its tensors on the CPU instead of on `cuda:<current device>`;
* `video_generate.tqdm` -> no progress bar.

Patched while `cpu_runtime()` is active: `torch.cuda.current_device` -> `"cpu"`; `torch.cuda.get_device_capability`
-> (8, 0), the original's pre-Hopper path (the flash-attn kernels above rather than MagiAttention, which is not
installed either); `torch.cuda.synchronize` -> nothing; `Tensor.cuda` / `Module.cuda` -> no copy; `Tensor.to` maps a
CUDA device to the CPU; the warning of the original's `torch.autocast("cuda", float32)` blocks (inactive without
CUDA; in float32 they change nothing) is silenced.

The stand-ins are the plain torch operations diffusers-magi itself runs on the CPU (SDPA for attention, elementwise
rotary embedding and gating), so a timing compares the two implementations, not their kernels.
"""

import contextlib
import os
import subprocess
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch
import torch.nn.functional as F

ENTRY_FILE = Path("inference") / "pipeline" / "video_generate.py"
SPECIAL_TOKENS_FILE = Path("example") / "assets" / "special_tokens.npz"


def is_checkout(path) -> bool:
    """Whether `path` holds the original's inference code."""
    return (Path(path) / ENTRY_FILE).is_file()


def checkout_commit(path) -> str:
    """The git commit of the checkout, or a note saying it cannot be read."""
    try:
        result = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git work tree)"
    return result.stdout.strip()


# ---------------------------------------------------------------- stand-ins for the CUDA-only packages


def _sdpa(query, key, value):
    """flash-attn layout `(batch, tokens, heads, head_dim)` in and out; grouped-query when `key` has fewer heads."""
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), enable_gqa=query.shape[2] != key.shape[2]
    )
    return out.transpose(1, 2)


def flash_attn_func(q, k, v, deterministic=False):
    return _sdpa(q, k, v)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, deterministic=False):
    """Packed sequences `(tokens, heads, head_dim)`: sequence `i` is rows `cu_seqlens[i]:cu_seqlens[i + 1]`."""
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[2])
    query_bounds, key_bounds = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(query_bounds) - 1):
        (q_start, q_end), (k_start, k_end) = query_bounds[i : i + 2], key_bounds[i : i + 2]
        if k_end > k_start:
            out[q_start:q_end] = _sdpa(q[None, q_start:q_end], k[None, k_start:k_end], v[None, k_start:k_end])[0]
    return out


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False):
    """`x` `(batch, tokens, heads, head_dim)`; `cos`, `sin` `(tokens, rotary_dim / 2)`: the first `rotary_dim` channels
    rotate (first half paired with second half), the rest pass through."""
    if interleaved:
        raise NotImplementedError("only the non-interleaved rotary embedding is stubbed")
    half = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]
    first, second = x[..., :half], x[..., half : 2 * half]
    rotated = torch.cat([first * cos - second * sin, first * sin + second * cos, x[..., 2 * half :]], dim=-1)
    return rotated.to(x.dtype)


def bmm_fp8(a, b, a_scale, b_scale, dtype, out=None, backend=None):
    return (torch.bmm(a.float(), b.float()) * (a_scale.float()[0] * b_scale.float()[0])).to(dtype)


def silu_and_mul(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def range_mod(x, c_mapping, gatings):
    """`x` `(tokens, batch, hidden)` times, for each token, the row `c_mapping[token, batch]` of `gatings`
    `(batch, chunks, hidden)` flattened to `(batch * chunks, hidden)`."""
    return x * gatings.flatten(0, 1)[c_mapping]


def _module(name: str, **attributes) -> ModuleType:
    module = ModuleType(name)
    module.__dict__.update(attributes)
    return module


def _stub_modules() -> dict:
    rotary = _module("flash_attn.layers.rotary", apply_rotary_emb=apply_rotary_emb)
    layers = _module("flash_attn.layers", rotary=rotary)
    interface = _module("flash_attn.flash_attn_interface", flash_attn_func=flash_attn_func)
    flash_attn = _module(
        "flash_attn",
        flash_attn_func=flash_attn_func,
        flash_attn_varlen_func=flash_attn_varlen_func,
        flash_attn_interface=interface,
        layers=layers,
    )
    gemm = _module("flashinfer.gemm", bmm_fp8=bmm_fp8)
    activation = _module("flashinfer.activation", silu_and_mul=silu_and_mul)
    language = _module("triton.language", constexpr=int)
    triton = _module(
        "triton", jit=lambda function: function, next_power_of_2=lambda n: 1 << (n - 1).bit_length(), language=language
    )
    return {
        "flash_attn": flash_attn,
        "flash_attn.flash_attn_interface": interface,
        "flash_attn.layers": layers,
        "flash_attn.layers.rotary": rotary,
        "flashinfer": _module("flashinfer", gemm=gemm, activation=activation),
        "flashinfer.gemm": gemm,
        "flashinfer.activation": activation,
        "triton": triton,
        "triton.language": language,
    }


@contextlib.contextmanager
def _modules_in_place(modules: dict):
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


# ---------------------------------------------------------------- importing and running the original


def import_original(checkout, special_tokens_path=None) -> SimpleNamespace:
    """Import the original's DiT and sampler from `checkout` (see the module docstring); returns the names used.

    `special_tokens_path`: the `.npz` the original reads its special tokens from when imported (its
    `SPECIAL_TOKEN_PATH`); by default the checkout's `example/assets/special_tokens.npz` (4096 channels, the real T5's).
    """
    checkout = Path(checkout).resolve()
    if not is_checkout(checkout):
        raise ValueError(f"{checkout} has no {ENTRY_FILE}: not a checkout of SandAI-org/MAGI-1")
    special_tokens_path = Path(special_tokens_path or checkout / SPECIAL_TOKENS_FILE).resolve()
    os.environ["SPECIAL_TOKEN_PATH"] = str(special_tokens_path)
    sys.path.insert(0, str(checkout))
    placeholders = {
        "inference.pipeline": _module("inference.pipeline", __path__=[str(checkout / "inference" / "pipeline")]),
        "inference.model.t5": _module("inference.model.t5", T5Embedder=None),
    }
    sys.modules.update(placeholders)
    with _modules_in_place(_stub_modules()):
        from inference.common import MagiConfig, magi_logger
        from inference.infra.distributed import parallel_state
        from inference.model.dit import dit_model, dit_module
        from inference.pipeline import video_generate

    dit_module.range_mod_triton = range_mod

    class HostSampleTransport(video_generate.SampleTransport):
        def __init__(self, model, transport_inputs, device):
            super().__init__(model, transport_inputs, torch.device("cpu"))

    video_generate.SampleTransport = HostSampleTransport
    video_generate.tqdm = lambda *args, **kwargs: _NoProgress()
    return SimpleNamespace(
        MagiConfig=MagiConfig,
        VideoDiTModel=dit_model.VideoDiTModel,
        get_dit=dit_model.get_dit,
        generate_per_chunk=video_generate.generate_per_chunk,
        parallel_state=parallel_state,
        logger=magi_logger,
        special_tokens_path=special_tokens_path,
        commit=checkout_commit(checkout),
    )


class _NoProgress:
    def update(self, n=1):
        pass

    def close(self):
        pass


def init_single_process(original: SimpleNamespace, timeout_minutes: int = 15):
    """`torch.distributed` with gloo and a world of one, then the original's parallel state (cp = pp = 1), as its
    `dist_init` does on a GPU."""
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="gloo",
            store=torch.distributed.HashStore(),
            rank=0,
            world_size=1,
            timeout=timedelta(minutes=timeout_minutes),
        )
    if not original.parallel_state.model_parallel_is_initialized():
        original.parallel_state.initialize_model_parallel(
            cp_size=1,
            pp_size=1,
            nccl_communicator_config_path=None,
            distributed_timeout_minutes=timeout_minutes,
            order="tp-cp-pp-dp",
        )


def _host_device(device):
    if (isinstance(device, str) and device.startswith("cuda")) or (
        isinstance(device, torch.device) and device.type == "cuda"
    ):
        return torch.device("cpu")
    return device


@contextlib.contextmanager
def cpu_runtime():
    """The CUDA runtime calls of the original, answered on the CPU (see the module docstring)."""
    tensor_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args:
            args = (_host_device(args[0]),) + args[1:]
        if "device" in kwargs:
            kwargs["device"] = _host_device(kwargs["device"])
        return tensor_to(self, *args, **kwargs)

    patches = [
        (torch.cuda, "current_device", lambda: "cpu"),
        (torch.cuda, "get_device_capability", lambda device=None: (8, 0)),
        (torch.cuda, "synchronize", lambda device=None: None),
        (torch.Tensor, "cuda", lambda self, *args, **kwargs: self),
        (torch.nn.Module, "cuda", lambda self, device=None: self),
        (torch.Tensor, "to", to),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*CUDA is not available.*Disabling autocast")
            yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
