"""`inspect_original`: what a conversion of the original layout would find, from the safetensors headers alone.

Reads the configs and the weight headers (never tensor data; a `.zst` file is decompressed only as far as its header),
so it takes seconds whatever the model's size, and reports per component the tensors found, missing, unexpected and
mis-shaped against the config, the stored dtypes, the sizes and the memory a load and a conversion need. It is what
`magi-convert --dry-run` prints.
"""

import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Union

import torch

from .original_layout import resolve_original_sources
from .streaming import ComponentPlan
from .text_encoder import plan_original_text_encoder
from .transformer import plan_original_transformer
from .vae import plan_original_vae

PathLike = Union[str, os.PathLike]


def _gb(count: int) -> str:
    return f"{count / 1e9:.2f} GB"


@dataclass
class OriginalInspection:
    """The result of `inspect_original`.

    Attributes:
        variant (`str` or `None`): the variant inspected.
        components (`Dict[str, ComponentPlan]`): per component read, its plan (see `streaming.ComponentPlan`).
        errors (`Dict[str, str]`): per component that could not be read at all (missing folder, bad header), why.
    """

    variant: Optional[str]
    components: Dict[str, ComponentPlan] = field(default_factory=dict)
    errors: Dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether a conversion would succeed."""
        return not self.errors and all(plan.ok for plan in self.components.values())

    @property
    def stored_bytes(self) -> int:
        return sum(plan.stored_bytes for plan in self.components.values())

    @property
    def load_memory_bytes(self) -> int:
        """Memory `from_original` needs: every component's weights plus the largest tensor in flight."""
        largest = max((plan.largest_tensor_bytes for plan in self.components.values()), default=0)
        return sum(plan.model_bytes for plan in self.components.values()) + largest

    @property
    def convert_memory_bytes(self) -> int:
        """Memory `magi-convert` needs for tensors: the largest one in flight (it writes each as it reads it)."""
        return max((plan.largest_tensor_bytes for plan in self.components.values()), default=0)

    def __str__(self) -> str:
        lines = [f"MAGI-1 original checkpoint{f' {self.variant}' if self.variant else ''} (headers only)"]
        for name, plan in self.components.items():
            lines.append(f"{name}: {'OK' if plan.ok else 'FAIL'}  ({plan.source})")
            lines.append(
                f"  tensors: {len(plan.used)} found, {len(plan.missing)} missing, {len(plan.unexpected)} unexpected "
                f"(skipped), {len(plan.mis_shaped)} mis-shaped"
                + (f", {len(plan.ignored)} ignored" if plan.ignored else "")
            )
            dtypes = ", ".join(f"{dtype} x{count}" for dtype, count in plan.stored_dtypes.items())
            lines.append(f"  stored dtypes: {dtypes or '-'}")
            lines.append(f"  size: {_gb(plan.stored_bytes)} stored, {_gb(plan.model_bytes)} as loaded")
            if plan.missing:
                lines.append(f"  missing: {', '.join(plan.missing[:20])}" + (" ..." if len(plan.missing) > 20 else ""))
            for tensor, (got, want) in list(plan.mis_shaped.items())[:20]:
                lines.append(f"  mis-shaped: {tensor} is {list(got)}, the config implies {list(want)}")
            if plan.unexpected:
                more = " ..." if len(plan.unexpected) > 20 else ""
                lines.append(f"  unexpected (skipped): {', '.join(plan.unexpected[:20])}{more}")
            for shard, names in plan.unlisted.items():
                lines.append(f"  not in the index (not read): {len(names)} tensor(s) of {shard}")
        for name, error in self.errors.items():
            lines.append(f"{name}: FAIL  {error}")
        lines.append(
            f"total: {_gb(self.stored_bytes)} stored; from_original needs ~{_gb(self.load_memory_bytes)} of memory, "
            f"magi-convert ~{_gb(self.convert_memory_bytes)} (one tensor at a time) plus the output on disk"
        )
        lines.append("conversion would succeed" if self.ok else "conversion would FAIL (see above)")
        return "\n".join(lines)


def inspect_original(
    source: Optional[PathLike] = None,
    variant: Optional[str] = None,
    config: Optional[Union[PathLike, dict]] = None,
    checkpoint_dir: Optional[PathLike] = None,
    vae_dir: Optional[PathLike] = None,
    t5_dir: Optional[PathLike] = None,
    special_tokens_path: Optional[PathLike] = None,
    dtype: Optional[torch.dtype] = None,
    dequantize_fp8: bool = False,
) -> OriginalInspection:
    """Check a local original layout against its config from the weight headers only (no tensor data is read).

    Takes the arguments of `convert_original_to_diffusers` (`source` must be a local folder). Print the result for a
    report; `.ok` says whether the conversion would succeed.

    Example:
        ```py
        >>> report = inspect_original("./MAGI-1", variant="24B_distill_quant")
        >>> print(report)
        ```
    """
    if source is not None and not os.path.isdir(str(source)):
        raise ValueError(
            f"inspect_original reads a local copy of the original layout; {source} is not a folder (download it "
            "first, e.g. with `huggingface-cli download sand-ai/MAGI-1 --include 'ckpt/magi/<variant>/*' ...`)."
        )
    sources = resolve_original_sources(source, variant, config, checkpoint_dir, vae_dir, t5_dir)
    inspection = OriginalInspection(variant=sources.variant)
    planners = {
        "transformer": lambda: plan_original_transformer(
            sources.config,
            sources.checkpoint_dir,
            special_tokens_path,
            dtype=dtype,
            dequantize_fp8=dequantize_fp8,
        ),
        "vae": (lambda: plan_original_vae(sources.vae_dir, dtype=dtype or torch.float32))
        if sources.vae_dir
        else None,
        "text_encoder": (lambda: plan_original_text_encoder(sources.t5_dir)) if sources.t5_dir else None,
    }
    for name, planner in planners.items():
        if planner is None:
            continue
        try:
            inspection.components[name] = planner()[3]
        except (ValueError, TypeError, FileNotFoundError, ImportError, OSError) as error:
            inspection.errors[name] = str(error)
    return inspection
