"""`verify A B`: does B derive from A (or share an ancestor with it), from the weights alone?

The test, in two streaming passes (one tensor in memory at a time; kept per matrix: its fingerprint, m(m-1)/2
floats, in memory, and its units x 32 sketch in a temporary file):

1. Fingerprint. For every weight matrix that reads from or writes to the residual stream, take the cosine
   between residual dimensions over the other axis (a Gram matrix on a fixed subset of m residual dims).
   It does not change when MLP units or attention heads are permuted, when the vocabulary is reordered or
   extended, or when a matrix is rescaled, and it moves little under quantisation, LoRA merges or fine-tuning.
   It ignores layer-norm gains and embedding norms, which look alike in any two models.
2. Statistic and null. Layer similarity L[a, b] = mean over shared roles of the correlation between
   fingerprints; T = sum over B's layers of the best match in A (robust to pruned, duplicated or moved layers).
   Independently trained models have no preferred correspondence between residual dimensions (training is
   equivariant to permuting them), so T computed after randomly permuting B's residual dims is a draw from the
   null. p = Student-t predictive tail of T against those 40 draws; where that lands between 1e-6 and 0.05, p is
   counted among 1000 draws instead (a plain randomisation test).
3. Evidence. Layers are aligned by a monotone dynamic programme; matched layers are compared tensor by tensor
   after Hungarian matching of MLP units and attention head groups (scipy's linear_sum_assignment), which gives
   the per-layer similarity, what changed, and the relation guess.
"""

from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats
from scipy.optimize import linear_sum_assignment
from threadpoolctl import threadpool_limits

from taoke.errors import ModelError
from taoke.formats import open_weights
from taoke.formats.base import WeightReader
from taoke.library import BaseRef, resolve
from taoke.provenance.canonical import MATRIX_ROLES, NORM_ROLES, READ_ROLES, CanonicalView, Slot, canonical_view
from taoke.provenance.residual_map import MAP_MIN_COS, in_place_cos, residual_map, shared_token_rows, unit_rows

DERIVED_P = 1e-6       # below: the weights share an origin
INDEPENDENT_P = 0.01   # above: no evidence of a shared origin
SKETCH = 32            # width of the random projection used to compare units and tensors
SUBSET = 128           # residual dims in the fingerprint (m); m(m-1)/2 entries per tensor
N_NULL = 40            # random residual permutations for the null
N_NULL_EXACT = 1000    # draws when the normal tail of those 40 lands between the thresholds (p by counting)
AMBIGUOUS_P = 0.05     # normal-tail p from DERIVED_P up to this gets the exact count
P_FLOOR = 1e-300       # report p below this as this (float64 tail underflows)
ROTATED_MIN_FP = 0.5   # under a fitted map: mean best-layer fingerprint correlation a `derived` needs
MAP_MIN_GAIN = 0.25     # a fitted map must raise the rows' in-place cosine by this to count as a rotation
# Relative rounding unit of float storage types (as the readers name them): a copy of a norm gain through one of
# these moves by at most this fraction of its value; quantised types have no such bound.
_ROUNDING = {**dict.fromkeys(("f64", "float64", "double"), 2.0 ** -53),
             **dict.fromkeys(("f32", "float32", "float", "fp32"), 2.0 ** -24),
             **dict.fromkeys(("f16", "float16", "half", "fp16"), 2.0 ** -11),
             **dict.fromkeys(("bf16", "bfloat16"), 2.0 ** -8)}


class SpillStore:
    """Dict-like store of arrays kept in an unlinked temporary file, read back one at a time.

    Unit sketches are ~1/18 of each weight matrix (32 of 576+ columns): kept in memory, a deep model's sketches
    would grow RSS with its depth. In a file they pass through the page cache, which the kernel can reclaim.
    """

    def __init__(self):
        self._file = tempfile.TemporaryFile()
        self._at: dict = {}

    def __setitem__(self, key, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr)
        self._file.seek(0, os.SEEK_END)
        self._at[key] = (self._file.tell(), arr.shape, arr.dtype)
        self._file.write(arr.reshape(-1).view(np.uint8))

    def __getitem__(self, key) -> np.ndarray:
        offset, shape, dtype = self._at[key]
        out = np.empty(shape, dtype)
        self._file.seek(offset)
        self._file.readinto(out.reshape(-1).view(np.uint8))
        return out

    def __contains__(self, key) -> bool:
        return key in self._at

    def get(self, key, default=None):
        return self[key] if key in self._at else default

    def keys(self):
        return self._at.keys()


@dataclass
class Fingerprint:
    keys: list[tuple[int | None, str]]   # (layer, role); layer None for embed/head
    X: np.ndarray                        # one unit-norm, centred Gram row per key (permutation-invariant)
    storage: dict[str, int]              # storage dtype -> count of matrices
    sketch: SpillStore = field(default_factory=SpillStore)   # (layer, role) -> units x k projection of the residual axis
    norms: SpillStore = field(default_factory=SpillStore)   # (layer, role) -> norm gains
    norm_rounding: float | None = 0.0            # coarsest rounding unit of the norm gains' storage; None: unknown


def _rounding(dtype: str) -> float | None:
    return _ROUNDING.get(dtype.lower())


def _tensor_fingerprint(r: torch.Tensor, iu) -> np.ndarray | None:
    """r: (other axis) x (the m residual dims sampled). Cosines between those dims, flattened, centred, unit norm."""
    s = r.sum(dim=0)
    g = r.T @ r - torch.outer(s, s) / r.shape[0]     # Gram of the centred columns without a centred copy
    d = torch.rsqrt(torch.clamp(torch.diagonal(g), min=1e-30))
    v = (g * d[:, None] * d[None, :])[iu]
    v = v - v.mean()
    n = torch.linalg.vector_norm(v)
    return (v / n).numpy() if n > 0 else None


