"""The HLO census counts converts and copies per run, loop bodies times their trip counts."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mgd.pipeline import round_hlo


def test_census_multiplies_loop_bodies_by_trip_counts():
    n = 512 * 1024          # 2 MiB of float32, 1 MiB of bfloat16: both count as large
    trips = 7

    def f(x, w):
        def body(i, acc):
            narrow = (acc * w).astype(jnp.bfloat16)          # one downcast per trip
            return acc + jnp.sin(narrow.astype(jnp.float32))  # and one upcast
        return jax.lax.fori_loop(0, trips, body, x)

    x = jnp.ones((n,), jnp.float32)
    text = jax.jit(f).lower(x, x).compile().as_text()
    c = round_hlo.census(text)
    assert c.unknown_trip_counts == 0
    assert c.downcasts == trips and c.downcast_bytes == trips * 2 * n
    assert c.upcasts >= trips and c.upcasts % trips == 0
    assert c.top_level_bytes >= trips * 4 * n
