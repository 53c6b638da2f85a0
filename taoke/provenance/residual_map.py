"""An orthogonal map between two models' residual streams, fitted on the embedding rows of the tokens they share.

A model whose residual stream was rotated (QuaRot, SliceGPT: an orthogonal Q folded into the weights around the
norms) has embedding E Q where its parent has E; one with residual dims sliced away has E Q[:, :k]. Orthogonal
Procrustes on the shared rows recovers the map; the held-out rows say whether there is one to recover.
"""

from __future__ import annotations

import numpy as np

from taoke.formats.base import WeightReader
from taoke.provenance.canonical import CanonicalView

MAP_MIN_COS = 0.5      # a fitted residual map this poor on held-out embedding rows is not looked at further


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def shared_token_rows(ta: list[str] | None, tb: list[str] | None) -> np.ndarray | None:
    """[n, 2] (row in A, row in B) of every token both vocabularies hold; None when either has no token list."""
    if not (ta and tb):
        return None
    pos_a = {t: i for i, t in enumerate(ta)}
    return np.array([(pos_a[t], j) for j, t in enumerate(tb) if t in pos_a], dtype=np.int64).reshape(-1, 2)


def _shared_rows(ra: WeightReader, rb: WeightReader, va: CanonicalView,
                 vb: CanonicalView) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(A's embedding, B's embedding, [n, 2] row pairs of the tokens both hold), or None without two embeddings."""
    ea, eb = va.globals.get("embed"), vb.globals.get("embed")
    if ea is None or eb is None or len(ea.shape) != 2 or len(eb.shape) != 2:
        return None
    xa, xb = ra.get(ea.name), rb.get(eb.name)
    shared = shared_token_rows(ra.tokens, rb.tokens)
    if shared is None:   # no tokenizers: row i is token i on both sides
        n = min(len(xa), len(xb))
        shared = np.stack([np.arange(n), np.arange(n)], axis=1)
    shared = shared[(shared[:, 0] < len(xa)) & (shared[:, 1] < len(xb))]
    return xa, xb, shared


def centred(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The rows, centred. Training moves every rarely seen token's row along one shared direction, which any map
    would line up between two unrelated models (held-out cosine 0.85 uncentred on two scratch models)."""
    x = x[rows].astype(np.float32)
    return x - x.mean(axis=0)


def in_place_cos(ra: WeightReader, rb: WeightReader, va: CanonicalView, vb: CanonicalView,
                 sample: int = 4096) -> float | None:
    """Mean cosine of the shared tokens' centred embedding rows as they stand, with no map: near 1 where B keeps
    A's residual basis (copies, fine-tunes, quantized copies), near 0 for a rotated residual stream or an unrelated
    model. None when the widths differ or too few rows are shared to say."""
    rows = _shared_rows(ra, rb, va, vb)
    if rows is None or rows[0].shape[1] != rows[1].shape[1] or len(rows[2]) < 64:
        return None
    xa, xb, shared = rows
    pick = shared[np.random.default_rng(5).permutation(len(shared))[:sample]]
    return float(np.mean(np.sum(unit_rows(centred(xa, pick[:, 0])) * unit_rows(centred(xb, pick[:, 1])), axis=1)))


def residual_map(ra: WeightReader, rb: WeightReader, va: CanonicalView,
                 vb: CanonicalView) -> tuple[np.ndarray, bool, float, int] | None:
    """P (wide x narrow, orthonormal columns) with E_wide P ~ E_narrow on the tokens both vocabularies hold
    (orthogonal Procrustes: P = U V^T of the SVD of E_wide^T E_narrow), whether the wide side is A, the mean row
    cosine of the fit on held-out rows, and the number of rows fitted. None without enough shared rows.

    Written out because scipy's orthogonal_procrustes fits square maps only; a sliced model needs a rectangular one.
    """
    rows = _shared_rows(ra, rb, va, vb)
    if rows is None:
        return None
    xa, xb, shared = rows
    on_a = xa.shape[1] >= xb.shape[1]
    wide, narrow = (xa, xb) if on_a else (xb, xa)
    cols = (0, 1) if on_a else (1, 0)
    if len(shared) < 4 * wide.shape[1]:   # too few rows to pin down ~hidden^2 / 2 free parameters
        return None
    order = np.random.default_rng(5).permutation(len(shared))
    fit_rows = shared[order[:min(len(order) - len(order) // 8, 16384)]]
    held = shared[order[-min(len(order) // 8, 4096):]]
    u, _, vt = np.linalg.svd(centred(wide, fit_rows[:, cols[0]]).T @ centred(narrow, fit_rows[:, cols[1]]),
                             full_matrices=False)
    P = (u @ vt).astype(np.float64)
    cos = np.sum(unit_rows(centred(wide, held[:, cols[0]]) @ P) * unit_rows(centred(narrow, held[:, cols[1]])),
                 axis=1)
    return P, on_a, float(np.mean(cos)), len(fit_rows)
