"""The shapes metagradient rounds are measured and budgeted at, defined once.

A shape fixes the model (layers, width, heads, vocabulary) and the round (train rows k,
target rows, inner Adam steps); the sequence length is given with it, as "e2e:16384".
`bench/round_timing.py`, `bench/test_end_to_end.py` and `round_budget` read them here.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from mgd.pipeline.model import GPTConfig
from mgd.pipeline.oracle import OracleConfig, RematPlan

__all__ = ["RoundShape", "SHAPES", "parse_shape"]


@dataclass(frozen=True)
class RoundShape:
    name: str
    vocab_size: int
    n_layer: int
    n_head: int
    d_model: int
    k: int                          # train rows per round
    target_rows: int
    inner_steps: int
    loss_chunk: int = 1024
    compute_dtype: str = "bfloat16"
    # Rows per gradient micro-batch under the frugal plan: what fits today's memory bar
    # (None: all k at once). The lean plan takes all rows at once.
    frugal_micro_batch: int | None = None

    def model_config(self, seq_len: int, impl: str) -> GPTConfig:
        return GPTConfig(vocab_size=self.vocab_size, seq_len=seq_len, n_layer=self.n_layer,
                         n_head=self.n_head, d_model=self.d_model, attention_impl=impl,
                         compute_dtype=self.compute_dtype, loss_chunk=self.loss_chunk)

    def oracle_config(self, plan: RematPlan, inner_steps: int | None = None) -> OracleConfig:
        micro = self.frugal_micro_batch if plan.micro_batch else None
        return OracleConfig(k=self.k, inner_steps=inner_steps or self.inner_steps, inner_lr=1e-4,
                            target_batch=self.target_rows, micro_batch=micro,
                            target_micro_batch=micro, remat=plan, warm_start=False)


SHAPES = {
    # The e2e bench's round: 4 layers, width 512, 8 heads of D=64.
    "e2e": RoundShape("e2e", vocab_size=8192, n_layer=4, n_head=8, d_model=512, k=4,
                      target_rows=4, inner_steps=2),
    # GPT-2 small; the frugal plan runs it one row at a time.
    "gpt2s": RoundShape("gpt2s", vocab_size=50257, n_layer=12, n_head=12, d_model=768, k=4,
                        target_rows=4, inner_steps=2, loss_chunk=512, frugal_micro_batch=1),
    # Seconds on a CPU: for checking the tools' wiring.
    "toy": RoundShape("toy", vocab_size=256, n_layer=2, n_head=2, d_model=32, k=2,
                      target_rows=2, inner_steps=2, frugal_micro_batch=1),
}
# The seed's labeling round on the GPT-2-small model (issue bars: seconds per round on one GPU).
SHAPES["seed"] = replace(SHAPES["gpt2s"], name="seed", k=64, target_rows=64, inner_steps=16,
                         loss_chunk=1024, frugal_micro_batch=2)


def parse_shape(spec: str) -> tuple[RoundShape, int]:
    """"name:seq_len" -> (shape, seq_len); ValueError naming what is wrong."""
    name, _, length = spec.partition(":")
    if name not in SHAPES:
        raise ValueError(f"--shape: unknown shape {name!r} (one of {sorted(SHAPES)})")
    if not length.isdigit() or int(length) < 2:
        raise ValueError(f"--shape: {spec!r} needs a sequence length >= 2, as {name}:16384")
    return SHAPES[name], int(length)
