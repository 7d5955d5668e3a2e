"""Imported first by the package: imports Diffusers' model machinery without the log lines of optional backends that
diffusers-magi does not use.

With torchao installed (the `quantization` extra), ``import diffusers.models`` imports torchao through Diffusers'
quantizer registry. On a machine without torchao's CUDA kernels that import logs "Failed to load ... .so" per kernel
library, two ``register_constant`` deprecation warnings of ``torch.utils._pytree`` and Diffusers' "Unable to import
`torchao` Tensor objects". None of them concerns this package (torchao is used only when a user quantizes), so they
are held back while that import runs; the loggers' levels are restored afterwards, and later messages (for example
while quantizing) are shown as usual.
"""

import logging
from contextlib import contextmanager

# Loggers that speak only while torchao is first imported.
_IMPORT_TIME_LOGGERS = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")


@contextmanager
def _import_time_logs_held_back():
    loggers = [logging.getLogger(name) for name in _IMPORT_TIME_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


with _import_time_logs_held_back():
    import diffusers.models.modeling_utils  # noqa: F401
