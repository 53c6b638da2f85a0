"""Names for ONNX weights whose own names say nothing (`val_123_q`, `onnx::MatMul_991`), read from the graph.

Exporters and quantisers often leave initialisers anonymous and node names empty; what stays is the graph:
which MatMul reads which weight, in which order, and which input those MatMuls share. A transformer block
shows the same pattern in every family:

    attention in-projections: 3 MatMuls reading one tensor (q, k, v), or 1 reading it (fused qkv)
    attention out-projection: 1 MatMul
    MLP in-projections:       2 MatMuls reading one tensor (gate, up), or 1 (up)
    MLP out-projection:       1 MatMul

so consecutive MatMuls are grouped by the input they share and the groups walked in order, a new block at
each attention in-projection. A norm gain belongs to the block whose projections read its output (through
casts and its bias). The blocks are then given the standard HF names of the family the pattern shows (LLaMA
when the MLP has a gate, GPT-2 for a fused qkv, BERT otherwise), which the canonical view maps like any
checkpoint. Hand-written because no library names weights from graph structure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ANONYMOUS = re.compile(r"^(val|onnx::[A-Za-z]+|_?v|t|const|initializer|tensor|param|arg)[_.:]?\d+$", re.I)
_SUFFIXES = ("_quantized", "_q", "_int8", "_uint8", "_weight_q")


def bare_name(name: str) -> str:
    """An initialiser's name without quantisation suffixes ('q.weight_q' -> 'q.weight', 'val_7_q' -> 'val_7')."""
    for s in _SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)] + (".weight" if s == "_weight_q" else "")
    return name


def is_anonymous(name: str) -> bool:
    return bool(_ANONYMOUS.match(bare_name(name))) or bare_name(name).isdigit()


@dataclass
class Use:
    """A weight as one node reads it: the node's op and output, the other (data) input, the weight's shape
    in PyTorch's [out, in] order."""
    key: str
    op: str
    pos: int
    data: str | None
    output: str
    shape: tuple[int, ...]

    @property
    def gain(self) -> bool:
        """A norm's gain: LayerNormalization's scale, or the Mul of a decomposed RMSNorm."""
        return self.op in ("LayerNormalization", "SimplifiedLayerNormalization") and self.pos == 1 or self.op == "Mul"


_NAMES = {   # family -> role -> HF name template
    "llama": {"q": "model.layers.{i}.self_attn.q_proj.weight", "k": "model.layers.{i}.self_attn.k_proj.weight",
              "v": "model.layers.{i}.self_attn.v_proj.weight", "o": "model.layers.{i}.self_attn.o_proj.weight",
              "gate": "model.layers.{i}.mlp.gate_proj.weight", "up": "model.layers.{i}.mlp.up_proj.weight",
              "down": "model.layers.{i}.mlp.down_proj.weight", "norm_attn": "model.layers.{i}.input_layernorm.weight",
              "norm_mlp": "model.layers.{i}.post_attention_layernorm.weight", "final_norm": "model.norm.weight",
              "embed": "model.embed_tokens.weight"},
    "gpt2": {"qkv": "h.{i}.attn.c_attn.weight", "o": "h.{i}.attn.c_proj.weight", "up": "h.{i}.mlp.c_fc.weight",
             "down": "h.{i}.mlp.c_proj.weight", "norm_attn": "h.{i}.ln_1.weight", "norm_mlp": "h.{i}.ln_2.weight",
             "final_norm": "ln_f.weight", "embed": "wte.weight"},
    "bert": {"q": "encoder.layer.{i}.attention.self.query.weight", "k": "encoder.layer.{i}.attention.self.key.weight",
             "v": "encoder.layer.{i}.attention.self.value.weight",
             "o": "encoder.layer.{i}.attention.output.dense.weight",
             "up": "encoder.layer.{i}.intermediate.dense.weight", "down": "encoder.layer.{i}.output.dense.weight",
             # post-norm: the norm read by the MLP closes the attention half, the one read by the next block's
             # attention closes the MLP half of the block before
             "norm_mlp": "encoder.layer.{i}.attention.output.LayerNorm.weight",
             "norm_attn_prev": "encoder.layer.{i}.output.LayerNorm.weight",
             "embed": "embeddings.word_embeddings.weight", "embed_norm": "embeddings.LayerNorm.weight"},
}


def _groups(mats: list[Use]) -> list[list[Use]]:
    out: list[list[Use]] = []
    for u in mats:
        if out and out[-1][0].data == u.data and u.data is not None:
            out[-1].append(u)
        else:
            out.append([u])
    return out


