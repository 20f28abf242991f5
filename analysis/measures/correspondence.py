"""Correspondence between looped and deep models, and the answer through realized depth:
linear CKA (Kornblith et al. 2019), the looped × deep CKA matrix, the logit-lens answer rank and
probability at every layer call, and the early-exit KL signal.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .tables import depth_columns

EXIT_KL_THRESHOLD = 5e-4  # Huginn exits once KL(p_{t-1} || p_t) of its lens falls below this, nats


def _centred_gram(X: np.ndarray) -> np.ndarray:
    """X [..., n, d] -> column-centred Gram matrices [..., n, n] (float64)."""
    X = np.asarray(X, dtype=np.float64)
    Xc = X - X.mean(axis=-2, keepdims=True)
    return Xc @ np.swapaxes(Xc, -1, -2)


def linear_cka(X, Y) -> float:
    """Linear CKA ``||Yᵀ X||²_F / (||Xᵀ X||_F ||Yᵀ Y||_F)`` of column-centred X [n, d1], Y [n, d2]
    (the same n tokens; d1 and d2 may differ) -> float in [0, 1]. Invariant to orthogonal
    transforms and isotropic scaling of either side; NaN if a side is constant or not finite.
    """
    X, Y = np.asarray(X, dtype=np.float64), np.asarray(Y, dtype=np.float64)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"linear_cka needs X [n, d1] and Y [n, d2] with the same n, got {X.shape} and {Y.shape}")
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    n = X.shape[0]
    if n < max(X.shape[1], Y.shape[1]):   # the n×n (Gram) form is cheaper; same value
        K, Lm = Xc @ Xc.T, Yc @ Yc.T
        num, kk, ll = (K * Lm).sum(), (K * K).sum(), (Lm * Lm).sum()
    else:
        num = ((Yc.T @ Xc) ** 2).sum()
        kk, ll = ((Xc.T @ Xc) ** 2).sum(), ((Yc.T @ Yc) ** 2).sum()
    den = np.sqrt(kk * ll)
    if not np.isfinite(den) or not np.isfinite(num):
        return float("nan")
    return float(num / den) if den > 0 else float("nan")


def _same_tokens(looped, deep) -> None:
    a, b = tuple(looped.token_labels), tuple(deep.token_labels)
    if len(a) != len(b) or a != b:
        raise ValueError(f"the two traces read different tokens ({looped.prompt!r} vs {deep.prompt!r}); "
                         "CKA compares the same prompt in both models")
    if looped.vocabulary == deep.vocabulary and not np.array_equal(looped.tokens, deep.tokens):
        raise ValueError("the two traces have different token ids for the same vocabulary")


def cka_matrix(looped, deep) -> np.ndarray:
    """Linear CKA between every looped (iteration, layer) state and every deep layer's state.

    looped: a Trace, states [I, L, T, D1]; deep: a Trace, states [1, L_deep, T, D2] (if it has
    more iterations its last one is used). Returns [I*L, L_deep], rows in realized-depth order
    ``t*L + l``, values in [0, 1] (NaN for non-finite states). Raises ValueError if the traces'
    tokens differ.
    """
    _same_tokens(looped, deep)
    I, L, T, _ = looped.states.shape
    Ka = _centred_gram(looped.states.reshape(I * L, T, -1))          # [N, T, T]
    Kb = _centred_gram(deep.states[-1])                               # [L_deep, T, T]
    num = np.einsum("aij,bij->ab", Ka, Kb)
    na = np.sqrt(np.einsum("aij,aij->a", Ka, Ka))
    nb = np.sqrt(np.einsum("bij,bij->b", Kb, Kb))
    den = np.outer(na, nb)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def answer_through_depth(trace) -> pd.DataFrame:
    """The answer token's logit-lens rank and probability at the last position after every
    block layer call: one row per realized depth, columns depth, iteration, layer,
    relative_depth, depth_fraction (``analysis.measures.tables`` vocabulary: iteration and depth count
    from 1, layer from 0),
    answer_rank (0 = top) and answer_prob. Raises ValueError without an answer."""
    if trace.answer_rank is None or trace.answer_prob is None:
        raise ValueError("this trace has no answer token (free text prompt); nothing to track")
    I, L = trace.answer_rank.shape
    cols = depth_columns(I, L)
    return pd.DataFrame({**{k: cols[k] for k in ("depth", "iteration", "layer", "relative_depth", "depth_fraction")},
                         "answer_rank": np.asarray(trace.answer_rank).ravel().astype(np.int64),
                         "answer_prob": np.asarray(trace.answer_prob, dtype=np.float64).ravel()})


def early_exit_kl(trace) -> np.ndarray:
    """Huginn's early-exit signal at the last token: ``KL(p_{t-1} ‖ p_t)`` of the logit lens at the
    block's last layer, per iteration. -> [I], nats, NaN at t = 0 (exit when below ~5e-4)."""
    return np.array(trace.lens_kl[:, -1], dtype=np.float64)
