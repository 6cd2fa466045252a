"""The distilled scorer: base-model features -> a cheap regressor fit to the oracle labels.

The metagradient oracle labels only a few thousand sequences; the scorer generalises
those labels to the whole corpus from one forward pass of the base model per sequence
(the mean-pooled final hidden state, `model.features`; the sequence's loss; and the
alignment of its last-layer gradients with the target's, Adam-preconditioned: the
last layer's share of the label to first order in the inner lr). Optionally, the
whole model's (`gradient_alignment`): the first-order estimate of the label itself,
which the regressor then calibrates against the oracle. That one is not a forward-pass
feature: it costs a backward pass and a pass back through it over every sequence.
Two regressors compete on a held-out split of the labeled rows, judged by Spearman
correlation (selection only uses the ranking): closed-form ridge and a small MLP. The
winner is refit on every labeled row and scores every sequence, including those the
oracle never saw.
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from scipy import stats

RIDGE_ALPHAS = tuple(10.0 ** np.arange(-3, 5, 0.5))


# ---------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------

def features_with_loss(params, seqs, model_cfg):
    """[N, d + 1]: `model.features` (the mean-pooled final hidden state) and, as one more
    column, the sequence's mean next-token loss, both from the same forward pass.

    The loss column matters for token-order corruption: a shuffled sequence has the same
    tokens as real text, so a mean-pooled state of a small model can look alike, while
    its loss under the base model is far higher.
    """
    import jax.numpy as jnp

    from mgd.pipeline import model as model_lib
    seqs = jnp.asarray(seqs)
    hidden = model_lib.forward(params, seqs[:, :-1], model_cfg)
    pooled = jnp.mean(hidden.astype(jnp.float32), axis=1)
    loss = jnp.mean(model_lib.token_losses(params, hidden, seqs[:, 1:], model_cfg), axis=-1)
    return jnp.concatenate([pooled, loss.astype(jnp.float32)[:, None]], axis=1)


ALIGNMENT_COLUMNS = ("output layer", "final norm", "last MLP down projection")


def _last_layer(tree):
    """The parameters whose gradients the alignment features take, by name."""
    return {"embed": tree["embed"], "norm_f": tree["norm_f"],
            "w_down": tree["blocks"]["w_down"][-1]}


def adam_metric(adam_nu, adam_count, *, b2=0.999, eps=1e-8):
    """1 / (sqrt(nu_hat) + eps) per parameter, float32: the inner Adam's preconditioner
    from the base run's bias-corrected second moment, the metric the labels' first-order
    estimate (and so every alignment column) is taken in."""
    import jax
    import jax.numpy as jnp
    correction = 1.0 - b2 ** int(adam_count)
    return jax.tree_util.tree_map(
        lambda v: 1.0 / (jnp.sqrt(jnp.asarray(v, jnp.float32) / correction) + eps), adam_nu)


def target_direction(params, target_seqs, model_cfg, adam_nu, adam_count, *, b2=0.999,
                     eps=1e-8, batch_size: int = 128, parts: str = "last_layer") -> dict:
    """The gradient of the target loss Phi (mean loss over `target_seqs`), preconditioned
    as the oracle's inner Adam preconditions it: g / (sqrt(nu_hat) + eps) with the base
    run's bias-corrected second moment. `parts="last_layer"`: with respect to the last
    layer's parameters (the tied embedding, the final norm's scale, the last MLP's down
    projection), a dict keyed like `_last_layer`; `parts="all"`: every parameter, a
    tree like `params`. Float32 arrays, computed once per run.

    To first order in the inner lr, a row's label is the preconditioned inner product of
    its loss gradient with Phi's, summed over all parameters; `last_layer_alignment`
    takes the last layer's share of it, which needs no backward pass through the model,
    and `gradient_alignment` the whole of it.
    """
    if parts not in ("last_layer", "all"):
        raise ValueError(f"parts must be 'last_layer' or 'all', got {parts!r}")
    select = _last_layer if parts == "last_layer" else (lambda tree: tree)
    import jax
    import jax.numpy as jnp

    from mgd.pipeline import model as model_lib

    target_seqs = np.asarray(target_seqs)
    if target_seqs.ndim != 2 or target_seqs.shape[0] == 0:
        raise ValueError(f"target_seqs must be [M, L+1] with M >= 1, got {target_seqs.shape}")
    grad_sum = jax.jit(lambda p, x: select(jax.grad(
        lambda q: jnp.sum(model_lib.per_example_loss(q, x, model_cfg)))(p)))
    total = None
    for start in range(0, target_seqs.shape[0], batch_size):
        g = grad_sum(params, jnp.asarray(target_seqs[start:start + batch_size]))
        total = g if total is None else jax.tree_util.tree_map(jnp.add, total, g)

    def precondition(g, m):
        return np.asarray(g.astype(jnp.float32) / target_seqs.shape[0] * m, np.float32)
    return jax.tree_util.tree_map(precondition, total,
                                  select(adam_metric(adam_nu, adam_count, b2=b2, eps=eps)))


def last_layer_alignment(params, hidden, resid, up, targets, direction, model_cfg):
    """[N, 3]: for each row, <d loss_row / d theta, direction[theta]> for theta the tied
    embedding in its output role, the final norm's scale, and the last MLP's down
    projection (`ALIGNMENT_COLUMNS`), from `model.forward_with_last_layer`'s outputs.

    These gradients are local: with r_t = softmax(logits_t) - onehot(y_t), the output
    layer's is mean_t r_t h_t^T; the final hidden state's is g_t = r_t E; the final
    norm's scale gets mean_t g_t * xhat_t (xhat the normalised residual); the residual
    stream gets the norm's backward of g_t, delta_t; the down projection gets
    mean_t up_t delta_t^T. Formed `loss_chunk` tokens at a time, like the loss.
    """
    import jax
    import jax.numpy as jnp

    from mgd.pipeline import model as model_lib

    n, length, d = hidden.shape
    acc = model_cfg.acc_dtype
    cd = model_cfg.cdtype
    embed = params["embed"].astype(cd)
    scale = params["norm_f"].astype(acc)
    d_embed = jnp.asarray(direction["embed"]).astype(cd)
    d_norm = jnp.asarray(direction["norm_f"]).astype(acc)
    d_down = jnp.asarray(direction["w_down"]).astype(cd)

    def chunk(hc, xc, uc, tc):
        logits = jnp.einsum("cd,vd->cv", hc, embed, preferred_element_type=acc)
        r = jax.nn.softmax(logits, -1).at[jnp.arange(tc.shape[0]), tc].add(-1.0)
        a_out = jnp.sum(r * jnp.einsum("cd,vd->cv", hc, d_embed, preferred_element_type=acc), -1)
        g = jnp.einsum("cv,vd->cd", r.astype(cd), embed, preferred_element_type=acc)
        xc = xc.astype(acc)
        inv_rms = jax.lax.rsqrt(jnp.mean(xc * xc, -1, keepdims=True) + 1e-6)  # model._rms_norm
        xhat = xc * inv_rms
        a_norm = jnp.sum(g * xhat * d_norm, -1)
        v = g * scale
        delta = inv_rms * (v - xhat * jnp.mean(v * xhat, -1, keepdims=True))
        a_down = jnp.sum(uc.astype(acc) * jnp.einsum("fd,cd->cf", d_down, delta.astype(cd),
                                                     preferred_element_type=acc), -1)
        return jnp.stack([a_out, a_norm, a_down], -1)

    flat = (hidden.reshape(-1, d), resid.reshape(-1, d), up.reshape(-1, up.shape[-1]),
            targets.reshape(-1).astype(jnp.int32))
    per_token = model_lib.map_token_chunks(chunk, flat, model_cfg.loss_chunk)
    return jnp.mean(per_token.reshape(n, length, 3), axis=1).astype(jnp.float32)


def features_with_loss_and_alignment(params_and_direction, seqs, model_cfg):
    """[N, d + 4]: `features_with_loss`'s columns, then `last_layer_alignment`'s three,
    all from one forward pass. Takes (params, direction) as its first argument so that
    `extract_features` places both on the devices."""
    import jax.numpy as jnp

    from mgd.pipeline import model as model_lib
    params, direction = params_and_direction
    seqs = jnp.asarray(seqs)
    hidden, resid, up = model_lib.forward_with_last_layer(params, seqs[:, :-1], model_cfg)
    pooled = jnp.mean(hidden.astype(jnp.float32), axis=1)
    loss = jnp.mean(model_lib.token_losses(params, hidden, seqs[:, 1:], model_cfg), axis=-1)
    align = last_layer_alignment(params, hidden, resid, up, seqs[:, 1:], direction, model_cfg)
    return jnp.concatenate([pooled, loss.astype(jnp.float32)[:, None], align], axis=1)


def gradient_alignment(params, direction, seqs, model_cfg):
    """[N]: for each row, <d loss_row / d theta, direction> over every parameter, with
    `direction` from `target_direction(..., parts="all")`: the first-order estimate of
    the row's label over the whole model.

    Reverse over reverse, without a backward pass per row: with per-row weights c,
    F(c) = <d/d theta sum_i c_i loss_i, direction> is linear in c, and dF/dc_i is the
    row's inner product. One first backward and one pass back through it: the pass
    that differentiates attention's backward, as the oracle's does.
    """
    import jax
    import jax.numpy as jnp

    from mgd.pipeline import model as model_lib

    seqs = jnp.asarray(seqs)
    if jax.tree_util.tree_structure(direction) != jax.tree_util.tree_structure(params):
        raise ValueError("direction must be a tree like params (target_direction with "
                         "parts='all'), got another structure")
    leaves = jax.tree_util.tree_leaves

    def weighted_loss(p, c):
        return jnp.sum(c * model_lib.per_example_loss(p, seqs, model_cfg))

    def inner_product(c):
        g = jax.grad(weighted_loss)(params, c)
        return sum(jnp.sum(a.astype(jnp.float32) * d.astype(jnp.float32))
                   for a, d in zip(leaves(g), leaves(direction)))

    return jax.grad(inner_product)(jnp.ones((seqs.shape[0],), jnp.float32))


def features_with_gradient_alignment(params_and_direction, seqs, model_cfg):
    """[N, d + 5]: `features_with_loss_and_alignment`'s columns, then
    `gradient_alignment`. Takes (params, whole-model direction from
    `target_direction(..., parts="all")`); the last layer's direction is part of it."""
    import jax.numpy as jnp
    params, whole = params_and_direction
    first = features_with_loss_and_alignment((params, _last_layer(whole)), seqs, model_cfg)
    return jnp.concatenate([first, gradient_alignment(params, whole, seqs, model_cfg)[:, None]],
                           axis=1)