def _residual_side(slot: Slot, hidden: int) -> bool | None:
    """True when the residual stream is on the columns (reads), False on rows (writes), None if neither."""
    if len(slot.shape) != 2:
        return None
    rows, cols = slot.shape
    if slot.role in MATRIX_ROLES and rows == hidden and cols == hidden:
        return slot.role in READ_ROLES
    if cols == hidden:
        return True
    if rows == hidden:
        return False
    return None


def _fingerprinted(view: CanonicalView, idx: np.ndarray) -> list[Slot]:
    """The matrices that get a fingerprint (decided from shapes alone), sorted by (role, layer): the rows of X,
    each role one contiguous block."""
    out = []
    for slot in view.slots():
        if not (slot.role in MATRIX_ROLES or slot.role in ("embed", "head")):
            continue
        side = _residual_side(slot, view.hidden)
        if side is not None and (slot.shape[1] if side else slot.shape[0]) >= idx.max() + 1:
            out.append(slot)
    return sorted(out, key=lambda s: (s.role, -1 if s.layer is None else s.layer))


# The norm whose gain scales each reading matrix's input (what a rotation folds into it).
_GAIN_OF = {"attn_q": "attn_norm", "attn_k": "attn_norm", "attn_v": "attn_norm", "attn_qkv": "attn_norm",
            "ffn_gate": "ffn_norm", "ffn_up": "ffn_norm"}


