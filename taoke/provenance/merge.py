"""Is B a merge of several parents, and with what weight each? From the weights alone.

Merges (mergekit's linear, task arithmetic, SLERP, TIES, DARE) combine parents of one architecture tensor by
tensor, in place: no units move. So B - P_k is regressed on the parent differences P_i - P_k (i < k) over every
tensor the parents and B share, with the weights summing to one: B ~ sum_i w_i P_i. Working on differences keeps
the problem well posed when the parents are fine-tunes of one base (their raw weights are nearly collinear).
`explained` is the share of B's distance from P_k that the parents' span accounts for: ~1 for a linear merge,
lower for TIES/DARE (trimmed, sign-elected deltas) and SLERP (a weight per tensor), low when B is not a merge of
these parents. Streaming: one tensor per model in memory at a time; only (k-1) x (k-1) sums are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from taoke.errors import ModelError
from taoke.formats import open_weights
from taoke.formats.base import WeightReader
from taoke.provenance.canonical import CanonicalView, canonical_view
from taoke.provenance.verify import reference_label, verify, weights_of

MERGE_EXPLAINED = 0.9   # share of B's distance from a parent the parents must explain to call B their merge
MIN_WEIGHT = 0.05       # a parent whose estimated weight is below this did not go into the merge


@dataclass
class _Sums:
    """Normal equations of one regression: G = D^T D, c = D^T y, yy = y^T y."""
    G: np.ndarray
    c: np.ndarray
    yy: float = 0.0

    def add(self, diffs: list[np.ndarray], y: np.ndarray) -> None:
        for i, di in enumerate(diffs):
            self.c[i] += float(di @ y)
            for j in range(i, len(diffs)):
                self.G[i, j] += float(di @ diffs[j])
                self.G[j, i] = self.G[i, j]
        self.yy += float(y @ y)

    def solve(self) -> tuple[np.ndarray, float]:
        """Weights of all k parents (summing to one) and the explained share of yy."""
        if self.yy <= 0:
            return np.eye(len(self.c) + 1)[-1], 1.0   # B is the last parent exactly
        w, *_ = np.linalg.lstsq(self.G, self.c, rcond=None)
        residual = self.yy - 2 * float(w @ self.c) + float(w @ self.G @ w)
        return np.append(w, 1.0 - w.sum()), float(1.0 - max(residual, 0.0) / self.yy)


@dataclass
class MergeEstimate:
    b: str
    parents: list[str]
    weights: list[float]
    explained: float
    tensors: int
    per_layer: list[dict] = field(default_factory=list)
    explained_by_layer: float = 0.0    # the same with one weight per parent and layer
    verdict: str = "not a merge of these"
    evidence: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"b": self.b, "parents": self.parents, "weights": [round(w, 4) for w in self.weights],
                "explained": round(self.explained, 4),
                "explained_by_layer": round(self.explained_by_layer, 4), "tensors": self.tensors, "verdict": self.verdict,
                "per_layer": self.per_layer, "evidence": self.evidence}


def _shared_slots(views: list[CanonicalView]) -> list[tuple]:
    """(key, [slot per model]) for every tensor all models hold under one canonical key with one shape."""
    def keyed(v: CanonicalView) -> dict:
        out = {("g", s.role): s for s in v.globals.values()}
        out.update({(i, r): s for i, roles in v.layers.items() for r, s in roles.items()})
        return out
    maps = [keyed(v) for v in views]
    keys = [k for k in maps[0] if all(k in m and m[k].shape == maps[0][k].shape for m in maps[1:])]
    return [(k, [m[k] for m in maps]) for k in keys]


def merge_weights(b, parents: list) -> MergeEstimate:
    """Estimate B = sum_i w_i * parent_i. `b`/`parents`: references, paths or open readers (two or more parents)."""
    if len(parents) < 2:
        raise ModelError("a merge needs two or more candidate parents; give each with --parent")
    readers = [r if isinstance(r, WeightReader) else open_weights(r) for r in [b, *parents]]
    try:
        return _estimate(readers, [reference_label(x) for x in [b, *parents]])
    finally:
        for r, given in zip(readers, [b, *parents]):
            if r is not given:
                r.close()


def _estimate(readers: list[WeightReader], labels: list[str]) -> MergeEstimate:
    views = [canonical_view(r) for r in readers]
    shared = _shared_slots(views)
    k = len(readers) - 1
    groups: dict = {}   # "g" (embedding, head, final norm) or a layer index -> its normal equations
    for key, slots in shared:
        if len(slots[0].shape) == 0:
            continue
        x = [r.get(s.name).astype(np.float64).ravel() for r, s in zip(readers, slots)]
        y, last = x[0] - x[-1], x[-1]
        groups.setdefault(key[0], _Sums(np.zeros((k - 1, k - 1)), np.zeros(k - 1))).add([p - last for p in x[1:-1]], y)
    total = _Sums(sum(g.G for g in groups.values()), sum(g.c for g in groups.values()),
                  sum(g.yy for g in groups.values())) if groups else None
    if total is None or not total.G.any():
        raise ModelError(f"{labels[0]}: no tensors shared with the same shape by B and every parent, or the parents "
                         "are identical; a merge combines parents of one architecture")
    weights, explained = total.solve()
    est = MergeEstimate(labels[0], labels[1:], [float(w) for w in weights], explained, len(shared))
    residual = 0.0
    for key in sorted(groups, key=lambda g: -1 if g == "g" else g):
        w, e = groups[key].solve()
        residual += (1 - e) * groups[key].yy
        if key != "g":
            est.per_layer.append({"layer": f"blk.{key}", "weights": [round(float(v), 4) for v in w],
                                  "explained": round(e, 4)})
    est.explained_by_layer = float(1 - residual / total.yy) if total.yy > 0 else 1.0
    est.evidence.append(f"{len(shared)} tensors held by B and all {k} parents with one shape; weights by least "
                        f"squares on the parents' differences (summing to one): explained {explained:.3f} with one "
                        f"weight per parent, {est.explained_by_layer:.3f} with one per parent and layer")
    best = max(explained, est.explained_by_layer)
    if best >= MERGE_EXPLAINED and all(w >= MIN_WEIGHT for w in weights):
        est.verdict = "merge"
        est.evidence.append("B is a weighted combination of the parents: "
                            + ", ".join(f"{p} {w:.2f}" for p, w in zip(est.parents, weights)))
        if explained < MERGE_EXPLAINED:
            est.evidence.append("weights differ by layer (a layer-wise or gradient merge): see per_layer")
    elif best >= MERGE_EXPLAINED:
        main = labels[1 + int(np.argmax(weights))]
        est.evidence.append(f"the parents explain B, but not all of them went in: B is closest to {main}")
    else:
        est.evidence.append(f"the parents explain {best:.0%} of B's distance from {labels[-1]} (a merge of "
                            f"them needs {MERGE_EXPLAINED:.0%}): B moved on its own after any merge, or they are "
                            "not its parents")
    return est


def merge_report(b: str, parents: list[str]) -> dict:
    """What `taoke verify A B --parent C --json` adds under "merge": B tested against each parent, and the weights."""
    b_ref, refs = weights_of(b), [weights_of(p) for p in parents]
    out = merge_weights(b_ref, refs).to_dict()
    out["verdicts"] = {p: verify(r, b_ref, deep=False).verdict for p, r in zip(parents, refs)}
    return out


def merge_lines(m: dict) -> list[str]:
    head = f"merge: {m['verdict']}   explained {m['explained']:.3f}"
    parts = [f"  {p}: weight {w:.3f}, verify {m['verdicts'].get(p, '?')}" for p, w in zip(m["parents"], m["weights"])]
    return [head] + parts + [f"  - {e}" for e in m["evidence"]]