def _blocks(groups: list[list[Use]]) -> list[dict[str, Use]]:
    """Walk the MatMul groups in graph order; a block starts at each attention in-projection."""
    blocks: list[dict[str, Use]] = []
    stage = None
    for g in groups:
        out_f, in_f = g[0].shape
        if len(g) >= 3 and stage in (None, "down"):
            blocks.append(dict(zip(("q", "k", "v"), g)))
            stage = "in"
        elif len(g) == 1 and stage in (None, "down") and out_f > in_f:
            blocks.append({"qkv": g[0]})
            stage = "in"
        elif len(g) == 1 and stage == "in":
            blocks[-1]["o"] = g[0]
            stage = "o"
        elif len(g) == 2 and stage == "o":
            blocks[-1].update(gate=g[0], up=g[1])
            stage = "up"
        elif len(g) == 1 and stage == "o":
            blocks[-1]["up"] = g[0]
            stage = "up"
        elif len(g) == 1 and stage == "up":
            blocks[-1]["down"] = g[0]
            stage = "down"
        else:    # a head, a pooler, or a pattern this does not know: left unnamed
            stage = None if stage == "down" else stage
    return [b for b in blocks if "o" in b and "down" in b]


def graph_names(uses: list[Use], reads: dict[str, list[str]], elementwise: dict[str, str]) -> dict[str, str]:
    """{weight key: HF name} for the weights `uses` lists, from the pattern of their blocks.

    `reads`: tensor -> outputs of the nodes that read it; `elementwise`: output -> input of the single-input
    steps between a norm and its readers (Cast, the norm's bias Add), followed to find who reads a norm."""
    mats = [u for u in uses if u.op in ("MatMul", "Gemm", "MatMulInteger") and len(u.shape) == 2]
    blocks = _blocks(_groups(mats))
    if not blocks:
        return {}
    family = "llama" if "gate" in blocks[0] else ("gpt2" if "qkv" in blocks[0] else "bert")
    names = _NAMES[family]
    out: dict[str, str] = {}
    reader_block: dict[str, tuple[int, str]] = {}   # tensor -> (block, "attn" | "mlp") of the projections reading it
    for i, block in enumerate(blocks):
        for role, u in block.items():
            if role in names:
                out[u.key] = names[role].format(i=i)
        first_in = block.get("q") or block.get("qkv")
        first_mlp = block.get("gate") or block.get("up")
        reader_block[first_in.data] = (i, "attn")
        reader_block[first_mlp.data] = (i, "mlp")
    hidden = blocks[0]["o"].shape[0]
    embeds = [u for u in uses if u.op == "Gather" and len(u.shape) == 2 and u.shape[1] == hidden]
    if embeds:
        out[max(embeds, key=lambda u: u.shape[0]).key] = names["embed"]
    for u in uses:
        if len(u.shape) != 1 or u.shape[0] != hidden or u.key in out or not u.gain:
            continue
        tensor, seen = u.output, 0
        while tensor not in reader_block and seen < 4:   # through casts / the norm's bias to its readers
            tensor = next((o for o in reads.get(tensor, []) if o in elementwise), None)
            seen += 1
            if tensor is None:
                break
        where = reader_block.get(tensor) if tensor else None
        if where is None:
            if family != "bert":
                out["__final__"] = u.key    # the last gain no block reads: the final norm
            continue
        i, half = where
        if family == "bert":
            name = names["norm_mlp"].format(i=i) if half == "mlp" else (
                names["norm_attn_prev"].format(i=i - 1) if i > 0 else names["embed_norm"])
        else:
            name = names["norm_attn" if half == "attn" else "norm_mlp"].format(i=i)
        out[u.key] = name
    final = out.pop("__final__", None)
    if final is not None:
        out[final] = names["final_norm"]
    if family == "bert":   # the last block's output norm is read by no block
        last = [u for u in uses if len(u.shape) == 1 and u.shape[0] == hidden and u.key not in out and u.gain]
        if last:
            out[last[-1].key] = names["norm_attn_prev"].format(i=len(blocks) - 1)
    gains = {u.output: out[u.key] for u in uses if u.gain and u.key in out}
    for u in uses:   # a LayerNormalization's bias takes its gain's name
        if u.op == "LayerNormalization" and u.pos == 2 and u.output in gains and u.key not in out:
            out[u.key] = gains[u.output].removesuffix(".weight") + ".bias"
    return out
