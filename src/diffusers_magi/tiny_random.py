"""A tiny MAGI-1 pipeline with random weights, built in memory: a smoke test of the whole path (text encoder,
chunk-wise sampler, VAE, video writing) on any machine, without downloading anything. It is not a model: its videos
are noise-like patterns.

Used by `magi-generate --model tiny-random`, the examples when no real checkpoint is available, and the tests.
"""

import torch

from .models.autoencoder_magi import AutoencoderMagi
from .models.transformer_magi import MagiTransformer3DModel
from .pipelines.pipeline_magi import MagiPipeline
from .schedulers.scheduling_magi_chunk import MagiChunkScheduler

TINY_WORDS = (
    "a cat dog fox runs walks jumps through over the snow grass city street at night day red blue green bird flies "
    "sky ocean waves beach sunset camera pans slowly fast car drives rain x"
).split()


def tiny_transformer_config(**overrides) -> dict:
    config = dict(
        in_channels=16,
        out_channels=16,
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_head_dim=16,
        ffn_dim=128,
        text_dim=32,
        text_length=40,
        condition_dim=16,
        cross_attention_dim=64,
    )
    config.update(overrides)
    return config


def tiny_transformer(seed: int = 0, **overrides) -> MagiTransformer3DModel:
    """A random tiny transformer in which every parameter matters (norm weights and biases are not at their
    initial constants, the null caption and special tokens are not zero)."""
    torch.manual_seed(seed)
    model = MagiTransformer3DModel(**tiny_transformer_config(**overrides))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1 and "bands" not in name:
                parameter.normal_(0.0, 0.1)
            elif name.endswith("null_caption_embedding") or name.endswith("special_tokens"):
                parameter.normal_(0.0, 0.5)
    return model.eval()


def tiny_tokenizer():
    """A word-level tokenizer built locally (no download) and wrapped as a transformers fast tokenizer; unknown words
    map to `<unk>`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(["<pad>", "</s>", "<unk>", *TINY_WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_text_encoder(seed: int = 0, d_model: int = 32):
    """A random 2-layer T5 encoder."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(TINY_WORDS) + 3, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0
    )
    return T5EncoderModel(config).eval()


def tiny_vae(seed: int = 0) -> AutoencoderMagi:
    """A random one-layer ViT VAE with the real compression (8x spatial, 4x temporal, 16 latent channels)."""
    torch.manual_seed(seed)
    return AutoencoderMagi(sample_size=32, sample_frames=8, num_attention_heads=4, attention_head_dim=64, num_layers=1).eval()


def tiny_random_pipeline(
    seed: int = 0, with_text_encoder: bool = True, with_vae: bool = True, **transformer_overrides
) -> MagiPipeline:
    """A complete `MagiPipeline` at toy size (T5 with d_model 32, a 2-layer transformer, a 1-layer VAE), random
    weights, 4 inference steps by default. Runs in well under a second per chunk at 32 x 32 pixels on a CPU."""
    pipe = MagiPipeline(
        transformer=tiny_transformer(seed=seed, text_length=64, **transformer_overrides),
        scheduler=MagiChunkScheduler(),
        vae=tiny_vae(seed) if with_vae else None,
        text_encoder=tiny_text_encoder(seed) if with_text_encoder else None,
        tokenizer=tiny_tokenizer() if with_text_encoder else None,
        default_num_inference_steps=4,
    )
    return pipe