def extract_features(params, seqs, model_cfg, *, batch_size: int = 256, progress: bool = True,
                     features_fn=None) -> np.ndarray:
    """[N, d] float32 features of every sequence, batched and split over local devices.

    `features_fn(params, seqs, cfg)` defaults to `model.features`; pass
    `features_with_loss` to append the per-sequence loss from the same pass, or
    `features_with_loss_and_alignment` with `params=(params, target_direction(...))`
    to append the last layer's alignment with the target's gradient too.

    Each batch is sharded along its leading axis over all local devices (one mesh axis),
    so on an 8-GPU host each device runs 1/8 of the batch; on one device it is a plain
    batched call. The last batch is padded up to a device multiple and trimmed after.
    """
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    if features_fn is None:
        from mgd.pipeline import model as model_lib
        features_fn = model_lib.features
    seqs = np.asarray(seqs)
    if seqs.ndim != 2:
        raise ValueError(f"seqs must be [N, L+1] token ids, got shape {seqs.shape}")
    devices = jax.local_devices()
    n_dev = len(devices)
    batch_size = max(n_dev, (batch_size // n_dev) * n_dev)
    mesh = Mesh(np.array(devices), ("data",))
    row_sharding = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    params = jax.device_put(params, replicated)
    fn = jax.jit(lambda p, x: features_fn(p, x, model_cfg))

    out = []
    starts = range(0, seqs.shape[0], batch_size)
    for start in _progress(starts, progress, "features", unit="batch"):
        chunk = seqs[start:start + batch_size]
        n = chunk.shape[0]
        if n < batch_size:   # one padded shape keeps a single compiled program
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
        feats = fn(params, jax.device_put(chunk, row_sharding))
        out.append(np.asarray(feats, dtype=np.float32)[:n])
    return np.concatenate(out, axis=0) if out else np.zeros((0, 0), np.float32)


# ---------------------------------------------------------------------------------------
# Regressors
# ---------------------------------------------------------------------------------------

class _Standardizer:
    def fit(self, x):
        self.mean = x.mean(axis=0)
        # Constant columns (e.g. a dead feature) would divide by zero; leave them at 0.
        std = x.std(axis=0)
        self.std = np.where(std > 1e-12, std, 1.0)
        return self

    def __call__(self, x):
        return (x - self.mean) / self.std


class RidgeRegressor:
    """Ridge regression on standardised features, penalty chosen by exact leave-one-out.

    With X = U S V^T, the hat matrix is U diag(s^2 / (s^2 + a)) U^T, so the LOO residual
    (y_i - yhat_i) / (1 - H_ii) is available for every alpha from one SVD.
    """

    name = "ridge"

    def __init__(self, alphas=RIDGE_ALPHAS):
        self.alphas = tuple(float(a) for a in alphas)
        if not self.alphas or min(self.alphas) < 0:
            raise ValueError(f"alphas must be non-negative and non-empty, got {alphas}")

    def fit(self, x, y):
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        _check_xy(x, y)
        self.scaler = _Standardizer().fit(x)
        xs = self.scaler(x)
        self.y_mean = y.mean()
        yc = y - self.y_mean
        u, s, vt = np.linalg.svd(xs, full_matrices=False)
        uty = u.T @ yc
        self.loo_mse = {}
        for a in self.alphas:
            shrink = s ** 2 / (s ** 2 + a) if a > 0 else (s > 1e-10 * s.max()).astype(float)
            fitted = u @ (shrink * uty)
            leverage = np.einsum("ij,j,ij->i", u, shrink, u)
            loo = (yc - fitted) / np.maximum(1.0 - leverage, 1e-8)
            self.loo_mse[a] = float(np.mean(loo ** 2))
        self.alpha = min(self.loo_mse, key=self.loo_mse.get)
        a = self.alpha
        inv = np.where(s > 1e-10 * s.max(), s / (s ** 2 + a), 0.0)
        self.coef = vt.T @ (inv * uty)
        return self

    def predict(self, x):
        return self.scaler(np.asarray(x, np.float64)) @ self.coef + self.y_mean


class MLPRegressor:
    """A one-hidden-layer MLP (scikit-learn, Adam, early stopping on an inner split).

    Inputs and labels are standardised; a small grid of L2 penalties is tried and the
    one with the best inner-validation Spearman is kept.
    """

    name = "mlp"

    def __init__(self, hidden: int = 256, l2_grid=(1e-2, 1.0), seed: int = 0, max_iter: int = 400):
        self.hidden = hidden
        self.l2_grid = tuple(l2_grid)
        self.seed = seed
        self.max_iter = max_iter

    def _make(self, l2):
        from sklearn.neural_network import MLPRegressor as SkMLP
        return SkMLP(hidden_layer_sizes=(self.hidden,), alpha=l2, learning_rate_init=1e-3,
                     batch_size=min(256, self._n), max_iter=self.max_iter, early_stopping=True,
                     validation_fraction=0.15, n_iter_no_change=25, random_state=self.seed)

    def fit(self, x, y):
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        _check_xy(x, y)
        if x.shape[0] < 20:
            raise ValueError(f"the MLP needs at least 20 labeled rows, got {x.shape[0]}")
        self.scaler = _Standardizer().fit(x)
        xs = self.scaler(x)
        self.y_mean, self.y_std = y.mean(), max(y.std(), 1e-12)
        ys = (y - self.y_mean) / self.y_std
        self._n = x.shape[0]
        rng = np.random.default_rng(self.seed)
        inner = rng.permutation(x.shape[0])
        n_val = max(5, x.shape[0] // 5)
        val, tr = inner[:n_val], inner[n_val:]
        best = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # ConvergenceWarning at max_iter is expected
            for l2 in self.l2_grid:
                rho = spearman(self._make(l2).fit(xs[tr], ys[tr]).predict(xs[val]), ys[val])
                if best is None or rho > best[0]:
                    best = (rho, l2)
            self.l2 = best[1]
            self.net = self._make(self.l2).fit(xs, ys)
        return self

    def predict(self, x):
        return self.net.predict(self.scaler(np.asarray(x, np.float64))) * self.y_std + self.y_mean


def make_regressors(names=("ridge", "mlp"), seed: int = 0, mlp_hidden: int = 256):
    known = {"ridge": lambda: RidgeRegressor(),
             "mlp": lambda: MLPRegressor(hidden=mlp_hidden, seed=seed)}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown regressor(s) {unknown}; choose from {sorted(known)}")
    return [known[n]() for n in names]


# ---------------------------------------------------------------------------------------
# Fitting and scoring
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class ScorerFit:
    scores: np.ndarray            # [N] predicted score of every corpus row
    winner: str
    heldout_spearman: dict        # regressor name -> Spearman on the held-out labeled rows
    heldout_indices: np.ndarray   # corpus rows of the held-out split
    heldout_labels: np.ndarray
    heldout_pred: np.ndarray      # the winner's held-out predictions (fit without them)
    details: dict

    def summary(self) -> dict:
        return {"winner": self.winner,
                "heldout_spearman": {k: float(v) for k, v in self.heldout_spearman.items()},
                "heldout_spearman_winner": float(self.heldout_spearman[self.winner]),
                "n_heldout": int(self.heldout_indices.shape[0]),
                **self.details}


def fit_scorer(features, labeled_indices, labels, *, holdout_fraction: float = 0.2,
               seed: int = 0, regressors=("ridge", "mlp"), mlp_hidden: int = 256) -> ScorerFit:
    """Fit each regressor on a train split of the labeled rows, keep the best by held-out
    Spearman, refit it on all labeled rows and score every row of `features`."""
    features = np.asarray(features)
    labeled_indices = np.asarray(labeled_indices, np.int64)
    labels = np.asarray(labels, np.float64)
    if labeled_indices.shape != labels.shape:
        raise ValueError(f"labeled_indices {labeled_indices.shape} and labels {labels.shape} "
                         f"must have the same shape")
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    ok = np.isfinite(labels)
    labeled_indices, labels = labeled_indices[ok], labels[ok]
    m = labels.shape[0]
    n_hold = int(round(holdout_fraction * m))
    if n_hold < 5 or m - n_hold < 10:
        raise ValueError(f"too few labeled rows ({m}) for a train/held-out split")
    perm = np.random.default_rng(seed).permutation(m)
    hold, train = perm[:n_hold], perm[n_hold:]
    x_lab = features[labeled_indices]

    rhos, preds, fitted = {}, {}, {}
    for reg in make_regressors(regressors, seed=seed, mlp_hidden=mlp_hidden):
        reg.fit(x_lab[train], labels[train])
        preds[reg.name] = reg.predict(x_lab[hold])
        rhos[reg.name] = spearman(preds[reg.name], labels[hold])
        fitted[reg.name] = reg
    winner = max(rhos, key=lambda k: (np.nan_to_num(rhos[k], nan=-2.0)))
    final = make_regressors((winner,), seed=seed, mlp_hidden=mlp_hidden)[0].fit(x_lab, labels)
    details = {"n_labeled": int(m), "n_train": int(train.shape[0])}
    if "ridge" in fitted:
        details["ridge_alpha"] = fitted["ridge"].alpha
    if "mlp" in fitted:
        details["mlp_l2"] = fitted["mlp"].l2
    return ScorerFit(scores=final.predict(features).astype(np.float32), winner=winner,
                     heldout_spearman=rhos, heldout_indices=labeled_indices[hold],
                     heldout_labels=labels[hold], heldout_pred=preds[winner], details=details)


def spearman(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape[0] < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def _check_xy(x, y):
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"expected x [n, d] and y [n], got {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("features and labels must be finite")


def _progress(it, enabled, desc, **kw):
    if not enabled:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, desc=desc, **kw)
