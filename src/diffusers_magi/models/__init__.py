from .autoencoder_magi import AutoencoderMagi
from .kv_cache_magi import MagiKVCache
from .transformer_magi import MagiTransformer3DModel
