"""Builds copies of the original MAGI-1 Hub repository layout from the tiny reference checkpoints, for the conversion
tests:

```
<root>/ckpt/magi/<variant>/inference_weight[.fp8][.distill]/   the reference DiT checkpoint (as stored, or resharded)
<root>/ckpt/vae/                                              the reference tiny VAE (original ViTVAE folder)
<root>/ckpt/t5/t5-v1_1-xxl/                                   a tiny random T5 encoder as sharded PyTorch pickles,
                                                              with a sentencepiece tokenizer (spiece.model)
```
"""

import json
import os
import shutil
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors.torch import load_file, save_file

from diffusers_magi.conversion.original_checkpoint import original_weight_folder
from diffusers_magi.tiny_random import TINY_WORDS, tiny_text_encoder

from .reference_cases import DIT_DIR

# variant folder name -> reference checkpoint folder, for the checkpoints the reference data holds (the in-repository
# subset has no float32 distill checkpoint).
VARIANTS = {
    variant: folder
    for variant, folder in {
        "tiny45_base": "tiny45_base",
        "tiny45_distill": "tiny45_distill",
        "tiny45_distill_quant": "tiny45_distill_fp8",
    }.items()
    if (DIT_DIR / "checkpoints" / folder).is_dir()
}
SPECIAL_TOKENS = DIT_DIR / "e_sampler_t2v_base" / "special_tokens.npz"


def variant_config(variant: str) -> Path:
    return DIT_DIR / "checkpoints" / VARIANTS[variant] / "config.json"


def weight_folder(variant: str) -> str:
    config = json.loads(variant_config(variant).read_text())
    return original_weight_folder(config["engine_config"])


def reference_weights(variant: str) -> Dict[str, torch.Tensor]:
    return load_file(DIT_DIR / "checkpoints" / VARIANTS[variant] / weight_folder(variant) / "model.safetensors")


def write_sharded_safetensors(tensors: Dict[str, torch.Tensor], folder: Path, num_shards: int, compress: bool = False):
    """`model-0000k-of-0000n.safetensors` shards + `model.safetensors.index.json`, optionally zstd-compressed as the
    original loader reads them (`<shard>.zst`, the index naming the uncompressed file)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for shard in range(num_shards):
        file_name = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {name: tensors[name].contiguous() for name in names[shard::num_shards]}
        save_file(part, str(folder / file_name))
        weight_map.update({name: file_name for name in part})
        if compress:
            import zstandard

            data = (folder / file_name).read_bytes()
            (folder / (file_name + ".zst")).write_bytes(zstandard.ZstdCompressor().compress(data))
            (folder / file_name).unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_t5_folder(folder: Path, seed: int = 0, d_model: int = 64):
    """A tiny T5 encoder in the original's format: config.json, two pickled shards with an index, and a sentencepiece
    tokenizer (spiece.model + tokenizer_config.json, no tokenizer.json)."""
    import sentencepiece

    folder.mkdir(parents=True, exist_ok=True)
    encoder = tiny_text_encoder(seed, d_model=d_model)
    encoder.config.to_json_file(str(folder / "config.json"))
    state_dict = {name: tensor.clone() for name, tensor in encoder.state_dict().items()}
    names = sorted(state_dict)
    weight_map = {}
    for shard in range(2):
        file_name = f"pytorch_model-{shard + 1:05d}-of-00002.bin"
        part = {name: state_dict[name] for name in names[shard::2]}
        torch.save(part, folder / file_name)
        weight_map.update({name: file_name for name in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    corpus = folder.parent / "corpus.txt"
    corpus.write_text("\n".join(" ".join(TINY_WORDS[i:] + TINY_WORDS[:i]) for i in range(len(TINY_WORDS))))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=32, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )  # fmt: skip
    corpus.unlink()
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 0})
    )


def build_original_snapshot(root: Path, vae_dir: Path, dit_layout: Optional[Dict[str, str]] = None) -> Path:
    """The original layout under `root` with every variant of `VARIANTS`. `dit_layout` maps variants to "single"
    (default: the reference file, linked), "sharded" or "sharded_zst"."""
    dit_layout = dit_layout or {}
    for variant in VARIANTS:
        target = root / "ckpt" / "magi" / variant / weight_folder(variant)
        layout = dit_layout.get(variant, "single")
        if layout == "single":
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(DIT_DIR / "checkpoints" / VARIANTS[variant] / weight_folder(variant), target)
        else:
            write_sharded_safetensors(reference_weights(variant), target, 3, compress=layout == "sharded_zst")
    shutil.copytree(vae_dir, root / "ckpt" / "vae")
    write_t5_folder(root / "ckpt" / "t5" / "t5-v1_1-xxl")
    return root
