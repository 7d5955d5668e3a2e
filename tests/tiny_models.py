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
