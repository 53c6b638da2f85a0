"""`diff A B`: what changed between two models, per layer, with a heatmap (layers of A x layers of B)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

from taoke.files import atomic_path, write_json_atomic
from taoke.provenance.verify import VerifyResult, verify


def heatmap(res: VerifyResult, path: Path) -> Path:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the headless backend

    L = res.layer_matrix
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(L.T, cmap="viridis", vmin=min(0.0, float(L.min()) if L.size else 0.0), vmax=1.0,
                   aspect="auto", origin="lower")
    for m in res.layers:
        ax.plot(res.layers_a.index(m.a), res.layers_b.index(m.b), "r.", markersize=4)
    ax.set_xlabel("layer of A")
    ax.set_ylabel("layer of B")
    ax.set_title(f"{res.verdict} ({res.relation}), p={res.p_value:.2g}", fontsize=10)
    fig.colorbar(im, ax=ax, label="fingerprint correlation")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def table_rows(res: VerifyResult) -> list[dict]:
    rows = []
    for m in res.layers:
        moved = min(((t["cos"], r) for r, t in m.tensors.items() if t.get("cos") is not None), default=(None, ""))
        rows.append({"a": f"blk.{m.a}", "b": f"blk.{m.b}", "fingerprint": round(m.fingerprint, 4),
                     "similarity": None if m.similarity is None else round(m.similarity, 5),
                     "least_similar": f"{moved[1]} ({moved[0]:.4f})" if moved[0] is not None else "",
                     "notes": "; ".join(m.notes)})
    return rows


def diff(a, b, out: Path | None = None) -> dict:
    res = verify(a, b)
    report = {**res.to_dict(), "table": table_rows(res)}
    if out is not None:
        out = Path(out)
        report["heatmap"] = str(heatmap(res, out / "diff_heatmap.png"))
        write_json_atomic(out / "diff.json", report)
    return report
