"""Named experiment sizes for `mgd run --preset NAME`: each builds a whole `RunConfig`.

`mgd run --config FILE.toml` and `--set section.field=value` override any field of the
preset (see `config.py`). Where a setting's evidence matters, see docs/results.md.
"""
from __future__ import annotations

from dataclasses import dataclass

from mgd.errors import UsageError
from mgd.pipeline.baselines.ppl_correlations import PopulationConfig
from mgd.pipeline.config import (
    METHODS,
    BaselinesConfig,
    DsirConfig,
    ModelConfig,
    RunConfig,
    ScorerConfig,
    SelectionConfig,
)
from mgd.pipeline.continued import ContinuedConfig
from mgd.pipeline.corpus import CorpusConfig
from mgd.pipeline.oracle import OracleConfig
from mgd.pipeline.train import TrainConfig

HUB_ONTARGET = "hf:MedRAG/pubmed::contents"
HUB_OFFTARGET = "hf:allenai/c4:en:text"


@dataclass(frozen=True)
class PresetInfo:
    """What a preset is for, beside its settings."""
    expected_time: str
    gpu: str | None = None      # the machine it is sized for; None: a CPU is enough


def smoke() -> RunConfig:
    """Every stage and every baseline at toy scale: at most 5 minutes on 2 CPU cores.

    The numbers are those of a toy (a 1-layer, 32-wide model trained for 300 steps, 48
    oracle rounds); it checks that the whole pipeline runs and resumes.
    """
    return RunConfig(
        name="smoke",
        corpus=CorpusConfig(ontarget=None, offtarget=None, n_ontarget=600, n_offtarget=600,
                            n_corrupt=300, n_target=64, n_eval=64, seq_len=32, vocab_size=512,
                            tokenizer_train_docs=400, max_docs=2000),
        model=ModelConfig(n_layer=1, n_head=2, d_model=32, compute_dtype="float32"),
        base_train=TrainConfig(steps=300, batch_size=16, lr=3e-3, warmup=20, eval_every=0,
                               ckpt_every=50),
        oracle=OracleConfig(k=32, inner_steps=4, inner_lr=1e-4, rounds=48, target_batch=32,
                            pool_size=512),
        scorer=ScorerConfig(mlp_hidden=32, holdout_fraction=0.2, gradient_alignment=False),
        # The default methods and one DSIR resample for every seed: a test pins the smoke
        # results; the other methods run with --set selection.methods.
        baselines=BaselinesConfig(
            dsir=DsirConfig(ngrams=2, num_buckets=2048, draw_per_seed=False),
            population=PopulationConfig(n_models=4, n_domains=4, rows_per_model=256),
            population_train=ContinuedConfig(batch_size=16, lr=1e-3, warmup=2, epochs=1.0,
                                             n_evals=1)),
        continued=ContinuedConfig(batch_size=16, lr=1e-3, warmup=2, epochs=2.0, n_evals=4),
    )


def demo() -> RunConfig:
    """The demonstration on one H200: 7-7.5 minutes end to end with the 7 default methods;
    the 6 similarity baselines and ablations add 18 continued-pretraining runs (unmeasured).

    28k sequences of 128 tokens (8k on-target, 16k off-target, 4k corrupt), a 4-layer
    256-wide model, 256 oracle rounds of 256 rows (8 labels per pooled row), 16 models
    per seed for perplexity correlations, 3 seeds x 13 methods of continued pretraining
    (the default methods, the similarity baselines and the ablations).
    """
    return RunConfig(
        name="demo",
        corpus=CorpusConfig(ontarget=None, offtarget=None, n_ontarget=8000, n_offtarget=16000,
                            n_corrupt=4000, n_target=512, n_eval=1024, seq_len=128,
                            vocab_size=8192, tokenizer_train_docs=3000),
        model=ModelConfig(n_layer=4, n_head=4, d_model=256, compute_dtype="bfloat16"),
        base_train=TrainConfig(steps=1500, batch_size=64, lr=1e-3, warmup=100, eval_every=0,
                               ckpt_every=500),
        # inner_lr 0.3x the base run's final lr (1e-3 x 0.1): at 3x it the labels come
        # out inverted (see docs/results.md).
        # The memory planner picks the round program for the GPU's memory (docs/planner.md).
        oracle=OracleConfig(k=256, inner_steps=8, inner_lr=3e-5, rounds=256, target_batch=128,
                            pool_size=8192, auto_plan=True),
        # The whole-model gradient alignment column is on at this scale only: it trained
        # better here and worse at smaller scales (see docs/results.md).
        scorer=ScorerConfig(mlp_hidden=256, holdout_fraction=0.2, gradient_alignment=True,
                            feature_batch=512),
        selection=SelectionConfig(methods=METHODS),
        baselines=BaselinesConfig(
            dsir=DsirConfig(ngrams=2, num_buckets=10_000),
            population=PopulationConfig(n_models=16, n_domains=8, rows_per_model=4096),
            population_train=ContinuedConfig(batch_size=64, lr=1e-3, warmup=5, epochs=1.0,
                                             n_evals=1)),
        continued=ContinuedConfig(batch_size=32, lr=5e-4, warmup=10, epochs=2.0, n_evals=8),
        loss_batch=512,
    )


