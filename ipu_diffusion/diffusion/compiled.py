"""A small cache of compiled whole-chain functions (samplers, bits/dim).

Each sampler compiles its whole chain (a ``tf.while_loop`` over the steps, with the
network inside) into one ``tf.function``. Tracing that costs seconds for a U-Net, so the
function is kept and reused while the diffusion tables, the network callables and the
static options are the same. The key uses ``GaussianDiffusion.fingerprint`` (so an equal
respaced diffusion built again hits the cache) and the identity of the callables; an
entry keeps those callables alive, and at most :data:`MAX_ENTRIES` entries are kept.
Seeds, initial noise and ``eta`` are tensor arguments, so changing them does not retrace.
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Hashable, Sequence, Tuple

import tensorflow as tf

MAX_ENTRIES = 16

_Entry = Tuple[Tuple[Any, ...], Callable]  # (the callables, the compiled function)
_CACHE: "collections.OrderedDict[Tuple, _Entry]" = collections.OrderedDict()


def compiled(kind: str, diffusion: Any, callables: Sequence[Any], options: Hashable,
             build: Callable[[], Callable], jit_compile: bool = False) -> Callable:
    """The ``tf.function(build(), jit_compile=jit_compile)`` for this key, made once.

    Args:
        kind: which chain (``"ddpm"``, ``"ddim"``, ``"ddim_invert"``, ``"bpd"``).
        diffusion: a ``GaussianDiffusion`` (its ``fingerprint`` enters the key).
        callables: the user functions the chain calls (denoise_fn, cond_fn or None).
        options: hashable static options (e.g. ``(clip_denoised, return_every)``).
        build: returns the Python function to compile.
    """
    callables = tuple(callables)
    key = (kind, diffusion.fingerprint, tuple(id(c) for c in callables), options,
           bool(jit_compile))
    hit = _CACHE.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], callables)):
        _CACHE.move_to_end(key)
        return hit[1]
    fn = tf.function(build(), jit_compile=bool(jit_compile))
    _CACHE[key] = (callables, fn)
    while len(_CACHE) > MAX_ENTRIES:
        _CACHE.popitem(last=False)
    return fn


def clear_compiled_cache() -> None:
    """Forget every compiled chain (and release the callables the entries hold)."""
    _CACHE.clear()
