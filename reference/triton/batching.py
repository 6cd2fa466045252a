"""vmap for functions whose kernels have no batching rule.

Attention is independent per batch element, so mapping over an extra axis is
the same computation as one call with that axis folded into the batch axis B.
`fold_batch` gives a function of [B, ...] arrays that rule through
`jax.custom_batching.custom_vmap`; nested vmaps fold one axis at a time.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def fold_batch(fn):
    """fn(*arrays) -> tuple of arrays, all with B leading; made vmappable."""
    wrapped = jax.custom_batching.custom_vmap(fn)

    @wrapped.def_vmap
    def _rule(axis_size, in_batched, *args):
        args = [a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))
                for a, batched in zip(args, in_batched)]
        outs = wrapped(*(a.reshape(-1, *a.shape[2:]) for a in args))
        outs = tuple(o.reshape(axis_size, -1, *o.shape[1:]) for o in outs)
        return outs, tuple(True for _ in outs)

    return wrapped
