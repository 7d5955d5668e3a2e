"""Memory plan of MAGI-1 with diffusers-magi: bytes per component, peak accelerator memory of each offload mode at
480p and 720p, and the recipes for one 24 GB GPU and for 24B on 2-8 GPUs. `docs/memory.md` quotes its output.

Everything is computed, nothing is typed in:

* **Weights**: the parameters of each component, built on the meta device at the real shapes. Transformer blocks in
  bfloat16 with the modules MAGI-1 keeps in float32 (`_keep_in_fp32_modules`); the fp8 checkpoints as they load
  (`fp8_layers`: `MagiFp8Linear`s with one byte per weight and float32 scales in every block but the first and the
  last). T5-XXL encoder and VAE in bfloat16.
* **Activations**: one transformer block, one VAE chunk decode and the T5 encoder run on the meta device under a
  dispatch mode that adds up the bytes of live tensors (the block at the token count of each planned call, T5 at 800
  tokens). Attention of the transformer and the VAE counts as a fused kernel (FlashAttention / cuDNN / memory-efficient SDPA: it allocates its
  output only), which is what GPUs run; the math fallback would add `tokens x keys` scores per head. The fp8 rows use
  the bfloat16 block's activations (the float8 copies of a quantised linear's input are transient and smaller).
* **KV cache**: the chunks the scheduler's plan keeps at its fullest (`MagiKVCache` drops chunks no later call reads)
  times the bytes of one chunk's keys and values in all layers.

A transformer call with `n` chunks in flight holds the block input and the rotary embedding for all its tokens, plus
the peak inside one block; three-branch guidance runs its passes one after the other at batch 1, so it has the peak of
one pass. Figures are GiB (2**30 bytes) and leave out the CUDA context (~0.5 GiB) and allocator fragmentation.

    python benchmarks/memory_plan.py                              # the real 4.5B and 24B shapes (about a minute)
    python benchmarks/memory_plan.py --update-doc docs/memory.md  # rewrite the generated part of the doc
    python benchmarks/memory_plan.py --small                      # a toy configuration (what most tests run)
"""

import argparse
import contextlib
import dataclasses
import math
import pathlib
import types
import weakref
from typing import Dict, List, Optional, Sequence

import torch
from diffusers.models.attention_dispatch import AttentionBackendName
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from diffusers_magi import AutoencoderMagi, MagiChunkScheduler, MagiTransformer3DModel
from diffusers_magi.models import attention_magi, autoencoder_magi
from diffusers_magi.models.attention_magi import ChunkAttentionLayout
from diffusers_magi.models.context_parallel_magi import SequenceShards
from diffusers_magi.models.kv_cache_magi import MagiKVCacheLayer
from diffusers_magi.pipelines import input_checks_magi

GiB = 2**30
DTYPE = torch.bfloat16

TRANSFORMERS = {
    "4.5B": {},  # the defaults of MagiTransformer3DModel
    "24B": dict(
        num_layers=48,
        hidden_size=6144,
        num_attention_heads=48,
        num_key_value_heads=8,
        attention_head_dim=128,
        ffn_dim=16384,
        gated_linear_unit=True,
        in_channels=32,
        out_channels=32,
        half_channel_vae=True,
        condition_dim=1536,
        cross_attention_dim=6144,
        x_rescale_factor=0.1,
    ),
}
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")
RESOLUTIONS = {"480p": (480, 848), "720p (square)": (720, 720), "720p": (720, 1280)}
TEXT_TOKENS = 800

SMALL_TRANSFORMERS = {
    "tiny": dict(
        num_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, attention_head_dim=16, ffn_dim=128,
        text_dim=32, text_length=40, condition_dim=16, cross_attention_dim=64,
    )
}
SMALL_T5 = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu")
SMALL_VAE = dict(num_attention_heads=4, attention_head_dim=64, num_layers=1)
SMALL_RESOLUTIONS = {"toy": (64, 64)}


