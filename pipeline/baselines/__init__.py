"""Selection baselines, one module each. Every baseline is the real method it is named
after; none of them reads the ground-truth cluster except `oracle_cluster`, the ceiling.

- `random_subset`: uniform random sequences.
- `low_perplexity`: the sequences the base model finds easiest.
- `ppl_correlations`: perplexity correlations (Thrush et al. 2024) through the
  `perplexity-correlations` package, on a population of small models trained here.
- `dsir`: hashed n-gram importance resampling (Xie et al. 2023) through `data-selection`.
- `oracle_cluster`: on-target sequences only (uses the ground truth; the ceiling).
- `oracle_labels`: the metagradient oracle's own labels, where they exist.

In results and run folders these appear as `random`, `low_perplexity`,
`ppl_correlations`, `dsir`, `oracle_ontarget` and `oracle_labels` (see `run.METHODS`).
"""
