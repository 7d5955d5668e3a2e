from .lora_magi import MagiLoraLoaderMixin
from .peft_magi import MagiPeftAdapterMixin, adapter_incompatible_modules
