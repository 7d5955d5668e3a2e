"""Diffusers' step caches (`transformer.enable_cache(...)`) on the MAGI-1 transformer.

First-block cache and MagCache look blocks up in Diffusers' `TransformerBlockRegistry` (where the hidden states are
among a block's arguments and outputs); layer skipping looks attention processors up in the
`AttentionProcessorRegistry` (what a skipped attention returns). `register_cache_hooks` adds MAGI-1's block and
attention processor to both; `MagiTransformer3DModel.enable_cache` calls it, so nothing is registered (and Diffusers'
registries, which import every Diffusers transformer, are not built) until a cache is enabled.

A MAGI-1 block returns its hidden states alone, and a skipped MAGI-1 attention contributes nothing to the residual:
its output is zero (the block adds the gated, normalised attention output to its input).

Caches keep their state per `cache_context`; the guidance passes name one context per window and branch
(`guidance_magi`), each session its own windows (`MagiSession`), so a cache never compares calls of different
chunks, shapes, guidance branches or generations, and the pass that writes the KV cache, the first of its context, is
always computed. A session forgets a window's states when the window moves and all of its own when it ends
(`forget_step_cache_contexts`), never another session's. Pyramid attention broadcast and FasterCache keep one state
per hook instead (Diffusers 0.42): `magi_cache_context` gives them a state per context too.
"""

import contextlib
import copy
import threading
from typing import Dict, List, Optional

import torch


def _skip_magi_attention(attention, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Output of a skipped `MagiAttention`: zeros of its output shape (float32, `(batch, tokens, hidden_size)`)."""
    return hidden_states.new_zeros(hidden_states.shape, dtype=torch.float32)


def register_cache_hooks() -> None:
    """Register `MagiTransformerBlock` and `MagiAttnProcessor` with Diffusers' hook registries (idempotent)."""
    from diffusers.hooks._helpers import (
        AttentionProcessorMetadata,
        AttentionProcessorRegistry,
        TransformerBlockMetadata,
        TransformerBlockRegistry,
    )

    from .attention_magi import MagiAttnProcessor
    from .transformer_magi import MagiTransformerBlock

    TransformerBlockRegistry.register(
        model_class=MagiTransformerBlock,
        metadata=TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=None),
    )
    AttentionProcessorRegistry.register(
        model_class=MagiAttnProcessor,
        metadata=AttentionProcessorMetadata(skip_processor_output_fn=_skip_magi_attention),
    )


def _hooks(transformer: torch.nn.Module):
    """Every Diffusers hook registered on `transformer` or its submodules."""
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        yield from registry.hooks.values() if registry is not None else ()


def _state_managers(hook) -> list:
    from diffusers.hooks.hooks import StateManager

    return [value for value in vars(hook).values() if isinstance(value, StateManager)]


def _single_state_hooks(transformer: torch.nn.Module):
    """Stateful hooks under `transformer` that keep one `state` instead of a `StateManager` (pyramid attention
    broadcast, FasterCache)."""
    return [hook for hook in _hooks(transformer) if hook._is_stateful and hasattr(hook, "state") and not _state_managers(hook)]


def _step_cache_lock(transformer: torch.nn.Module) -> threading.RLock:
    """The lock under which step-cache contexts of `transformer` are entered, forgotten and copied."""
    return transformer.__dict__.setdefault("_magi_step_cache_lock", threading.RLock())


def _fresh_state(hook):
    state = type(hook.state)()
    # FasterCache's block hook skips its first call in the skip range unless the call's iteration is a positive
    # multiple of its skip range (Diffusers expects the first timesteps outside that range); every context's first
    # call must compute (it may write the KV cache), so a context's state starts at such an iteration.
    block_skip_range = getattr(hook, "block_skip_range", None)
    if type(hook).__name__ == "FasterCacheBlockHook" and block_skip_range:
        state.iteration = block_skip_range
    return state


@contextlib.contextmanager
def magi_cache_context(transformer: torch.nn.Module, name: str):
    """`transformer.cache_context(name)`, and a state of its own under `name` for every hook that keeps a single
    state, so that every cache keeps its state per context.

    The hooks' current context is shared by everything that calls `transformer`: the context is held under a lock
    of the transformer's, so step-cached calls from several threads (sessions side by side) run one at a time, each
    in its own context."""
    with _step_cache_lock(transformer):
        for hook in _single_state_hooks(transformer):
            if "_magi_context_states" not in vars(hook):
                _track_context_states(hook)
            states = hook._magi_context_states
            if name not in states:
                states[name] = _fresh_state(hook)
            hook.state = states[name]
        with transformer.cache_context(name):
            yield


def window_cache_context(transformer: torch.nn.Module, window: Optional[str], branch: str):
    """The step-cache context `f"{window}/{branch}"` (`magi_cache_context`), or nothing when `window` is `None` (no
    step cache enabled)."""
    if window is None:
        return contextlib.nullcontext()
    return magi_cache_context(transformer, f"{window}/{branch}")


def _track_context_states(hook) -> None:
    """Give `hook` a state per context; its `reset_state` (what `_reset_stateful_cache` calls) then forgets every
    context's state."""
    hook._magi_context_states = {}
    reset_current_state = hook.reset_state

    def reset_state(module):
        hook._magi_context_states.clear()
        return reset_current_state(module)

    hook.reset_state = reset_state


def _context_state_tables(transformer: torch.nn.Module) -> List[Dict[str, object]]:
    """The `{context name: state}` tables of every stateful hook under `transformer` (Diffusers' `StateManager`s
    and the per-context states `magi_cache_context` gives single-state hooks)."""
    tables = []
    for hook in _hooks(transformer):
        tables.extend(manager._state_cache for manager in _state_managers(hook))
        if "_magi_context_states" in vars(hook):
            tables.append(hook._magi_context_states)
    return tables


def forget_step_cache_contexts(transformer: torch.nn.Module, prefix: str) -> None:
    """Forget the step-cache states of the contexts whose names start with `prefix` (a session's finished window,
    or all of a finished session's), leaving every other context's as it is. Does nothing without a cache."""
    if not getattr(transformer, "is_cache_enabled", False):
        return
    with _step_cache_lock(transformer):
        for table in _context_state_tables(transformer):
            for name in [name for name in table if name.startswith(prefix)]:
                del table[name]


def copy_step_cache_contexts(transformer: torch.nn.Module, prefix: str, new_prefix: str) -> None:
    """Copy the step-cache states of the contexts named `prefix...` to `new_prefix...` (a forked session goes on
    from the states its parent had). Does nothing without a cache."""
    if not getattr(transformer, "is_cache_enabled", False):
        return
    with _step_cache_lock(transformer):
        for table in _context_state_tables(transformer):
            for name in [name for name in table if name.startswith(prefix)]:
                table[new_prefix + name[len(prefix) :]] = copy.deepcopy(table[name])
