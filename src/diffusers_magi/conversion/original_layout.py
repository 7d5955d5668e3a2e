"""Where the parts of an original MAGI-1 checkpoint are: the layout of the original Hub repository (`sand-ai/MAGI-1`),

```
ckpt/magi/<variant>/inference_weight[.fp8][.distill]/   DiT weights (one file or shards with an index, maybe .zst)
ckpt/vae/                                              VAE (config.json + diffusion_pytorch_model.safetensors)
ckpt/t5/t5-v1_1-xxl/                                   T5 encoder + tokenizer
```

or explicit folders next to an original config JSON.
"""

import os
from dataclasses import dataclass
from typing import Optional, Union

from .original_checkpoint import original_weight_folder, read_original_config
from .presets import PRESETS, T5_FOLDER, VAE_FOLDER, preset


@dataclass
class OriginalSources:
    """Everything a conversion reads.

    Attributes:
        config (`dict`): the original three-section config.
        checkpoint_dir (`str`): folder holding `inference_weight[.fp8][.distill]/`.
        vae_dir (`str` or `None`): the original VAE folder, `None` for none.
        t5_dir (`str` or `None`): the T5 folder, `None` for none.
        variant (`str` or `None`): variant name (the folder name under `ckpt/magi/`), when known.
    """

    config: dict
    checkpoint_dir: str
    vae_dir: Optional[str]
    t5_dir: Optional[str]
    variant: Optional[str] = None


def resolve_original_sources(
    snapshot_dir: Optional[Union[str, os.PathLike]] = None,
    variant: Optional[str] = None,
    config: Optional[Union[str, os.PathLike, dict]] = None,
    checkpoint_dir: Optional[Union[str, os.PathLike]] = None,
    vae_dir: Optional[Union[str, os.PathLike]] = None,
    t5_dir: Optional[Union[str, os.PathLike]] = None,
) -> OriginalSources:
    """Find the config and folders of a conversion.

    Either `snapshot_dir` (a local copy of the original Hub repository layout) with `variant`, or `config` with an
    explicit `checkpoint_dir`. The config is `config` when given, else the built-in preset of `variant`. Explicit
    folders override the snapshot's; without a snapshot, a missing `vae_dir` / `t5_dir` means "no such component".

    Raises:
        ValueError: when neither a snapshot with a variant nor a config with a checkpoint folder is given, or a
            folder the layout names does not exist.
    """
    if config is None and variant is None:
        raise ValueError(
            f"Pass `variant` (one of the built-in presets {sorted(PRESETS)}) or an original config JSON as `config`."
        )
    original_config = read_original_config(config) if config is not None else preset(variant)
    if snapshot_dir is not None:
        snapshot_dir = str(snapshot_dir)
        if not os.path.isdir(snapshot_dir):
            raise ValueError(f"The original snapshot folder {snapshot_dir} does not exist.")
        if variant is None and checkpoint_dir is None:
            raise ValueError(
                f"Pass `variant` (the folder name under {os.path.join(snapshot_dir, 'ckpt', 'magi')}) or an explicit "
                "`checkpoint_dir` to pick the DiT checkpoint of the snapshot."
            )
        checkpoint_dir = checkpoint_dir or os.path.join(snapshot_dir, "ckpt", "magi", variant)
        vae_dir = vae_dir or os.path.join(snapshot_dir, VAE_FOLDER)
        t5_dir = t5_dir or os.path.join(snapshot_dir, T5_FOLDER)
    elif checkpoint_dir is None:
        raise ValueError("Without an original snapshot folder, pass the DiT folder as `checkpoint_dir`.")
    weights = os.path.join(str(checkpoint_dir), original_weight_folder(original_config["engine_config"]))
    for name, folder in (("DiT weight", weights), ("VAE", vae_dir), ("T5", t5_dir)):
        if folder is not None and not os.path.isdir(folder):
            raise ValueError(f"The {name} folder {folder} does not exist; check the snapshot layout or the variant.")
    return OriginalSources(
        config=original_config,
        checkpoint_dir=str(checkpoint_dir),
        vae_dir=None if vae_dir is None else str(vae_dir),
        t5_dir=None if t5_dir is None else str(t5_dir),
        variant=variant,
    )


def download_original_snapshot(repo_id: str, variant: str, config: Optional[dict] = None, **download_kwargs) -> str:
    """Download the parts of an original MAGI-1 Hub repository that `variant` needs (its DiT weight folder, the VAE
    and T5) with `huggingface_hub.snapshot_download`; returns the local snapshot folder.

    Args:
        repo_id (`str`): e.g. `"sand-ai/MAGI-1"`.
        variant (`str`): folder name under `ckpt/magi/`.
        config (`dict`, *optional*): original config (decides the weight folder); defaults to the preset of `variant`.
        download_kwargs: passed to `snapshot_download` (`revision`, `cache_dir`, `token`, ...).
    """
    from huggingface_hub import snapshot_download

    original_config = config if config is not None else preset(variant)
    weights = original_weight_folder(original_config["engine_config"])
    patterns = [f"ckpt/magi/{variant}/{weights}/*", f"{VAE_FOLDER}/*", f"{T5_FOLDER}/*"]
    return snapshot_download(repo_id, allow_patterns=patterns, **download_kwargs)