def full() -> RunConfig:
    """The seed experiment at a real scale (GPT-2-small-like model, 512-token sequences,
    700k sequences streamed from PubMed and C4 on the hub).

    Expected time, estimated rather than measured: about 16-20 hours on one H200. Base
    pretraining (20k steps of 256 x 512 tokens, ~2.6B tokens) ~3-4 h; the oracle (4096
    rounds) ~2-3 h; the populations (32 models per seed) ~6 h; continued pretraining
    (39 runs) ~4 h; DSIR's single-process n-gram pass ~15 min; streaming up to 1M
    documents per source from the hub ~30-60 min.
    """
    return RunConfig(
        name="full",
        corpus=CorpusConfig(ontarget=None, offtarget=None, n_ontarget=200_000,
                            n_offtarget=400_000, n_corrupt=100_000, n_target=4096, n_eval=8192,
                            seq_len=512, vocab_size=32768, tokenizer_train_docs=50_000,
                            max_docs=1_000_000),
        model=ModelConfig(n_layer=12, n_head=12, d_model=768, compute_dtype="bfloat16"),
        base_train=TrainConfig(steps=20_000, batch_size=256, lr=6e-4, warmup=1000, eval_every=0,
                               ckpt_every=1000),
        # 0.3x the base run's final lr (6e-4 x 0.1), as for the demo.
        # The memory planner picks the round program for the GPU's memory; where no limit is
        # known, micro-batches of 128 rows recomputed in the reverse pass bound it at k=1024.
        oracle=OracleConfig(k=1024, inner_steps=16, inner_lr=2e-5, rounds=4096, target_batch=512,
                            pool_size=200_000, micro_batch=128, remat="frugal", auto_plan=True),
        scorer=ScorerConfig(mlp_hidden=512, holdout_fraction=0.1, gradient_alignment=False),
        selection=SelectionConfig(methods=METHODS),
        baselines=BaselinesConfig(
            dsir=DsirConfig(ngrams=2, num_buckets=10_000),
            population=PopulationConfig(n_models=32, n_domains=16, rows_per_model=64_000),
            population_train=ContinuedConfig(batch_size=128, lr=3e-4, warmup=50, epochs=1.0,
                                             n_evals=1)),
        continued=ContinuedConfig(batch_size=128, lr=3e-4, warmup=100, epochs=1.0, n_evals=10),
    )


def mid() -> RunConfig:
    """A scale between `smoke` and `demo` for experiments on a CPU (not a `--preset`):
    the smoke corpus with a 3-layer, 64-wide model trained for 600 steps and 96 oracle
    rounds of 32 rows; about 90 s on 2 CPU cores."""
    s = smoke()
    return s.replace(
        name="mid", model=ModelConfig(n_layer=3, n_head=2, d_model=64, compute_dtype="float32"),
        base_train=TrainConfig(steps=600, batch_size=16, lr=3e-3, warmup=20, eval_every=0,
                               ckpt_every=200),
        oracle=OracleConfig(k=32, inner_steps=4, inner_lr=1e-4, rounds=96, target_batch=32,
                            pool_size=512))


PRESETS = {"smoke": smoke, "demo": demo, "full": full}

INFO = {
    "smoke": PresetInfo("about 1.5 minutes on 2 CPU cores; half a minute on a warm JAX "
                        "compilation cache"),
    "demo": PresetInfo("about 7-7.5 minutes on one H200 with the 7 default methods, the "
                       "largest part the oracle, then perplexity correlations' populations, "
                       "DSIR's single-process n-gram pass and continued pretraining; the 6 "
                       "similarity baselines and ablations add 18 continued-pretraining runs "
                       "(unmeasured)", gpu="one H200"),
    "full": PresetInfo("about 16-20 hours on one H200 (estimate)", gpu="one H200"),
}


def get(name: str) -> RunConfig:
    if name not in PRESETS:
        raise UsageError(f"--preset {name}: unknown preset; choose from {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