# ----------------------------------------------------------------------------------------------------------------
# Counting live tensor bytes
# ----------------------------------------------------------------------------------------------------------------
class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensors allocated under this mode that are alive at the same time.

    Views allocate nothing (they share their base's storage), and the storages of `existing` tensors (weights,
    inputs) are never counted, even when an operation returns a view of them (`linear` on the meta device returns
    the transposed weight, for instance)."""

    def __init__(self, existing: Sequence[torch.Tensor] = ()):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen = WeakIdKeyDictionary()
        for tensor in existing:
            self._seen[tensor.untyped_storage()] = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        if func.is_view:
            return output
        for tensor in torch.utils._pytree.tree_leaves(output):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage not in self._seen:
                    self._seen[storage] = nbytes = storage.nbytes()
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, nbytes)
        return output


def _existing(module: torch.nn.Module, *tensors) -> List[torch.Tensor]:
    return [*module.parameters(), *module.buffers(), *[t for t in tensors if isinstance(t, torch.Tensor)]]


def _fused_attention(query, key, value, attn_mask=None, enable_gqa=False, backend=None, parallel_config=None, **_):
    """What a fused attention kernel allocates: its output `(batch, queries, heads, value_dim)`."""
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def _all_to_all_stand_in(degree: int, gather: bool):
    """The allocations of the Ulysses exchanges (a contiguous send buffer and the received tensor), without the
    communication."""

    def exchange(tensor, shards, group):
        batch, tokens, heads, head_dim = tensor.shape
        send = tensor.new_empty(tensor.shape)
        if gather:
            received = tensor.new_empty((sum(shards.sizes), batch, heads // degree, head_dim)).permute(1, 0, 2, 3)
        else:
            received = tensor.new_empty((batch, shards.sizes[shards.rank], heads * degree, head_dim))
        del send
        return received

    return exchange


@contextlib.contextmanager
def _patched(module, **replacements):
    originals = {name: getattr(module, name) for name in replacements}
    for name, value in replacements.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in originals.items():
            setattr(module, name, value)


# ----------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------
def _keeps_fp32(model, name: str) -> bool:
    return any(keep in name.split(".") for keep in model._keep_in_fp32_modules or ())


def meta_model(cls, **config):
    """`cls(**config)` on the meta device, in bfloat16 except the modules it keeps in float32 (as `from_pretrained`
    with `dtype=torch.bfloat16` loads it; integer tensors such as float8 weight bytes stay as they are).

    Its attention runs on PyTorch SDPA (the default backend, which masks caption padding), whatever backend another
    model has made the active one: the plan must not depend on what ran before it."""
    with torch.device("meta"):
        model = cls(**config)
    for name, parameter in model.named_parameters():
        if parameter.is_floating_point() and not _keeps_fp32(model, name):
            parameter.data = parameter.data.to(DTYPE)
    for module in model.modules():
        if isinstance(getattr(module, "processor", None), attention_magi.MagiAttnProcessor):
            module.processor._attention_backend = AttentionBackendName.NATIVE
    return model.eval()


def transformer_bytes(model: MagiTransformer3DModel) -> Dict[str, int]:
    """Bytes of the transformer's weights: in total, in its largest block, outside the blocks, and its largest
    layer (the unit of leaf-level offloading)."""
    sizes = {name: parameter.numel() * parameter.element_size() for name, parameter in model.named_parameters()}
    blocks = [sum(size for name, size in sizes.items() if name.startswith(f"blocks.{i}.")) for i in range(model.config.num_layers)]
    layers = {}
    for name, size in sizes.items():
        layers[name.rsplit(".", 1)[0]] = layers.get(name.rsplit(".", 1)[0], 0) + size
    return {
        "total": sum(sizes.values()),
        "block": max(blocks),
        "outside_blocks": sum(sizes.values()) - sum(blocks),
        "largest_layer": max(layers.values()),
    }


def _module_bytes(module: torch.nn.Module) -> Dict[str, int]:
    blocks = [child for child in module.modules() if isinstance(child, torch.nn.ModuleList)]
    block_bytes = [sum(p.numel() for p in block.parameters()) * DTYPE.itemsize for blocks_ in blocks for block in blocks_]
    layers = [sum(p.numel() for p in m.parameters(recurse=False)) * DTYPE.itemsize for m in module.modules()]
    total = sum(p.numel() for p in module.parameters()) * DTYPE.itemsize
    return {"total": total, "block": max(block_bytes), "outside_blocks": total - sum(block_bytes), "largest_layer": max(layers)}


def _t5_config(small: bool):
    from transformers import T5Config

    return T5Config(**(SMALL_T5 if small else T5_XXL), tie_word_embeddings=False, dropout_rate=0.0)


def t5_bytes(small: bool) -> Dict[str, int]:
    from transformers import T5EncoderModel

    with torch.device("meta"):
        return _module_bytes(T5EncoderModel(_t5_config(small)))


def vae_bytes(small: bool) -> Dict[str, int]:
    return _module_bytes(meta_model(AutoencoderMagi, **(SMALL_VAE if small else {})))


# ----------------------------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------------------------
def tokens_per_chunk(model_config: dict, height: int, width: int, chunk_width: int = 6) -> int:
    """Tokens of one latent chunk (the arithmetic the pipelines' memory check uses)."""
    return input_checks_magi.tokens_per_chunk(model_config, height, width, chunk_width)


def transformer_call_bytes(
    model: MagiTransformer3DModel, tokens: int, num_chunks: int, cached_chunks: int, cp_degree: int = 1
) -> int:
    """Peak activation bytes of one transformer call (batch 1) with `num_chunks` chunks of `tokens` tokens in flight,
    attending to `cached_chunks` chunks of the KV cache, on one of `cp_degree` context-parallel processes."""
    config = model.config
    block = model.blocks[0]
    total = num_chunks * tokens
    local = math.ceil(total / cp_degree)
    shards = SequenceShards((local,) * cp_degree, 0) if cp_degree > 1 else None
    layout = ChunkAttentionLayout(tokens, cached_chunks, tuple([0] * num_chunks), shards=shards)
    meta = dict(device="meta", dtype=DTYPE)
    hidden = torch.empty(1, local, config.hidden_size, **meta)
    condition = torch.empty(1, num_chunks, config.condition_dim, **meta)
    rotary = tuple(torch.empty(local, 3 * (config.attention_head_dim // 8), device="meta") for _ in range(2))
    # Captions are padded to `text_length` (the padding masked in cross-attention), as the model computes them.
    text = torch.empty(1, num_chunks, config.text_length, config.cross_attention_dim, **meta)
    text_mask = torch.ones(1, num_chunks, config.text_length, dtype=torch.bool, device="meta")
    cache = MagiKVCacheLayer()
    if cached_chunks:
        kv_heads = config.num_key_value_heads // cp_degree
        keys = torch.empty(1, cached_chunks * tokens, kv_heads, config.attention_head_dim, **meta)
        cache.write(0, keys, keys, cached_chunks)
    processor = block.attn.processor
    processor._parallel_config = (
        types.SimpleNamespace(context_parallel_config=types.SimpleNamespace(_ulysses_mesh=types.SimpleNamespace(get_group=lambda: None)))
        if cp_degree > 1
        else None
    )
    exchanges = dict(
        gather_sequence_scatter_heads=_all_to_all_stand_in(cp_degree, gather=True),
        scatter_sequence_gather_heads=_all_to_all_stand_in(cp_degree, gather=False),
    )
    counter = LiveTensorBytes(_existing(block, hidden, condition, *rotary, text, text_mask))
    try:
        with _patched(attention_magi, dispatch_attention_fn=_fused_attention, **exchanges), torch.no_grad(), counter:
            block(hidden, condition, rotary, layout, text, text_mask, cache)
    finally:
        processor._parallel_config = None
    # Alive across the blocks: the block input (the previous block's output) and the rotary embedding.
    across_blocks = hidden.numel() * DTYPE.itemsize + 2 * rotary[0].numel() * 4
    return counter.peak + across_blocks


def vae_decode_bytes(vae: AutoencoderMagi, height: int, width: int) -> int:
    """Peak activation bytes of decoding one chunk (6 latent frames, tiled as the pipelines decode)."""
    latents = torch.empty(1, vae.config.latent_channels, 6, height // 8, width // 8, device="meta", dtype=DTYPE)
    counter = LiveTensorBytes(_existing(vae, latents))
    with _patched(autoencoder_magi, dispatch_attention_fn=_fused_attention), torch.no_grad(), counter:
        vae.decode(latents)
    return counter.peak


def t5_encode_bytes(small: bool) -> int:
    """Peak activation bytes of encoding one 800-token prompt (on the meta device, without the padding mask, which
    only adds `800 x 800` booleans)."""
    from transformers import T5EncoderModel

    model = meta_model(T5EncoderModel, config=_t5_config(small))
    input_ids = torch.zeros(1, TEXT_TOKENS, dtype=torch.long, device="meta")
    counter = LiveTensorBytes(_existing(model, input_ids))
    with torch.no_grad(), counter:
        model(input_ids=input_ids)
    return counter.peak


# ----------------------------------------------------------------------------------------------------------------
# The scheduler's plan: chunks in flight, chunks read from and held in the KV cache
# ----------------------------------------------------------------------------------------------------------------
def plan_shapes(num_chunks: int = 16, steps: int = 64) -> Dict[str, object]:
    """The `(chunks in flight, chunks read from the cache)` pairs of a generation's calls and the most chunks the
    KV cache holds at once, with MagiChunkScheduler's (the original's) defaults."""
    scheduler = MagiChunkScheduler()
    scheduler.set_timesteps(steps, num_chunks, 0)
    held, most_held, calls = set(), 0, set()
    for call in scheduler.plan:
        calls.add((call.num_chunks, call.first_chunk - min(call.attention_starts)))
        held.update(range(call.first_chunk, call.first_chunk + call.num_clean_chunks))
        most_held = max(most_held, len(held))
        held = {chunk for chunk in held if chunk >= call.forget_chunks_before}
    return {"calls": sorted(calls), "cache_chunks": most_held}


def kv_chunk_bytes(model: MagiTransformer3DModel, tokens: int, dtype: torch.dtype = DTYPE) -> int:
    """Keys and values of one chunk in all layers (the arithmetic the pipelines' memory check uses)."""
    return input_checks_magi.kv_chunk_bytes(model.config, tokens, dtype)


# ----------------------------------------------------------------------------------------------------------------
# Peaks per offload mode
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Phase:
    """Accelerator memory of one phase of a generation: resident weights and the phase's activations."""

    weights: Dict[str, int]  # component -> bytes of its weights that the phase keeps on the accelerator
    activations: int

    @property
    def total(self) -> int:
        return sum(self.weights.values()) + self.activations


def offload_peaks(weights: Dict[str, Dict[str, int]], activations: Dict[str, int], kv_cache: int, kv_read: int) -> Dict[str, int]:
    """Peak bytes of a generation for each offload mode. `weights[component]` as from `transformer_bytes`;
    `activations[component]` the peak of its phase (encode, transformer call, decode); `kv_cache` the bytes of the
    fullest cache; `kv_read` the bytes one layer moves in per call when the cache lives on the CPU."""
    components = ("text_encoder", "transformer", "vae")

    def phases(resident, kv_on_device: bool, streamed: Optional[str] = None):
        result = []
        for component in components:
            weights_now = {name: resident(name, name == component) for name in components}
            cache = kv_cache if kv_on_device and component != "text_encoder" else (kv_read if component == "transformer" else 0)
            result.append(Phase(weights_now, activations[component] + cache))
        return max(phase.total for phase in result)

    full = lambda name, active: weights[name]["total"]  # noqa: E731
    one_at_a_time = lambda name, active: weights[name]["total"] if active else 0  # noqa: E731
    # Group offloading with CUDA streams keeps a block and the prefetched next one, plus what lies outside blocks.
    block_level = lambda name, active: (weights[name]["outside_blocks"] + 2 * weights[name]["block"]) if active else 0  # noqa: E731
    leaf_level = lambda name, active: 2 * weights[name]["largest_layer"] if active else 0  # noqa: E731
    sequential = lambda name, active: weights[name]["largest_layer"] if active else 0  # noqa: E731
    return {
        "no offloading": phases(full, True),
        "model offload": phases(one_at_a_time, True),
        "model offload + KV cache on CPU": phases(one_at_a_time, False),
        "group offload, block level (streams) + KV on CPU": phases(block_level, False),
        "group offload, leaf level (streams) + KV on CPU": phases(leaf_level, False),
        "sequential offload + KV on CPU": phases(sequential, False),
    }


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------
def _gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def build_plan(small: bool = False) -> dict:
    """Everything the report prints, as numbers."""
    transformers_ = SMALL_TRANSFORMERS if small else TRANSFORMERS
    resolutions = SMALL_RESOLUTIONS if small else RESOLUTIONS
    shapes = plan_shapes()
    vae = meta_model(AutoencoderMagi, **(SMALL_VAE if small else {}))
    plan = {
        "plan": shapes,
        "t5": t5_bytes(small),
        "t5_encode": t5_encode_bytes(small),
        "vae": vae_bytes(small),
        "vae_decode": {name: vae_decode_bytes(vae, *size) for name, size in resolutions.items()},
        "models": {},
    }
    for name, overrides in transformers_.items():
        model = meta_model(MagiTransformer3DModel, **overrides)
        num_layers = model.config.num_layers
        fp8_model = meta_model(MagiTransformer3DModel, fp8_layers=list(range(1, num_layers - 1)), **overrides)
        entry = {"bf16": transformer_bytes(model), "fp8": transformer_bytes(fp8_model), "resolutions": {}}
        for resolution, (height, width) in resolutions.items():
            tokens = tokens_per_chunk(model.config, height, width)
            calls = {
                degree: max(transformer_call_bytes(model, tokens, n, cached, degree) for n, cached in shapes["calls"])
                for degree in ((1, 2, 4, 8) if model.config.num_key_value_heads % 8 == 0 else (1, 2))
            }
            entry["resolutions"][resolution] = {
                "tokens_per_chunk": tokens,
                "call": calls,
                "kv_cache": shapes["cache_chunks"] * kv_chunk_bytes(model, tokens),
                "kv_read": max(cached for _, cached in shapes["calls"]) * kv_chunk_bytes(model, tokens) // model.config.num_layers,
            }
        plan["models"][name] = entry
    return plan


def peaks_for(plan: dict, model: str, precision: str, resolution: str) -> Dict[str, int]:
    entry = plan["models"][model]
    at = entry["resolutions"][resolution]
    weights = {"text_encoder": plan["t5"], "transformer": entry[precision], "vae": plan["vae"]}
    activations = {"text_encoder": plan["t5_encode"], "transformer": at["call"][1], "vae": plan["vae_decode"][resolution]}
    return offload_peaks(weights, activations, at["kv_cache"], at["kv_read"])


def multi_gpu_options(plan: dict, model: str, precision: str, resolution: str, gpus: int) -> Dict[str, int]:
    """Per-GPU peak of running the transformer on `gpus` GPUs (T5 and the VAE placed with model offloading on GPU 0,
    so they add their own phase, never at the same time as the transformer)."""
    entry = plan["models"][model]
    at = entry["resolutions"][resolution]
    weights = entry[precision]
    others = max(plan["t5"]["total"] + plan["t5_encode"], plan["vae"]["total"] + plan["vae_decode"][resolution])
    options = {}
    if gpus in at["call"]:
        call = at["call"][gpus]
        kv = at["kv_cache"] // gpus
        options[f"context parallel x{gpus} (weights on every GPU)"] = max(weights["total"] + call + kv, others)
        streamed = weights["outside_blocks"] + 2 * weights["block"]
        options[f"context parallel x{gpus} + block-level group offload"] = max(streamed + call + at["kv_read"] // gpus, others)
    # device_map="auto": whole blocks spread over the GPUs; each GPU holds its share of weights and cache, and the
    # activations of a call on whichever GPU runs the current block.
    options[f'device_map="auto" over {gpus} GPUs'] = max(
        math.ceil(weights["total"] / gpus) + weights["block"] + at["call"][1] + at["kv_cache"] // gpus, others
    )
    return options


def report(plan: dict, small: bool = False) -> str:
    lines = []
    shapes = plan["plan"]
    lines.append(
        f"Plan (MagiChunkScheduler defaults, 16 chunks): calls have (chunks in flight, cached chunks read) in "
        f"{shapes['calls']}; the KV cache holds at most {shapes['cache_chunks']} chunk(s)."
    )
    rows = [["T5-XXL encoder (bf16)", _gib(plan["t5"]["total"]), _gib(plan["t5"]["block"]), "-"]]
    for name, entry in plan["models"].items():
        for precision in ("bf16", "fp8"):
            weights = entry[precision]
            rows.append([f"transformer {name} ({precision})", _gib(weights["total"]), _gib(weights["block"]), _gib(weights["outside_blocks"])])
    rows.append(["VAE (bf16)", _gib(plan["vae"]["total"]), _gib(plan["vae"]["block"]), "-"])
    lines += ["", "### Weights (GiB)", "", _table(["component", "total", "largest block", "outside blocks"], rows)]

    resolutions = list(plan["vae_decode"])
    rows = []
    for name, entry in plan["models"].items():
        for resolution in resolutions:
            at = entry["resolutions"][resolution]
            rows.append([name, resolution, at["tokens_per_chunk"], _gib(at["call"][1]), _gib(at["kv_cache"])])
    lines += [
        "",
        "### Activations and KV cache (GiB, batch 1)",
        "",
        f"T5 encode: {_gib(plan['t5_encode'])}; VAE decode of one chunk: "
        + ", ".join(f"{r} {_gib(b)}" for r, b in plan["vae_decode"].items()),
        "",
        _table(["transformer", "resolution", "tokens/chunk", "peak of a call", "KV cache (fullest)"], rows),
    ]

    for name, entry in plan["models"].items():
        rows = []
        modes = None
        for precision in ("bf16", "fp8"):
            for resolution in resolutions:
                peaks = peaks_for(plan, name, precision, resolution)
                modes = list(peaks)
                rows.append([precision, resolution, *(_gib(value) for value in peaks.values())])
        lines += ["", f"### Peak accelerator memory, {name} (GiB, one GPU)", "", _table(["weights", "resolution", *modes], rows)]

    if not small:
        lines += ["", "### Recipes", ""]
        lines += _recipes(plan)
    return "\n".join(lines)


# A "24 GB" card (RTX 3090/4090) has 24e9 bytes; keep 1 GiB for the CUDA context and the allocator's fragmentation.
GPU_24GB = 24e9 - GiB


def _recipes(plan: dict) -> List[str]:
    lines = []
    for resolution in ("720p (square)", "720p"):
        peaks = peaks_for(plan, "4.5B", "bf16", resolution)
        fitting = [mode for mode, value in peaks.items() if value <= GPU_24GB]
        lines.append(
            f"* 24 GB GPU ({_gib(GPU_24GB)} GiB usable), 4.5B distill, {resolution}: "
            + "; ".join(f"{mode} {_gib(value)}" + ("" if value <= GPU_24GB else " (too big)") for mode, value in peaks.items())
            + f". Least offloading that fits: **{fitting[0] if fitting else 'none'}**."
        )
    for gpus in (2, 4, 8):
        for precision in ("bf16", "fp8"):
            options = multi_gpu_options(plan, "24B", precision, "720p", gpus)
            weights = plan["models"]["24B"][precision]["total"]
            lines.append(
                f"* 24B ({precision}), 720p, {gpus} GPUs, per-GPU peak: "
                + "; ".join(f"{option} {_gib(value)}" for option, value in options.items())
                + f" (with group offload every process keeps a CPU copy of the weights: {_gib(gpus * weights)} GiB of "
                "host RAM in all)"
            )
    return lines


DOC_BEGIN = "<!-- generated by benchmarks/memory_plan.py: begin -->"
DOC_END = "<!-- generated by benchmarks/memory_plan.py: end -->"


def generated_part(doc: str) -> str:
    """The text between the generated-part markers of a doc."""
    return doc.split(DOC_BEGIN, 1)[1].split(DOC_END, 1)[0].strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a toy configuration instead of the real shapes")
    parser.add_argument("--update-doc", type=pathlib.Path, help="write the report between the markers of this file")
    args = parser.parse_args()
    text = report(build_plan(small=args.small), small=args.small)
    if args.update_doc is not None:
        doc = args.update_doc.read_text()
        before, after = doc.split(DOC_BEGIN, 1)[0], doc.split(DOC_END, 1)[1]
        args.update_doc.write_text(f"{before}{DOC_BEGIN}\n{text}\n{DOC_END}{after}")
    print(f"MAGI-1 memory plan ({'toy configuration' if args.small else 'real 4.5B / 24B shapes'}, bfloat16, torch {torch.__version__})")
    print(text)


if __name__ == "__main__":
    main()
