"""Canonical architecture view: every tensor gets a (layer, role) whatever its name.

Known names go through gguf-py's tensor name maps (they cover HF, GGUF and many renamed variants, including
LLaMA with `ln1`/`ln2`). Unknown names get their layer from the first number in the name and their role from name
hints, then from shapes inside the layer (embedding, q/k/v/o, MLP up/gate/down, norms, head). The family
(llama, bert, gpt2, ...) comes from the structure of a layer, not from the names, so a renamed LLaMA is a LLaMA.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass, field

import gguf

from taoke.formats.base import WeightReader

# gguf MODEL_TENSOR name -> our role (per-layer roles and global ones).
_GGUF_ROLE = {
    "TOKEN_EMBD": "embed", "OUTPUT": "head", "OUTPUT_NORM": "final_norm", "POS_EMBD": "pos_embed",
    "TOKEN_TYPES": "token_types", "TOKEN_EMBD_NORM": "embed_norm",
    "ATTN_NORM": "attn_norm", "ATTN_Q": "attn_q", "ATTN_K": "attn_k", "ATTN_V": "attn_v", "ATTN_OUT": "attn_o",
    "ATTN_QKV": "attn_qkv", "ATTN_OUT_NORM": "attn_out_norm", "FFN_NORM": "ffn_norm", "FFN_GATE": "ffn_gate",
    "FFN_UP": "ffn_up", "FFN_DOWN": "ffn_down", "LAYER_OUT_NORM": "ffn_out_norm",
    # Gemma 2/3 sandwich norms and Qwen3/Gemma 3 q/k norms; Gemma's pre-FFN norm is what LLaMA calls ffn_norm
    "FFN_PRE_NORM": "ffn_norm", "ATTN_POST_NORM": "attn_post_norm", "FFN_POST_NORM": "ffn_post_norm",
    "ATTN_Q_NORM": "attn_q_norm", "ATTN_K_NORM": "attn_k_norm",
}
# Architectures whose maps we try; the one recognising most names wins.
# LLaMA first: on a tie (a LLaMA checkpoint's names are all known to the Gemma 2 map too) the first one wins.
_CANDIDATE_ARCHS = ("LLAMA", "BERT", "GPT2", "QWEN2", "QWEN3", "GEMMA", "GEMMA2", "GEMMA3", "PHI3", "FALCON", "GPTNEOX",
                    "STARCODER", "NOMIC_BERT")

READ_ROLES = {"attn_q", "attn_k", "attn_v", "attn_qkv", "ffn_gate", "ffn_up"}   # residual stream on columns
WRITE_ROLES = {"attn_o", "ffn_down"}                                            # residual stream on rows
MATRIX_ROLES = READ_ROLES | WRITE_ROLES
NORM_ROLES = {"attn_norm", "ffn_norm", "attn_out_norm", "ffn_out_norm"}

# Name hints for unknown names, matched against the part after the layer number.
_HINTS = [
    ("attn_qkv", r"qkv|c_attn|query_key_value|wqkv"),
    ("ffn_up", r"gate_up"),   # Phi-3's fused gate and up projection (gguf calls it ffn_up)
    ("attn_q", r"(^|[._])(q|wq|q_proj|query)([._]|$)"),
    ("attn_k", r"(^|[._])(k|wk|k_proj|key)([._]|$)"),
    ("attn_v", r"(^|[._])(v|wv|v_proj|value)([._]|$)"),
    ("attn_o", r"(^|[._])(o|wo|o_proj|out_proj|attn_out|attention\.output\.dense)([._]|$)"),
    ("ffn_gate", r"gate|(^|[._])w1([._]|$)"),
    ("ffn_up", r"(^|[._])(up|up_proj|w3|fc1|c_fc|fc_in)([._]|$)"),
    ("ffn_down", r"(^|[._])(down|down_proj|w2|fc2|c_proj|fc_out)([._]|$)"),
    ("attn_norm", r"(ln_?1|input_layernorm|attn_norm|norm1|pre_attn)"),
    ("ffn_norm", r"(ln_?2|post_attention_layernorm|ffn_norm|norm2|pre_mlp)"),
]
_LAYER_RE = re.compile(r"(?:^|[._/])(\d+)(?=[._/])")


@dataclass
class Slot:
    name: str                 # the name in the checkpoint
    role: str                 # canonical role (embed, attn_q, ffn_down, attn_norm, ...; *_bias for biases)
    layer: int | None         # block index, None for global tensors
    shape: tuple[int, ...]
    known: bool               # True when a name map or hint gave the role, False when shapes did

    @property
    def canonical(self) -> str:
        return f"blk.{self.layer}.{self.role}" if self.layer is not None else self.role


@dataclass
class CanonicalView:
    family: str                                   # llama | bert | gpt2 | unknown-<n roles>
    arch_map: str | None                          # gguf arch whose name map matched best
    hidden: int | None                            # residual-stream width
    layers: dict[int, dict[str, Slot]] = field(default_factory=dict)
    globals: dict[str, Slot] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)   # names no rule placed
    renamed: list[str] = field(default_factory=list)   # names placed by hints or shapes, not by a name map

    @property
    def layer_ids(self) -> list[int]:
        return sorted(self.layers)

    def slots(self):
        yield from self.globals.values()
        for i in self.layer_ids:
            yield from self.layers[i].values()

    def to_dict(self) -> dict:
        return {"family": self.family, "arch_map": self.arch_map, "hidden": self.hidden,
                "n_layers": len(self.layers), "renamed": len(self.renamed), "unknown": self.unknown[:20]}


def _layer_of(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


@functools.lru_cache(maxsize=1)
def _gguf_maps() -> list:
    """Name maps for block 0 only: gguf-py lists every name of every block, so maps for a 1000-layer model
    would take ~2 million entries (340 MB, 4 s); names are looked up with their layer number set to 0."""
    return [(arch.lower(), gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch), 1))
            for arch in _CANDIDATE_ARCHS if getattr(gguf.MODEL_ARCH, arch, None) is not None]


def _as_block0(name: str) -> str:
    m = _LAYER_RE.search(name)
    return name if m is None else name[:m.start(1)] + "0" + name[m.end(1):]


_MAX_WRAPPERS = 2   # leading name parts a task wrapper may add: bert., roberta., base_model.model., ...


def _map_name(tmap, name: str) -> tuple[str, int | None] | None:
    """Role and layer from a gguf name map, or None.

    A task model saved by save_pretrained (BertForSequenceClassification: `bert.encoder.layer.0...`) prefixes
    the base model's names with its attribute name; the maps know the bare names, so prefixes are dropped in turn.
    """
    parts = _as_block0(name).split(".")
    hit = None
    for k in range(min(_MAX_WRAPPERS, len(parts) - 1) + 1):
        hit = tmap.get_type_and_name(".".join(parts[k:]), try_suffixes=(".weight", ".bias"))
        if hit is not None:
            break
    if hit is None:
        return None
    kind, _ = hit
    role = _GGUF_ROLE.get(kind.name, kind.name.lower())
    if name.endswith(".bias"):
        role += "_bias"
    return role, _layer_of(name) if role not in ("embed", "head", "final_norm", "pos_embed", "token_types",
                                                 "embed_norm", "final_norm_bias", "embed_norm_bias") else None


def _hint_role(name: str, layer: int) -> str | None:
    tail = re.split(rf"(?:^|[._/]){layer}[._/]", name, maxsplit=1)[-1].lower()
    for role, pattern in _HINTS:
        if re.search(pattern, tail):
            return role + ("_bias" if tail.endswith("bias") else "")
    return None


def _guess_hidden(reader: WeightReader) -> int | None:
    cfg = reader.config or {}
    for key in ("hidden_size", "n_embd", "d_model", "dim"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    ones = Counter(m.shape[0] for m in reader.tensors() if len(m.shape) == 1)
    return ones.most_common(1)[0][0] if ones else None


def _shape_roles(slots: list[tuple[str, tuple]], hidden: int) -> dict[str, str]:
    """Roles for the unplaced tensors of one layer from shapes alone (names sorted give the order of ties)."""
    out: dict[str, str] = {}
    mats = sorted((n, s) for n, s in slots if len(s) == 2)
    vecs = sorted(n for n, s in slots if len(s) == 1 and s[0] == hidden)
    square = [n for n, s in mats if s == (hidden, hidden)]
    reads = [(n, s) for n, s in mats if s[1] == hidden and s[0] != hidden]
    writes = [(n, s) for n, s in mats if s[0] == hidden and s[1] != hidden]
    big = max((s[0] for _, s in reads), default=0)
    mlp_reads = [n for n, s in reads if s[0] == big and big > hidden]
    kv_reads = [n for n, s in reads if s[0] < hidden]
    for n, r in zip(square, ("attn_q", "attn_o")):
        out[n] = r
    for n, r in zip(kv_reads, ("attn_k", "attn_v")):
        out[n] = r
    for n, r in zip(mlp_reads, ("ffn_gate", "ffn_up") if len(mlp_reads) == 2 else ("ffn_up",)):
        out[n] = r
    for n, _ in writes:
        out[n] = "ffn_down"
    for n, r in zip(vecs, ("attn_norm", "ffn_norm")):
        out[n] = r
    return out


def _family(view: CanonicalView) -> str:
    if not view.layers:
        return "unknown"
    roles = Counter(r for layer in view.layers.values() for r in layer)
    n = len(view.layers)
    has = lambda r: roles.get(r, 0) >= n / 2  # noqa: E731 - tiny predicate
    if has("attn_q") and has("ffn_gate") and has("ffn_down") and has("attn_norm") and not has("attn_q_bias"):
        return "llama"
    if has("attn_q") and has("attn_q_bias") and has("ffn_gate"):
        return "qwen2"
    if has("attn_q") and has("attn_out_norm") and has("ffn_up") and not has("ffn_gate"):
        return "bert"
    if has("attn_qkv") and has("ffn_up"):
        return "gpt2"
    return f"unknown-{len(roles)}-roles"


def canonical_view(reader: WeightReader) -> CanonicalView:
    metas = reader.tensors()
    best, best_arch, best_hits = {}, None, -1
    for arch, tmap in _gguf_maps():
        hits = {m.name: r for m in metas if (r := _map_name(tmap, m.name)) is not None}
        if len(hits) > best_hits:
            best, best_arch, best_hits = hits, arch, len(hits)
    hidden = _guess_hidden(reader)
    view = CanonicalView(family="unknown", arch_map=best_arch if best_hits > 0 else None, hidden=hidden)
    pending: dict[int, list[tuple[str, tuple]]] = {}
    for m in metas:
        if m.name in best:
            role, layer = best[m.name]
            slot = Slot(m.name, role, layer, m.shape, True)
        else:
            layer = _layer_of(m.name)
            role = _hint_role(m.name, layer) if layer is not None else None
            if layer is not None and role is None:
                pending.setdefault(layer, []).append((m.name, m.shape))
                continue
            if layer is None:
                role = _global_role(m.name, m.shape, hidden, view)
                if role is None:
                    view.unknown.append(m.name)
                    continue
            slot = Slot(m.name, role, layer, m.shape, False)
            view.renamed.append(m.name)
        _place(view, slot)
    for layer, items in pending.items():
        roles = _shape_roles(items, hidden) if hidden else {}
        for name, shape in items:
            if name in roles and roles[name] not in view.layers.get(layer, {}):
                _place(view, Slot(name, roles[name], layer, shape, False))
                view.renamed.append(name)
            else:
                view.unknown.append(name)
    view.family = _family(view)
    return view


def _global_role(name: str, shape: tuple, hidden: int | None, view: CanonicalView) -> str | None:
    if hidden is None:
        return None
    if len(shape) == 2 and shape[1] == hidden and shape[0] > 4 * hidden:
        return "embed" if "embed" not in view.globals else "head"
    if len(shape) == 1 and shape[0] == hidden and "final_norm" not in view.globals and re.search(r"norm|ln", name):
        return "final_norm"
    return None


def _place(view: CanonicalView, slot: Slot) -> None:
    if slot.layer is None:
        view.globals.setdefault(slot.role, slot)
    else:
        view.layers.setdefault(slot.layer, {}).setdefault(slot.role, slot)
