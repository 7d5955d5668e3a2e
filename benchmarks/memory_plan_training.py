"""Memory plan of LoRA training with `magi-train-lora`: accelerator bytes of the frozen weights, the LoRA (parameters,
gradients, optimizer states) and the activations of one training call, with and without gradient checkpointing, at
480p. `docs/training.md` quotes its output.

Computed, nothing typed in (the tools of `memory_plan.py`):

* **Weights**: the transformer on the meta device at the real shapes, bfloat16 except the modules kept in float32.
  T5 and the VAE are not on the accelerator while training: latents and captions come from the cache.
* **LoRA**: rank `r` on the default target modules (`to_q, to_k, to_v, to_cross_q, to_cross_kv, to_out, linear_in,
  linear_out` of every block): `r * (in + out)` float32 parameters per linear, their float32 gradients, and AdamW's two
  float32 moments (8-bit Adam: two bytes per parameter).
* **Activations**: one block with the LoRA injected runs forward and backward on the meta device under a dispatch mode
  that adds up live tensor bytes, at the token count of a whole clip (every chunk in one call, as the objective runs
  it). Attention counts as a fused kernel (FlashAttention: the forward keeps queries, keys, values, output and the
  float32 log-sum-exp; the backward allocates the three input gradients). Without checkpointing every block keeps what
  its forward saved; with checkpointing every block keeps only its input, and one block at a time is recomputed.

Figures are GiB (2**30 bytes) at batch 1; they leave out the CUDA context (~0.5 GiB), allocator fragmentation, and
the patch embedding / final projection / loss tensors (a few MiB).

    python benchmarks/memory_plan_training.py                                  # 4.5B and 24B, 480p
    python benchmarks/memory_plan_training.py --update-doc docs/training.md    # rewrite the generated part
    python benchmarks/memory_plan_training.py --small                          # a toy configuration
"""

import argparse
import pathlib
import sys
from typing import Dict, List, Sequence

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import memory_plan  # noqa: E402
from memory_plan import (
    DTYPE,
    GPU_24GB,
    LiveTensorBytes,
    _existing,
    _gib,
    _patched,
    _table,
    meta_model,
)  # noqa: E402

from diffusers_magi import MagiTransformer3DModel  # noqa: E402
from diffusers_magi.models import attention_magi  # noqa: E402
from diffusers_magi.models.attention_magi import ChunkAttentionLayout  # noqa: E402
from diffusers_magi.training.train_lora import DEFAULT_TARGET_MODULES  # noqa: E402

RESOLUTION = ("480p", (480, 848))
SMALL_RESOLUTION = ("toy", (64, 64))
CLIP_CHUNKS = (1, 2, 4)  # 24, 48, 96 frames
RANK = 32
TARGETS = DEFAULT_TARGET_MODULES.split(",")


class _FusedAttention(torch.autograd.Function):
    """What FlashAttention allocates in training: the forward returns its output and keeps `q, k, v`, the output and
    the float32 log-sum-exp; the backward allocates `dq, dk, dv`."""

    @staticmethod
    def forward(ctx, query, key, value):
        output = query.new_empty((*query.shape[:-1], value.shape[-1]))
        log_sum_exp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, output, log_sum_exp)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _fused_attention(query, key, value, attn_mask=None, enable_gqa=False, backend=None, parallel_config=None, **_):
    return _FusedAttention.apply(query, key, value)


def _is_target(name: str, targets: Sequence[str]) -> bool:
    return any(name == target or name.endswith(f".{target}") for target in targets)


def lora_parameters(model: MagiTransformer3DModel, rank: int, targets: Sequence[str]) -> int:
    """LoRA parameters of rank `rank` on the linears named by `targets` (PEFT's name matching)."""
    return sum(
        rank * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and _is_target(name, targets)
    )


