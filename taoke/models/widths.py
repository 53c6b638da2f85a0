"""The prunable widths of transformer blocks: where each block keeps its MLP units and attention heads, for
BERT-family encoders and LLaMA-family decoders (edit/prune.py removes them; the task-model loader resizes a
BERT whose heads were pruned, as its config cannot state that)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from taoke.errors import RecipeError
from taoke.models.parts import find_stack, unwrap

BERT_FAMILY = ("bert", "roberta", "xlm-roberta", "electra", "camembert")
LLAMA_FAMILY = ("llama", "mistral")


@dataclass
class Block:
    """The prunable parts of one transformer block."""
    module: nn.Module
    mlp_in: list[str]      # attribute paths of Linears whose output rows are the MLP units
    mlp_out: str           # the Linear whose input columns are the MLP units
    q: str
    k: str
    v: str
    o: str

    def get(self, path: str) -> nn.Linear:
        m = self.module
        for part in path.split("."):
            m = getattr(m, part)
        return m

    def set(self, path: str, linear: nn.Linear) -> None:
        *parents, last = path.split(".")
        m = self.module
        for part in parents:
            m = getattr(m, part)
        setattr(m, last, linear)


def family(model: nn.Module) -> str:
    config = getattr(unwrap(model), "config", None)
    mt = getattr(config, "model_type", None)
    if mt in BERT_FAMILY:
        return "bert"
    if mt in LLAMA_FAMILY:
        return "llama"
    raise RecipeError(f"edits.prune: structured pruning supports BERT-family encoders ({', '.join(BERT_FAMILY)}) and "
                      f"LLaMA-family decoders ({', '.join(LLAMA_FAMILY)}); this model is {mt or type(model).__name__}.")


def blocks(model: nn.Module) -> list[Block]:
    kind = family(model)
    if kind == "bert":
        return [Block(b, ["intermediate.dense"], "output.dense", "attention.self.query", "attention.self.key",
                      "attention.self.value", "attention.output.dense") for b in find_stack(model).blocks]
    return [Block(b, ["mlp.gate_proj", "mlp.up_proj"], "mlp.down_proj", "self_attn.q_proj", "self_attn.k_proj",
                  "self_attn.v_proj", "self_attn.o_proj") for b in find_stack(model).blocks]


def head_shape(model: nn.Module) -> tuple[int, int, int]:
    """(query heads, KV groups, head dim) of the model's attention."""
    config = unwrap(model).config
    heads = config.num_attention_heads
    groups = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, groups, head_dim


def set_bert_heads(block: nn.Module, heads: int, head_dim: int) -> None:
    """A BERT block's attention bookkeeping for `heads` heads of `head_dim` (its forward infers the count)."""
    att = block.attention.self
    att.num_attention_heads = heads
    att.all_head_size = heads * head_dim


def resize_bert_attention(model: nn.Module, heads: int) -> None:
    """Before loading a BERT whose heads were pruned: every block's q/k/v/o sized for `heads` heads."""
    _, _, head_dim = head_shape(model)
    width = heads * head_dim
    for b in blocks(model):
        for path in (b.q, b.k, b.v):
            old = b.get(path)
            b.set(path, nn.Linear(old.in_features, width, bias=old.bias is not None))
        old = b.get(b.o)
        b.set(b.o, nn.Linear(width, old.out_features, bias=old.bias is not None))
        set_bert_heads(b.module, heads, head_dim)
