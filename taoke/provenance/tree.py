"""`lineage DIR`: scan a folder of models, check what each claims to be built on, and draw the family tree.

Claims come from `lineage.json` (base name/source) and model-card front matter (`base_model`). Every claim is
verified; every unclaimed pair is tested too, so a model whose card claims no base while its weights say
derived is flagged as an undisclosed shell, and a claim the weights contradict is flagged as contradicted.
Claims that loop (a model claiming itself, or a and b claiming each other) are flagged as cycles, never
confirmed: shared weights say two models are related, not which came first. A claim is followed to a model
in the scanned folder or to a library model (built-in, registered, pkg:, hf:), never to a path elsewhere.
A model with two or more parents gets merge weights (provenance/merge.py), one per edge.
Each node says whether its record is signed (provenance/signature.py): `unsigned`, `signed`, or with the
signer's public key `verified` / `failed` (a failed one is flagged).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib

from taoke.errors import ModelError, TaokeError
from taoke.library import card_metadata, is_library_reference
from taoke.provenance.merge import merge_weights
from taoke.provenance.signature import signature_state, verify_run_signature
from taoke.run import Run
from taoke.provenance.verify import verify
from taoke.files import atomic_path, write_json_atomic, write_text_atomic

_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".onnx", ".bin", ".pt", ".pth")


def _is_model_dir(d: Path) -> bool:
    return (d / "config.json").exists() or Run.is_run(d) or \
        any(p.suffix in _WEIGHT_SUFFIXES for p in d.iterdir() if p.is_file())


def find_models(root: Path, depth: int = 3) -> list[Path]:
    """Model directories (and loose weight files at the top level) under root; never descends into a model."""
    found: list[Path] = []
    if _is_model_dir(root) and depth == 3 and not any(p.is_dir() and _is_model_dir(p) for p in root.iterdir()):
        return [root]
    for p in sorted(root.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            if _is_model_dir(p):
                found.append(p)
            elif depth > 1:
                found += find_models(p, depth - 1)
        elif p.suffix in (".gguf", ".onnx") or (p.suffix == ".safetensors" and not (root / "config.json").exists()):
            found.append(p)
    return found


def claimed_bases(path: Path) -> list[str]:
    """Bases a model says it is built on (lineage.json first, then the model card)."""
    d = path if path.is_dir() else path.parent
    claims: list[str] = []
    if Run.is_run(d):
        try:
            base = Run(d).lineage.get("base")
        except TaokeError:
            base = None
        if isinstance(base, dict):
            claims += [str(base[k]) for k in ("name", "source", "path") if base.get(k)][:1]
        elif isinstance(base, str):
            claims.append(base)
    for card_dir in (d, d / "model"):
        bm = card_metadata(card_dir).get("base_model")
        if isinstance(bm, str):
            claims.append(bm)
        elif isinstance(bm, list):
            claims += [str(x) for x in bm]
    return list(dict.fromkeys(claims))


def _match_claim(claim: str, models: dict[str, Path], root: Path) -> str | None:
    """Which scanned model a claim names: by folder name, by path, else None (external)."""
    tail = claim.rstrip("/").split("/")[-1]
    for label, p in models.items():
        if claim in (label, str(p), p.name) or tail == p.name or tail == label:
            return label
    cand = (root / claim)
    for label, p in models.items():
        if cand.exists() and cand.resolve() == p.resolve():
            return label
    return None


def _signature(path: Path, public_key: Path | None, flags: list[str], label: str) -> str:
    if not path.is_dir() or signature_state(path) == "unsigned":
        return "unsigned"
    if public_key is None:
        return "signed"
    try:
        verify_run_signature(path, public_key)
        return "verified"
    except ModelError as e:
        flags.append(f"{label}: signature does not verify with {public_key}: {str(e)[:200]}")
        return "failed"


def build_tree(root: str | Path, public_key: str | Path | None = None) -> dict:
    root = Path(root)
    if not root.is_dir():
        raise TaokeError(f"{root}: not a directory")
    paths = find_models(root)
    if not paths:
        raise TaokeError(f"{root}: no models found (looked for config.json, lineage.json or weight files)")
    models = {str(p.relative_to(root)) if p != root else p.name: p for p in paths}
    nodes, edges, flags = [], [], []
    claims: dict[str, list[tuple[str, str]]] = {}  # label -> [(claim text, target label)]
    for label, p in models.items():
        cl = claimed_bases(p)
        targets = []
        for c in cl:
            t = _match_claim(c, models, root)
            if t is None and is_library_reference(c):  # a library base: an external node, verified from the library
                t = c
            elif t is None:
                flags.append(f"{label}: claims base '{c[:120]}', which is neither in {root} nor a library model; "
                             "not followed")
            if t is not None:
                targets.append((c, t))
        claims[label] = targets
        nodes.append({"id": label, "path": str(p), "claims": cl,
                      "signature": _signature(p, Path(public_key) if public_key else None, flags, label)})
    externals = {t for ts in claims.values() for _, t in ts if t not in models}
    for e in sorted(externals):
        nodes.append({"id": e, "path": None, "claims": [], "external": True, "signature": None})
    refs = {**{k: str(v) for k, v in models.items()}, **{e: e for e in externals}}
    tested: set[frozenset] = set()
    looped = claim_cycles({child: [parent for _, parent in ts] for child, ts in claims.items()})
    for child, ts in claims.items():
        for claim, parent in ts:
            if parent == child:
                tested.add(frozenset((parent, child)))
                edges.append({"parent": parent, "child": child, "claimed": True, "verdict": None, "p_value": None,
                              "relation": None, "status": "cycle"})
                flags.append(f"{child}: claims itself as its base ('{claim[:120]}'); a lineage cannot loop")
                continue
            res = verify(refs[parent], refs[child])
            tested.add(frozenset((parent, child)))
            status = "confirmed" if res.verdict in ("derived", "related") else (
                "contradicted" if res.verdict == "independent" else "unverified")
            if (parent, child) in looped:
                status = "cycle"
                if (child, parent) in looped and parent < child:  # one flag per loop of two
                    flags.append(f"{parent} and {child} claim each other as base; a lineage cannot loop, so at most "
                                 f"one claim is true (weights: {res.verdict}, p={res.p_value:.3g})")
                elif (child, parent) not in looped:
                    flags.append(f"{child}: its claim of '{parent}' closes a loop of claims; a lineage cannot loop")
            edges.append({"parent": parent, "child": child, "claimed": True, "verdict": res.verdict,
                          "p_value": res.p_value, "relation": res.relation, "status": status})
            if status == "contradicted":
                flags.append(f"{child}: claims base '{claim}' but the weights say independent (p={res.p_value:.3g})")
    for x, y in itertools.combinations(sorted(models), 2):
        if frozenset((x, y)) in tested:
            continue
        res = verify(refs[x], refs[y], deep=False)
        if res.verdict not in ("derived", "related"):
            continue
        # No claim links them. Direction from claims: the one that claims nothing is the suspect.
        child = y if not claims[y] else (x if not claims[x] else y)
        parent = x if child == y else y
        edges.append({"parent": parent, "child": child, "claimed": False, "verdict": res.verdict,
                      "p_value": res.p_value, "relation": res.relation, "status": "undisclosed"})
        who = [m for m in (x, y) if not claims[m]]
        flags.append(f"undisclosed: {' and '.join(who) or child} share weights with {parent if who else x} "
                     f"(p={res.p_value:.3g}) but no card or lineage record says so")
    _weigh_merges(nodes, edges, refs)
    return {"root": str(root), "nodes": nodes, "edges": edges, "flags": flags}


def _weigh_merges(nodes: list[dict], edges: list[dict], refs: dict[str, str]) -> None:
    """A model with two or more parents whose weights it shares: estimate its merge weights, one per edge."""
    parents: dict[str, list[dict]] = {}
    for e in edges:
        if e["status"] in ("confirmed", "undisclosed"):
            parents.setdefault(e["child"], []).append(e)
    for child, incoming in parents.items():
        if len(incoming) < 2:
            continue
        try:
            est = merge_weights(refs[child], [refs[e["parent"]] for e in incoming])
        except ModelError:
            continue   # the parents do not share B's layout tensor for tensor: no weights to give
        node = next(n for n in nodes if n["id"] == child)
        node["merge"] = {"verdict": est.verdict, "explained": round(est.explained, 4),
                         "parents": [e["parent"] for e in incoming], "weights": [round(w, 4) for w in est.weights]}
        if est.verdict == "merge":
            for e, w in zip(incoming, est.weights):
                e["merge_weight"] = round(w, 4)


def claim_cycles(claims: dict[str, list[str]]) -> set[tuple[str, str]]:
    """(parent, child) claims that lie on a loop of claims (child claims parent, ..., parent claims child)."""
    def reaches(start: str, goal: str) -> bool:   # does `start` claim, directly or through others, `goal`?
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            for parent in claims.get(node, []):
                if parent == goal:
                    return True
                if parent not in seen:
                    seen.add(parent)
                    todo.append(parent)
        return False

    return {(parent, child) for child, parents in claims.items() for parent in parents
            if parent != child and reaches(parent, child)}


def mermaid(tree: dict) -> str:
    ids = {n["id"]: f"m{i}" for i, n in enumerate(tree["nodes"])}
    lines = ["graph TD"]
    for n in tree["nodes"]:
        mark = f" ({n['signature']})" if n.get("signature") else ""
        lines.append(f'  {ids[n["id"]]}["{n["id"]}{mark}"]')
    for e in tree["edges"]:
        arrow = {"confirmed": "-->", "undisclosed": "-.->", "contradicted": "--x", "cycle": "-.-x"}.get(e["status"], "-->")
        p = f" p={e['p_value']:.2g}" if e["p_value"] is not None else ""
        p += f" w={e['merge_weight']:.2f}" if e.get("merge_weight") is not None else ""
        lines.append(f'  {ids[e["parent"]]} {arrow}|{e["status"]}{p}| {ids[e["child"]]}')
    return "\n".join(lines) + "\n"


def draw(tree: dict, path: Path) -> Path:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the headless backend

    ids = [n["id"] for n in tree["nodes"]]
    depth = {i: 0 for i in ids}
    for _ in ids:  # longest-path depth; edges point parent -> child (loops and contradictions do not place nodes)
        for e in tree["edges"]:
            if e["status"] not in ("contradicted", "cycle"):
                depth[e["child"]] = max(depth[e["child"]], depth[e["parent"]] + 1)
    rows: dict[int, list[str]] = {}
    for i in ids:
        rows.setdefault(depth[i], []).append(i)
    pos = {i: (k - (len(r) - 1) / 2, -d) for d, r in rows.items() for k, i in enumerate(r)}
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * max(len(r) for r in rows.values())), 1.8 * len(rows) + 1))
    colors = {"confirmed": "tab:green", "undisclosed": "tab:orange", "contradicted": "tab:red", "cycle": "tab:purple"}
    for e in tree["edges"]:
        (x0, y0), (x1, y1) = pos[e["parent"]], pos[e["child"]]
        ax.annotate("", xy=(x1, y1 + 0.12), xytext=(x0, y0 - 0.12),
                    arrowprops=dict(arrowstyle="->", color=colors.get(e["status"], "gray"),
                                    linestyle="--" if e["status"] != "confirmed" else "-"))
        tag = e["status"] + (f" w={e['merge_weight']:.2f}" if e.get("merge_weight") is not None else "")
        ax.text((x0 + x1) / 2, (y0 + y1) / 2, tag, fontsize=7, color=colors.get(e["status"], "gray"))
    signature = {n["id"]: n.get("signature") for n in tree["nodes"]}
    frame = {"verified": ("tab:green", "-"), "signed": ("tab:blue", "-"), "failed": ("tab:red", "-"),
             "unsigned": ("gray", "--")}
    for i, (x, y) in pos.items():
        ec, ls = frame.get(signature.get(i), ("black", "-"))
        label = i + (f"\n[{signature[i]}]" if signature.get(i) else "")
        ax.text(x, y, label, ha="center", va="center", fontsize=8,
                bbox=dict(boxstyle="round", fc="white", ec=ec, ls=ls, lw=1.5))
    ax.set_xlim(min(p[0] for p in pos.values()) - 1, max(p[0] for p in pos.values()) + 1)
    ax.set_ylim(min(p[1] for p in pos.values()) - 0.6, 0.6)
    ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def lineage_report(root, out: Path | None = None, public_key: str | Path | None = None) -> dict:
    tree = build_tree(root, public_key)
    tree["mermaid"] = mermaid(tree)
    if out is not None:
        out = Path(out)
        write_json_atomic(out / "lineage_tree.json", tree)
        write_text_atomic(out / "lineage_tree.mmd", tree["mermaid"])
        tree["png"] = str(draw(tree, out / "lineage_tree.png"))
    return tree