def block_training_bytes(
    model: MagiTransformer3DModel, tokens: int, num_chunks: int, rank: int, targets: Sequence[str]
) -> Dict[str, int]:
    """`{"saved": ..., "peak": ..., "input": ...}`: the bytes a block keeps for its backward (its output included),
    the peak of its forward and backward, and the bytes of its input, for a clip of `num_chunks` chunks."""
    from peft import LoraConfig, inject_adapter_in_model

    config = model.config
    block = model.blocks[0]
    with torch.device("meta"):
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)), block)
    for name, parameter in block.named_parameters():
        parameter.requires_grad_("lora_" in name)
        if "lora_" in name:
            parameter.data = parameter.data.float()
    total = num_chunks * tokens
    meta = dict(device="meta", dtype=DTYPE)
    hidden = torch.empty(1, total, config.hidden_size, **meta).requires_grad_()
    condition = torch.empty(1, num_chunks, config.condition_dim, **meta)
    rotary = tuple(torch.empty(total, 3 * (config.attention_head_dim // 8), device="meta") for _ in range(2))
    # Captions padded to `text_length` (which tokens are valid does not change what is allocated).
    text = torch.empty(1, num_chunks, config.text_length, config.cross_attention_dim, **meta)
    text_mask = torch.zeros(1, num_chunks, config.text_length, dtype=torch.bool, device="meta")
    layout = ChunkAttentionLayout(tokens, 0, tuple([0] * num_chunks))
    counter = LiveTensorBytes(_existing(block, hidden, condition, *rotary, text, text_mask))
    with _patched(attention_magi, dispatch_attention_fn=_fused_attention), counter:
        output = block(hidden, condition, rotary, layout, text, text_mask, None)
        saved = counter.live
        output.backward(torch.empty_like(output))
    return {"saved": saved, "peak": counter.peak, "input": hidden.numel() * DTYPE.itemsize}


def build_plan(small: bool = False, rank: int = RANK) -> dict:
    transformers_ = memory_plan.SMALL_TRANSFORMERS if small else memory_plan.TRANSFORMERS
    resolution, (height, width) = SMALL_RESOLUTION if small else RESOLUTION
    plan = {"rank": rank, "resolution": resolution, "models": {}}
    for name, overrides in transformers_.items():
        model = meta_model(MagiTransformer3DModel, **overrides)
        tokens = memory_plan.tokens_per_chunk(model.config, height, width)
        lora = lora_parameters(model, rank, TARGETS)
        entry = {
            "weights": memory_plan.transformer_bytes(model)["total"],
            "lora_parameters": lora,
            "lora_adamw": lora * (4 + 4 + 8),  # parameters, gradients, two moments (float32)
            "lora_adam8bit": lora * (4 + 4 + 2),
            "tokens_per_chunk": tokens,
            "clips": {},
        }
        num_layers = model.config.num_layers
        for chunks in CLIP_CHUNKS:
            block = block_training_bytes(
                meta_model(MagiTransformer3DModel, **overrides), tokens, chunks, rank, TARGETS
            )
            rotary = 2 * chunks * tokens * 3 * (model.config.attention_head_dim // 8) * 4
            entry["clips"][chunks] = {
                "checkpointing": num_layers * block["input"] + (block["peak"] - block["input"]) + rotary,
                "no_checkpointing": num_layers * block["saved"] + (block["peak"] - block["saved"]) + rotary,
            }
        plan["models"][name] = entry
    return plan


def report(plan: dict) -> str:
    resolution, rank = plan["resolution"], plan["rank"]
    rows = []
    for name, entry in plan["models"].items():
        for chunks, activations in entry["clips"].items():
            base = entry["weights"] + entry["lora_adamw"]
            rows.append(
                [
                    name,
                    f"{chunks} ({24 * chunks} frames, {chunks * entry['tokens_per_chunk']} tokens)",
                    _gib(entry["weights"]),
                    _gib(entry["lora_adamw"]),
                    _gib(activations["checkpointing"]),
                    _gib(base + activations["checkpointing"]),
                    _gib(entry["weights"] + entry["lora_adam8bit"] + activations["checkpointing"]),
                    _gib(base + activations["no_checkpointing"]),
                ]
            )
    header = [
        "transformer",
        "clip chunks",
        "weights (bf16)",
        f"LoRA r={rank} + grads + AdamW",
        "activations (checkpointing)",
        "total, checkpointing",
        "total, checkpointing + 8-bit Adam",
        "total, no checkpointing",
    ]
    lines = [
        f"LoRA rank {rank} on {', '.join(TARGETS)}; {resolution}; batch 1; bf16 weights, float32 LoRA. GiB.",
        "",
        _table(header, rows),
    ]
    if "4.5B" in plan["models"]:
        entry = plan["models"]["4.5B"]
        fitting = [
            chunks
            for chunks, activations in entry["clips"].items()
            if entry["weights"] + entry["lora_adamw"] + activations["checkpointing"] <= GPU_24GB
        ]
        lines += [
            "",
            f"24 GB GPU ({_gib(GPU_24GB)} GiB usable), 4.5B at {resolution} with gradient checkpointing and AdamW: clips of "
            f"up to **{max(fitting) if fitting else 0} chunk(s)** ({24 * max(fitting) if fitting else 0} frames) fit.",
        ]
    return "\n".join(lines)


DOC_BEGIN = "<!-- generated by benchmarks/memory_plan_training.py: begin -->"
DOC_END = "<!-- generated by benchmarks/memory_plan_training.py: end -->"


def main(argv: List[str] = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a toy configuration instead of the real shapes")
    parser.add_argument("--rank", type=int, default=RANK)
    parser.add_argument("--update-doc", type=pathlib.Path, help="write the report between the markers of this file")
    args = parser.parse_args(argv)
    text = report(build_plan(small=args.small, rank=args.rank))
    if args.update_doc is not None:
        doc = args.update_doc.read_text()
        before, after = doc.split(DOC_BEGIN, 1)[0], doc.split(DOC_END, 1)[1]
        args.update_doc.write_text(f"{before}{DOC_BEGIN}\n{text}\n{DOC_END}{after}")
    print(
        f"MAGI-1 LoRA training memory plan ({'toy configuration' if args.small else 'real 4.5B / 24B shapes'}, torch {torch.__version__})"
    )
    print(text)


if __name__ == "__main__":
    main()