def fingerprint(reader: WeightReader, view: CanonicalView, idx: np.ndarray, proj: np.ndarray | None,
                residual_map: np.ndarray | None = None, fold_norms: bool = False) -> Fingerprint:
    """One streaming pass: Gram fingerprints, unit sketches (units x k) and norm gains of every layer tensor.

    `proj` (hidden x k, shared by both models) projects the residual axis; None when widths differ.
    `residual_map` (hidden x hidden) takes this model's residual basis to the other's before anything is measured;
    `fold_norms` scales each reading matrix's columns by the gain of the norm before it (a rotated model has its
    gains folded in that way, so both sides are compared folded).
    Memory: X is allocated once up front and sketches and norms go to a file, so nothing small and long-lived
    is interleaved on the heap with the freed tensor buffers (that kept ~0.4 MB per layer resident).
    """
    m = len(idx)
    iu = torch.triu(torch.ones(m, m, dtype=torch.bool), diagonal=1)
    tidx = torch.from_numpy(idx)
    tproj = torch.from_numpy(proj) if proj is not None else None
    planned = _fingerprinted(view, idx)
    row = {s.name: i for i, s in enumerate(planned)}
    fp = Fingerprint([(s.layer, s.role) for s in planned], np.empty((len(planned), m * (m - 1) // 2), np.float32),
                     {}, norms=SpillStore())
    kept = np.zeros(len(planned), dtype=bool)
    gains = _gains(reader, view) if fold_norms else {}
    # Only the sampled dims and the sketch are ever read from the mapped residual axis: map those columns alone
    # (m + k of them instead of all hidden: ~4x less work on a 576-wide model).
    tmap = torch.from_numpy(residual_map.astype(np.float32)) if residual_map is not None else None
    pick = tmap[:, tidx] if tmap is not None else None
    tproj = tmap @ tproj if tmap is not None and tproj is not None else tproj
    for slot in view.slots():   # the view's order (globals, then layer by layer), not X's
        if slot.role in NORM_ROLES and slot.layer is not None:
            fp.norms[(slot.layer, slot.role)] = reader.get(slot.name)
            u = _rounding(reader.meta(slot.name).dtype)
            fp.norm_rounding = None if u is None or fp.norm_rounding is None else max(fp.norm_rounding, u)
            continue
        if slot.name not in row:
            continue
        w = torch.from_numpy(reader.get(slot.name))
        w = w if _residual_side(slot, view.hidden) else w.T      # (units) x (residual)
        g = gains.get((slot.layer, _GAIN_OF.get(slot.role, "final_norm" if slot.role == "head" else None)))
        if g is not None and g.shape[0] == w.shape[1]:
            w = w * torch.from_numpy(g.astype(np.float32))
        mapped = pick is not None and w.shape[1] == pick.shape[0]
        v = _tensor_fingerprint(w @ pick if mapped else w[:, tidx], iu)
        if v is None:
            continue
        fp.X[row[slot.name]], kept[row[slot.name]] = v, True
        if tproj is not None and w.shape[1] == tproj.shape[0]:
            fp.sketch[(slot.layer, slot.role)] = (w @ tproj).numpy()
        dt = reader.meta(slot.name).dtype
        fp.storage[dt] = fp.storage.get(dt, 0) + 1
        del w
    if not kept.all():   # constant tensors have no fingerprint
        fp.X = fp.X[kept]
        fp.keys = [k for k, ok in zip(fp.keys, kept) if ok]
    return fp


def fingerprint_pair(a: tuple, b: tuple, maps: tuple = (None, None), fold_norms: bool = False
                     ) -> tuple[Fingerprint, Fingerprint]:
    """Both models' fingerprints (each argument: reader, view, idx, proj), side by side in two threads where the
    machine has two cores: each pass is single-threaded matmuls that release the GIL, so two cores take about half
    the time; memory holds one tensor of each model at a time, the bound the streaming pass promises anyway. One
    reader given for both models reads in turn: a reader's file position is not shared safely between threads."""
    if (os.cpu_count() or 1) < 2 or a[0] is b[0]:
        return (fingerprint(*a, residual_map=maps[0], fold_norms=fold_norms),
                fingerprint(*b, residual_map=maps[1], fold_norms=fold_norms))
    with ThreadPoolExecutor(2) as pool:
        fa = pool.submit(fingerprint, *a, residual_map=maps[0], fold_norms=fold_norms)
        fb = pool.submit(fingerprint, *b, residual_map=maps[1], fold_norms=fold_norms)
        return fa.result(), fb.result()


def _gains(reader: WeightReader, view: CanonicalView) -> dict:
    """(layer, norm role) -> gain vector, final norm under (None, "final_norm")."""
    out = {(s.layer, s.role): reader.get(s.name) for s in view.slots()
           if (s.role in NORM_ROLES and s.layer is not None) or (s.role == "final_norm" and s.layer is None)}
    return {k: v for k, v in out.items() if v.ndim == 1}


def _role_blocks(fa: Fingerprint, fb: Fingerprint, la: list[int], lb: list[int]) -> list[tuple]:
    """Per role present in layers of both: (rows of A's X, rows of B's X, their positions in la / lb)."""
    def spans(fp: Fingerprint, pos: dict) -> dict:
        out: dict = {}   # role -> [first row, end row, layer positions]; rows are grouped by role
        for i, (layer, role) in enumerate(fp.keys):
            if layer is not None:
                span = out.setdefault(role, [i, i, []])
                span[1] = i + 1
                span[2].append(pos[layer])
        return out
    sa, sb = spans(fa, {l: i for i, l in enumerate(la)}), spans(fb, {l: i for i, l in enumerate(lb)})
    return [(slice(*sa[r][:2]), slice(*sb[r][:2]), np.array(sa[r][2]), np.array(sb[r][2]))
            for r in sorted(set(sa) & set(sb))]


def _layer_matrix(fa: Fingerprint, fb: Fingerprint, blocks: list[tuple], shape: tuple[int, int],
                  perm: np.ndarray | None = None) -> np.ndarray:
    """L[a, b] = mean over roles present in both layers of the fingerprint correlation.

    Only same-role pairs are ever compared, so one small matrix product per role replaces the full
    (all tensors x all tensors) product. `perm`: B's fingerprint entries under a residual permutation (null).
    """
    total = np.zeros(shape)
    count = np.zeros(shape)
    for rows_a, rows_b, ia, ib in blocks:
        xb = fb.X[rows_b] if perm is None else np.take(fb.X[rows_b], perm, axis=1)
        block = (torch.from_numpy(fa.X[rows_a]) @ torch.from_numpy(xb).T).numpy()
        total[np.ix_(ia, ib)] += block
        count[np.ix_(ia, ib)] += 1
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)


def _statistic(L: np.ndarray, embed: float | None) -> float:
    t = float(L.max(axis=0).sum()) if L.size else 0.0
    return t + (embed or 0.0)


def align_layers(L: np.ndarray, tau: float) -> list[tuple[int, int]]:
    """Monotone alignment of B's layers onto A's (non-decreasing: A layers may be skipped or reused).

    Maximises the sum of (L - tau) over matched pairs; a B layer stays unmatched when nothing beats tau.
    """
    na, nb = L.shape
    if na == 0 or nb == 0:
        return []
    f = np.zeros(na)                 # best score so far with last matched A index <= a
    choice = np.full((nb, na), -1)   # A index matched to B layer j on the best path ending <= a
    for j in range(nb):
        g = f + L[:, j] - tau                     # match j to a
        best_idx = np.zeros(na, dtype=int)
        run_val, run_idx = -np.inf, -1
        cm = np.empty(na)
        for a in range(na):                       # cumulative max of g with argmax
            if g[a] > run_val:
                run_val, run_idx = g[a], a
            cm[a], best_idx[a] = run_val, run_idx
        take = cm > f
        choice[j] = np.where(take, best_idx, -1)
        f = np.where(take, cm, f)
    pairs, a = [], na - 1
    for j in range(nb - 1, -1, -1):
        c = choice[j][a]
        if c >= 0:
            pairs.append((int(c), j))
            a = c
    return pairs[::-1]


# ---------------------------------------------------------------- pass 2: tensor-level comparison

def _cos(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.ravel().astype(np.float64), y.ravel().astype(np.float64)
    d = np.linalg.norm(x) * np.linalg.norm(y)
    return float(x @ y / d) if d > 0 else 0.0


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    return _cos(x - x.mean(), y - y.mean())


def _match_units(fa: np.ndarray, fb: np.ndarray) -> tuple[np.ndarray, bool]:
    """Order of B's units matching A's units: identity when it already fits, else Hungarian on cosines."""
    if len(fa) != len(fb):  # different widths: compare nothing unit by unit
        return np.arange(min(len(fa), len(fb))), False
    ua, ub = unit_rows(fa), unit_rows(fb)
    if float(np.mean(np.sum(ua * ub, axis=1))) > 0.5:  # unrelated unit vectors have cosine ~0
        return np.arange(len(fa)), False
    c = ua @ ub.T
    rows, cols = linear_sum_assignment(-c)
    return cols[np.argsort(rows)], True


def _align_layer(sa: dict, sb: dict, heads: tuple[int, int] | None) -> tuple[dict, list[str]]:
    """Permute B's MLP units and attention head groups onto A's. Inputs: role -> (units x k) sketches."""
    sb = dict(sb)
    notes = []
    mlp = [r for r in ("ffn_gate", "ffn_up", "ffn_down") if r in sa and r in sb and sa[r].shape == sb[r].shape]
    if mlp and len({sa[r].shape[0] for r in mlp}) == 1:
        order, moved = _match_units(*(np.concatenate([unit_rows(x[r]) for r in mlp], axis=1) for x in (sa, sb)))
        if moved:
            notes.append("MLP units permuted")
            for r in mlp:
                sb[r] = sb[r][order]
    attn = ("attn_q", "attn_k", "attn_v", "attn_o")
    if heads and all(r in sa and r in sb and sa[r].shape == sb[r].shape for r in attn):
        n_head, n_kv = heads
        hd = sa["attn_q"].shape[0] // n_head
        g = n_head // n_kv
        if sa["attn_k"].shape[0] == n_kv * hd:
            def groups(x):  # one feature row per kv group: its k, v units and its q, o head units
                return np.concatenate([unit_rows(x[r].reshape(n_kv, -1)) for r in attn], axis=1)

            order, moved = _match_units(groups(sa), groups(sb))
            if moved:
                notes.append("attention heads permuted")
                qi = np.concatenate([np.arange(gi * g * hd, (gi + 1) * g * hd) for gi in order])
                ki = np.concatenate([np.arange(gi * hd, (gi + 1) * hd) for gi in order])
                sb["attn_q"], sb["attn_o"] = sb["attn_q"][qi], sb["attn_o"][qi]
                sb["attn_k"], sb["attn_v"] = sb["attn_k"][ki], sb["attn_v"][ki]
    return sb, notes


def _low_rank_energy(delta: np.ndarray, r: int = 8) -> float:
    """Share of the change's energy in its top r directions (on the k-dim sketch: a rank-r change keeps rank r)."""
    s = np.linalg.svd(delta.astype(np.float32), compute_uv=False)
    e = s ** 2
    return float(e[:r].sum() / e.sum()) if e.sum() > 0 else 1.0


def _heads(cfg: dict) -> tuple[int, int] | None:
    n = cfg.get("num_attention_heads") or cfg.get("n_head") or cfg.get("num_heads")
    kv = cfg.get("num_key_value_heads") or n
    return (int(n), int(kv)) if n and kv and n % kv == 0 else None


@dataclass
class LayerMatch:
    a: int
    b: int
    names_a: list[str]
    names_b: list[str]
    fingerprint: float                    # Gram-fingerprint correlation (permutation-invariant)
    similarity: float | None = None       # mean cosine of aligned tensors
    tensors: dict = field(default_factory=dict)   # role -> {cos, scale}
    notes: list[str] = field(default_factory=list)
    norm_raw_cos: float | None = None     # raw cosine of norm gains (looks high for any two models)
    norm_centered: float | None = None    # centred correlation of norm gains (the honest one)
    norm_changed: bool | None = None      # gains moved beyond storage rounding (None: cannot tell)

    def to_dict(self) -> dict:
        return {"a": f"blk.{self.a}", "b": f"blk.{self.b}", "names_a": self.names_a, "names_b": self.names_b,
                "similarity": None if self.similarity is None else round(self.similarity, 6),
                "fingerprint": round(self.fingerprint, 6), "tensors": self.tensors, "notes": self.notes,
                "norm_raw_cos": self.norm_raw_cos, "norm_centered": self.norm_centered,
                "norm_changed": self.norm_changed}


@dataclass
class VerifyResult:
    a: str
    b: str
    verdict: str
    p_value: float
    relation: str
    statistic: float
    null_mean: float
    null_sd: float
    z: float
    layers: list[LayerMatch]
    layer_matrix: np.ndarray
    layers_a: list[int]
    layers_b: list[int]
    view_a: CanonicalView
    view_b: CanonicalView
    vocab: dict
    changes: list[str]
    evidence: list[str]
    seconds: float
    p_permutation: float = 1.0   # the randomisation bound; p_value below it is the normal approximation's tail
    null_draws: int = N_NULL

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "verdict": self.verdict, "p_value": self.p_value,
                "p_permutation": round(self.p_permutation, 6),
                "relation": self.relation, "statistic": round(self.statistic, 4),
                "null": {"mean": round(self.null_mean, 4), "sd": round(self.null_sd, 5), "draws": self.null_draws},
                "z": round(self.z, 2), "architecture": {"a": self.view_a.to_dict(), "b": self.view_b.to_dict()},
                "layers": [m.to_dict() for m in self.layers], "vocab": self.vocab, "changes": self.changes,
                "evidence": self.evidence, "seconds": round(self.seconds, 2)}


def _residual_subset(hidden: int, m: int) -> np.ndarray:
    m = min(m, hidden)
    return np.sort(np.random.default_rng(0).choice(hidden, size=m, replace=False))


def _perm_index(m: int, perm: np.ndarray) -> np.ndarray:
    """Index map of the flattened upper triangle when residual dims are permuted by `perm`."""
    iu, ju = np.triu_indices(m, k=1)
    flat = np.zeros((m, m), dtype=np.int64)
    flat[iu, ju] = np.arange(len(iu))
    flat[ju, iu] = flat[iu, ju]
    return flat[perm[iu], perm[ju]]


def _vocab_report(ra: WeightReader, rb: WeightReader, va: CanonicalView, vb: CanonicalView,
                  fa: Fingerprint, fb: Fingerprint) -> dict:
    ea, eb = va.globals.get("embed"), vb.globals.get("embed")
    out = {"rows_a": ea.shape[0] if ea else None, "rows_b": eb.shape[0] if eb else None}
    shared = shared_token_rows(ra.tokens, rb.tokens)
    if shared is not None:
        out.update(shared=len(shared), added=len(rb.tokens) - len(shared), removed=len(ra.tokens) - len(shared),
                   reordered=int(np.sum(shared[:, 0] != shared[:, 1])))
    else:
        n = min(out["rows_a"] or 0, out["rows_b"] or 0)
        shared = np.stack([np.arange(n), np.arange(n)], axis=1)
        out.update(shared=None, added=max(0, (out["rows_b"] or 0) - (out["rows_a"] or 0)), removed=None,
                   reordered=None)
    xa, xb = fa.sketch.get((None, "embed")), fb.sketch.get((None, "embed"))
    if xa is not None and xb is not None and len(shared):
        sample = shared[np.random.default_rng(0).permutation(len(shared))[:4096]]
        sample = sample[(sample[:, 0] < len(xa)) & (sample[:, 1] < len(xb))]
        cos = np.sum(unit_rows(xa[sample[:, 0]]) * unit_rows(xb[sample[:, 1]]), axis=1)
        out["shared_rows_cos"] = round(float(np.mean(cos)), 4)
    return out


def verify(a, b, n_null: int = N_NULL, subset: int = SUBSET, deep: bool = True, threads: int = 1) -> VerifyResult:
    """Test whether B derives from A (or shares an ancestor). `a`/`b`: references, paths or open readers.

    threads=1 by default (per matmul): the matrices are small, and on a shared laptop-class CPU multi-threaded BLAS
    waiting on a busy core made verify 5-10x slower in our measurements. The two models are fingerprinted side by
    side instead (fingerprint_pair), which keeps each core on its own stream of work.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            return _verify(a, b, n_null, subset, deep)
    finally:
        torch.set_num_threads(before)


def reference_label(ref) -> str:
    """What the user named: a BaseRef's name, a reader's path, or the reference string."""
    name = getattr(ref, "name", None)
    return str(name) if isinstance(name, str) else str(getattr(ref, "path", ref))


def _verify(a, b, n_null: int, subset: int, deep: bool) -> VerifyResult:
    t0 = time.perf_counter()
    ra = a if isinstance(a, WeightReader) else open_weights(a)
    rb = b if isinstance(b, WeightReader) else open_weights(b)
    va, vb = canonical_view(ra), canonical_view(rb)
    evidence: list[str] = [f"A: {va.family}, {len(va.layers)} layers, width {va.hidden}; "
                           f"B: {vb.family}, {len(vb.layers)} layers, width {vb.hidden}"]
    if not va.hidden or not vb.hidden or not va.layers or not vb.layers:
        return _no_evidence(a, b, va, vb, evidence + ["no transformer layers recognised in one of the models"], t0)
    h = min(va.hidden, vb.hidden)
    if va.hidden != vb.hidden:
        evidence.append(f"residual widths differ ({va.hidden} vs {vb.hidden}): fingerprints use the first {h} dims")
    idx = _residual_subset(h, subset) if va.hidden == vb.hidden else np.arange(min(h, subset))
    proj = None
    if va.hidden == vb.hidden:  # shared random projection of the residual axis for the unit sketches
        proj = (np.random.default_rng(7).standard_normal((h, SKETCH)) / np.sqrt(SKETCH)).astype(np.float32)
    # Shared tokens whose embedding rows disagree in place (equal widths) are what a rotated residual stream looks
    # like, and a rotation leaves the plain pass nothing to find: look for the rotation first, and skip the plain
    # pass when it is found (the verdict is the one the plain-then-rotation order gives, one fingerprint pass
    # sooner). The embeddings read here are read again by residual_map: holding them would cost more memory
    # than the second read from the page cache costs time.
    in_place = in_place_cos(ra, rb, va, vb) if va.hidden == vb.hidden else None
    rotation_first = in_place is not None and in_place < MAP_MIN_COS
    rotated, note = (_try_rotation(ra, rb, va, vb, n_null, subset, deep, evidence, in_place) if rotation_first
                     else (None, None))
    if rotated is None:
        fa, fb = fingerprint_pair((ra, va, idx, proj), (rb, vb, idx, proj))
        test = _significance(fa, fb, idx, n_null, use_embed=True)
        if test is None:
            return _no_evidence(a, b, va, vb, evidence + ["no weight matrices with a shared role to compare"], t0)
        judged = _judged(ra, rb, va, vb, fa, fb, test, deep, list(evidence))
        if judged[0] != "derived" and not rotation_first:
            rotated, note = _try_rotation(ra, rb, va, vb, n_null, subset, deep, evidence)
        if rotated is None and note and judged[0] != "derived":
            judged[3].append(note)
    verdict, relation, changes, evidence, test, layers, vocab = rotated or judged
    res = VerifyResult(reference_label(a), reference_label(b), verdict, test.p, relation, test.t_obs, test.mu,
                       test.sd, test.z, layers, test.L, test.la, test.lb, va, vb, vocab, changes, evidence,
                       time.perf_counter() - t0, test.p_permutation, test.n_null)
    for r in (ra, rb):
        if r is not a and r is not b:
            r.close()
    return res


@dataclass
class Significance:
    L: np.ndarray          # layer similarity matrix, A's layers x B's
    la: list[int]
    lb: list[int]
    t_obs: float
    mu: float
    sd: float
    z: float
    p: float
    tau: float             # a layer pair counts as matched above this
    n_null: int
    p_permutation: float   # (1 + null draws >= the statistic) / (draws + 1): what the draws alone can show


def _significance(fa: Fingerprint, fb: Fingerprint, idx: np.ndarray, n_null: int,
                  use_embed: bool) -> Significance | None:
    """The fingerprint statistic and its residual-permutation null. `use_embed=False` leaves the embedding out
    (when it was used to fit a residual map it would match by construction)."""
    la = sorted({l for l, _ in fa.keys if l is not None})
    lb = sorted({l for l, _ in fb.keys if l is not None})
    shared_roles = {r for l, r in fa.keys if l is not None} & {r for l, r in fb.keys if l is not None}
    if not la or not lb or not shared_roles:
        return None
    ea = fa.keys.index((None, "embed")) if use_embed and (None, "embed") in fa.keys else None
    eb = fb.keys.index((None, "embed")) if use_embed and (None, "embed") in fb.keys else None
    blocks = _role_blocks(fa, fb, la, lb)

    def stat_for(perm=None):
        L = _layer_matrix(fa, fb, blocks, (len(la), len(lb)), perm)
        if ea is None or eb is None:
            return L, None
        xb = fb.X[eb] if perm is None else fb.X[eb][perm]
        return L, float(fa.X[ea] @ xb)

    L, emb = stat_for()
    t_obs = _statistic(L, emb)
    rng = np.random.default_rng(1234)
    m = len(idx)
    null = []
    entries = np.zeros(3)   # count, sum, sum of squares of null layer-pair entries (for tau)

    def draw(n):
        nonlocal entries
        for _ in range(n):
            Lp, ep = stat_for(_perm_index(m, rng.permutation(m)))
            null.append(_statistic(Lp, ep))
            entries += (Lp.size, Lp.sum(), np.square(Lp).sum())

    draw(n_null)
    mu, sd = float(np.mean(null)), float(np.std(null, ddof=1))
    z = (t_obs - mu) / max(sd, 1e-12)
    # The tail of one more draw given n draws' mean and sample sd is Student-t with n - 1 degrees of freedom
    # (scaled by sqrt(1 + 1/n)), not the plug-in Gaussian: with the Gaussian, one of 190 independent pairs of the
    # calibration study came out at p = 8.5e-8 (`related`); the t tail gives it 3.7e-6, which is then counted.
    p = float(max(stats.t.sf(z / np.sqrt(1 + 1 / n_null), df=n_null - 1), P_FLOOR))
    if DERIVED_P <= p < AMBIGUOUS_P:
        # Between the thresholds the normal tail of 40 draws is not to be trusted (the null need not be Gaussian):
        # draw until the permutation p itself resolves the `independent` threshold, and report that p.
        draw(N_NULL_EXACT - n_null)
        mu, sd = float(np.mean(null)), float(np.std(null, ddof=1))
        z = (t_obs - mu) / max(sd, 1e-12)
    n_drawn = len(null)
    p_perm = (1 + int(np.sum(np.array(null) >= t_obs))) / (n_drawn + 1)
    if n_drawn > n_null:
        p = p_perm
    e_mean = entries[1] / entries[0]
    e_sd = np.sqrt(max(entries[2] / entries[0] - e_mean ** 2, 0.0))
    return Significance(L, la, lb, t_obs, mu, sd, float(z), p, float(e_mean + 6 * e_sd), n_drawn, p_perm)


def _judged(ra, rb, va, vb, fa, fb, test: Significance, deep: bool, evidence: list[str]) -> tuple:
    """Layer alignment, tensor-level comparison and the verdict for one significance test."""
    pairs = align_layers(test.L, test.tau) if test.p < INDEPENDENT_P else []
    how = "counted among the draws" if test.p == test.p_permutation else "Student-t tail of the draws"
    evidence.append(f"fingerprint statistic {test.t_obs:.3f} vs null {test.mu:.3f} ± {test.sd:.4f} "
                    f"({test.n_null} residual permutations): z = {test.z:.1f}, p = {test.p:.3g} ({how})")
    layers = [LayerMatch(test.la[i], test.lb[j], [], [], float(test.L[i, j])) for i, j in pairs]
    vocab: dict = {}
    if deep and layers:
        _compare_layers(ra, va, vb, fa, fb, layers)
        vocab = _vocab_report(ra, rb, va, vb, fa, fb)
    verdict, relation, changes = _judge(test.p, layers, test.L, test.la, test.lb, fa, fb, vocab, va, vb, evidence)
    return verdict, relation, changes, evidence, test, layers, vocab


def _try_rotation(ra, rb, va, vb, n_null, subset, deep, evidence,
                  in_place: float | None = None) -> tuple[tuple | None, str | None]:
    """Second look for a model whose residual stream was rotated, or rotated and sliced (SliceGPT): B's weights are
    A's around an orthogonal Q, or around the first columns of one.

    The map is fitted on the embedding rows of the tokens both share (orthogonal Procrustes), takes the wider
    model's residual basis onto the narrower's, norm gains are folded into the matrices that read them on both
    sides, and the test runs again on the layers only (the embedding fitted the map). Its verdict replaces the
    plain one only when it is `derived`: a map fitted on embeddings can also line up two unrelated models' token
    geometry, which must never read as evidence by itself. Returns (the judged tuple, None) when it is, else
    (None, what was seen, for the plain verdict's evidence, or None). `in_place`: the rows' cosine with no map; a map
    that explains the embedding barely better than none is no rotation (a fine-tune that moved its embedding far).
    """
    fit = residual_map(ra, rb, va, vb)
    if fit is None:
        return None, None
    P, on_a, fit_cos, rows = fit
    if fit_cos < MAP_MIN_COS:   # no orthogonal map explains one embedding by the other: nothing to look at
        return None, (f"no rotation of the residual stream explains B's embedding either (best orthogonal map: "
                      f"held-out row cosine {fit_cos:.3f} on {rows} shared rows)")
    if in_place is not None and fit_cos < in_place + MAP_MIN_GAIN:
        return None, (f"the best orthogonal map explains B's embedding little better than none (held-out row cosine "
                      f"{fit_cos:.3f} with it, {in_place:.3f} without): no rotation of the residual stream")
    h = min(va.hidden, vb.hidden)
    idx = _residual_subset(h, subset)
    proj = (np.random.default_rng(7).standard_normal((h, SKETCH)) / np.sqrt(SKETCH)).astype(np.float32)
    fa, fb = fingerprint_pair((ra, va, idx, proj), (rb, vb, idx, proj), maps=(P if on_a else None,
                                                                             None if on_a else P), fold_norms=True)
    test = _significance(fa, fb, idx, n_null, use_embed=False)
    if test is None:
        return None, None
    shape = "rotation" if va.hidden == vb.hidden else f"rotation and slice ({va.hidden} -> {vb.hidden} dims)"
    note = (f"residual {shape} fitted on {rows} shared embedding rows (orthogonal Procrustes; held-out row cosine "
            f"{fit_cos:.3f}; norm gains folded on both sides)")
    judged = _judged(ra, rb, va, vb, fa, fb, test, deep, list(evidence) + [note])
    layer_fp = float(test.L.max(axis=0).mean())
    judged[3].append(f"mean best-layer fingerprint correlation under the map {layer_fp:.3f} (`derived` needs "
                     f"{ROTATED_MIN_FP}): a fitted map breaks the permutation null, so p here is no calibrated "
                     "figure and the verdict rests on this similarity")
    if judged[0] != "derived" or layer_fp < ROTATED_MIN_FP:
        return None, (f"no rotation of the residual stream explains B either: {note}, then mean best-layer "
                      f"fingerprint correlation {layer_fp:.3f} (derived needs {ROTATED_MIN_FP})")
    verdict, relation, changes, *rest = judged
    if va.hidden != vb.hidden and relation in ("copy", "quantized", "unknown"):
        relation = "pruned"   # residual dims removed: the width pruning SliceGPT does
    changes.insert(0, "residual stream rotated by an orthogonal map" + (
        "" if va.hidden == vb.hidden else f" and sliced from {va.hidden} to {vb.hidden} dims"))
    return (verdict, relation, changes, *rest), None


def _compare_layers(ra, va, vb, fa: Fingerprint, fb: Fingerprint, layers: list[LayerMatch]) -> None:
    heads = _heads(ra.config or {})
    for k, lm in enumerate(layers):
        sa, sb = va.layers[lm.a], vb.layers[lm.b]
        roles = sorted((set(sa) & set(sb)) & (MATRIX_ROLES | NORM_ROLES))
        lm.names_a = [sa[r].name for r in roles]
        lm.names_b = [sb[r].name for r in roles]
        xa = {r: fa.sketch[(lm.a, r)] for r in roles if (lm.a, r) in fa.sketch and (lm.b, r) in fb.sketch}
        xb = {r: fb.sketch[(lm.b, r)] for r in xa}
        xb, lm.notes = _align_layer(xa, xb, heads)
        cosines = []
        for r in sorted(xa):
            if xa[r].shape != xb[r].shape:
                lm.tensors[r] = {"cos": None, "note": f"{xa[r].shape[0]} -> {xb[r].shape[0]} units"}
                continue
            c = _cos(xa[r], xb[r])
            scale = float(np.linalg.norm(xb[r]) / max(np.linalg.norm(xa[r]), 1e-12))
            entry = {"cos": round(c, 6), "scale": round(scale, 4)}
            if c < 0.99999:
                entry["delta_rank8_energy"] = round(_low_rank_energy(xb[r] / scale - xa[r]), 4)
            lm.tensors[r] = entry
            cosines.append(c)
        norms = [r for r in roles if (lm.a, r) in fa.norms and (lm.b, r) in fb.norms]
        if norms:
            ga = np.concatenate([fa.norms[(lm.a, r)] for r in norms])
            gb = np.concatenate([fb.norms[(lm.b, r)] for r in norms])
            if ga.shape == gb.shape:
                lm.norm_raw_cos, lm.norm_centered = round(_cos(ga, gb), 4), round(_pearson(ga, gb), 4)
                lm.norm_changed = norms_changed(ga, gb, fa.norm_rounding, fb.norm_rounding)
        lm.similarity = float(np.mean(cosines)) if cosines else None


def norms_changed(ga: np.ndarray, gb: np.ndarray, ua: float | None, ub: float | None) -> bool | None:
    """True when norm gains differ by more than storing them in A's or B's float type could explain.

    Quantisers (GGUF, ONNX int8) keep norm gains in float; training moves them. None when a storage type is
    itself quantised or unknown.
    """
    if ua is None or ub is None:
        return None
    tol = 2 * max(ua, ub) * np.maximum(np.abs(ga), np.abs(gb)) + np.finfo(np.float32).tiny
    return bool(np.any(np.abs(gb.astype(np.float64) - ga) > tol))


def _quantized_types(fp: Fingerprint) -> set[str]:
    return {k for k in fp.storage if k.upper().startswith(("Q", "I8", "U8", "IQ"))}


def _judge(p, layers, L, la, lb, fa, fb, vocab, va, vb, evidence) -> tuple[str, str, list[str]]:
    changes: list[str] = []
    if p >= INDEPENDENT_P:
        evidence.append("no layer of B is closer to a layer of A than chance")
        return "independent", "unknown", changes
    if p >= DERIVED_P:
        evidence.append("weak evidence only: some similarity, not enough to call")
        return "inconclusive", "unknown", changes
    sims = [m.similarity for m in layers if m.similarity is not None]
    mean_sim = float(np.mean(sims)) if sims else float(np.mean([m.fingerprint for m in layers] or [0]))
    a_used = {m.a for m in layers}
    b_used = {m.b for m in layers}
    dropped = [l for l in la if l not in a_used]
    b_extra = [l for l in lb if l not in b_used]
    dup = len(layers) - len(a_used)
    if dropped:
        changes.append(f"layers of A not found in B: {_ranges(dropped)}")
    if b_extra:
        changes.append(f"layers of B with no counterpart in A: {_ranges(b_extra)}")
    if dup:
        changes.append(f"{dup} layer(s) of A appear more than once in B")
    notes = sorted({n for m in layers for n in m.notes})
    scaled = sorted({r for m in layers for r, t in m.tensors.items() if abs(t.get("scale", 1.0) - 1.0) > 0.05})
    if scaled:
        notes.append(f"rescaled tensors: {', '.join(scaled)}")
    changes += notes
    q_a, q_b = _quantized_types(fa), _quantized_types(fb)
    if q_a != q_b:
        changes.append(f"quantised storage: A {', '.join(sorted(q_a)) or 'none'}, B {', '.join(sorted(q_b)) or 'none'}")
    if vocab.get("added"):
        changes.append(f"vocabulary: {vocab['added']} token rows added")
    if vocab.get("reordered"):
        changes.append(f"vocabulary: {vocab['reordered']} shared tokens moved to other ids")
    moved = sorted(((t["cos"], f"blk.{m.b}.{r}") for m in layers for r, t in m.tensors.items()
                    if t.get("cos") is not None), key=lambda x: x[0])[:3]
    if moved and moved[0][0] < 0.99999:
        changes.append("tensors that moved most: " + ", ".join(f"{n} (cos {c:.3f})" for c, n in moved))
    coverage = len(b_used) / max(len(lb), 1)
    evidence.append(f"{len(layers)} of B's {len(lb)} layers matched to A's; mean aligned cosine {mean_sim:.3f}")
    ln = [m for m in layers if m.norm_raw_cos is not None]
    if ln:
        evidence.append(f"norm gains: raw cosine {np.mean([m.norm_raw_cos for m in ln]):.3f}, centred "
                        f"{np.mean([m.norm_centered for m in ln]):.3f} (raw cosine is high for any two models; "
                        "not used as evidence)")
    verdict = "derived" if mean_sim >= 0.5 and coverage >= 0.5 else "related"
    relation = _relation(layers, dropped, b_extra, dup, vocab, fa, fb, mean_sim)
    return verdict, relation, changes


def _relation(layers, dropped, b_extra, dup, vocab, fa, fb, mean_sim) -> str:
    if dropped and not b_extra and not dup:
        return "pruned"
    if b_extra or dup or (vocab.get("added") or 0) > 0:
        return "expanded"
    cos = [t["cos"] for m in layers for t in m.tensors.values() if t.get("cos") is not None]
    if not cos:
        return "unknown"
    if min(cos) > 0.99999:
        return "copy"
    if _quantized_types(fa) != _quantized_types(fb) and min(cos) > 0.9:
        # Storage types alone cannot tell a quantised copy from a fine-tune stored (or compared) quantised:
        # quantisers keep norm gains, training moves them. Quantised after fine-tuning -> `finetune`, the
        # larger change; the storage difference is listed in `changes`.
        return "finetune" if any(m.norm_changed for m in layers) else "quantized"
    per_role: dict[str, list[float]] = {}
    for m in layers:
        for r, t in m.tensors.items():
            if t.get("cos") is not None:
                per_role.setdefault(r, []).append(t["cos"])
    untouched = [r for r, v in per_role.items() if min(v) > 0.99999]
    touched = [r for r, v in per_role.items() if min(v) <= 0.99999]
    energies = [t["delta_rank8_energy"] for m in layers for r, t in m.tensors.items() if "delta_rank8_energy" in t]
    if untouched and touched and energies and float(np.median(energies)) > 0.9:
        return "adapter-merge"
    if mean_sim >= 0.3:
        return "finetune"
    return "unknown"


def _ranges(ids: list[int]) -> str:
    out, start, prev = [], None, None
    for i in ids:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = i
    if start is not None:
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ", ".join(out)


def _no_evidence(a, b, va, vb, evidence, t0) -> VerifyResult:
    return VerifyResult(reference_label(a), reference_label(b), "inconclusive", 1.0, "unknown", 0.0, 0.0, 0.0, 0.0, [],
                        np.zeros((0, 0)), [], [], va, vb, {}, [], evidence, time.perf_counter() - t0)


def weights_of(ref: str | BaseRef) -> BaseRef:
    """A reference that has weights to compare (a from-scratch architecture has none)."""
    base = ref if isinstance(ref, BaseRef) else resolve(ref)
    if base.path is None:
        raise ModelError(f"'{base.name}' is a from-scratch architecture with no weights; give a model with weights")
    return base


def verify_references(a: str | BaseRef, b: str | BaseRef) -> dict:
    """Does B derive from A? The object `taoke verify A B --json` prints: verdict, p_value, relation, layers, ..."""
    return verify(weights_of(a), weights_of(b)).to_dict()


def summary_lines(res: dict) -> list[str]:
    """A few lines of human output explaining the verdict (from the result object)."""
    head = f"verdict: {res['verdict']}   p = {res['p_value']:.3g}   relation: {res['relation']}"
    return [head] + [f"  - {e}" for e in res["evidence"]] + [f"  * {c}" for c in res["changes"]]
