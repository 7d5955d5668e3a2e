"""Tiny random components for fast tests (the shapes of the reference checkpoints, random weights)."""

import torch

from diffusers_magi import MagiTransformer3DModel


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
    """A randomly initialised tiny transformer in which every parameter matters (norm weights are not zero)."""
    torch.manual_seed(seed)
    model = MagiTransformer3DModel(**tiny_transformer_config(**overrides))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1 and "bands" not in name:
                parameter.normal_(0.0, 0.1)
            elif name.endswith("null_caption_embedding") or name.endswith("special_tokens"):
                parameter.normal_(0.0, 0.5)
    return model.eval()


TEXT_WORDS = (
    "a cat dog fox runs walks jumps through over the snow grass city street at night day red blue green bird flies "
    "sky ocean waves beach sunset camera pans slowly fast car drives rain x"
).split()


def tiny_tokenizer():
    """A word-level tokenizer built locally (no download), wrapped like a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(["<pad>", "</s>", "<unk>", *TEXT_WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_text_encoder(seed: int = 0, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(TEXT_WORDS) + 3, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0
    )
    return T5EncoderModel(config).eval()


def tiny_vae(seed: int = 0):
    from diffusers_magi import AutoencoderMagi

    torch.manual_seed(seed)
    return AutoencoderMagi(
        sample_size=32, sample_frames=8, num_attention_heads=4, attention_head_dim=64, num_layers=1
    ).eval()


def tiny_pipeline(seed: int = 0, with_text_encoder: bool = True, with_vae: bool = True, **transformer_overrides):
    """A complete MagiPipeline at toy size: T5 (d_model 32), transformer (text_dim 32, 64 caption tokens), VAE."""
    from diffusers_magi import MagiChunkScheduler, MagiPipeline

    transformer = tiny_transformer(seed=seed, text_length=64, **transformer_overrides)
    pipe = MagiPipeline(
        transformer=transformer,
        scheduler=MagiChunkScheduler(),
        vae=tiny_vae(seed) if with_vae else None,
        text_encoder=tiny_text_encoder(seed) if with_text_encoder else None,
        tokenizer=tiny_tokenizer() if with_text_encoder else None,
        default_num_inference_steps=4,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
