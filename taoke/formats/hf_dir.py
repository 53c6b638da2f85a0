"""Checks on an HF-format model directory before any library allocates a model from it.

transformers builds the model its config.json describes before it reads a weight: a config claiming a
vocabulary of 10^11 makes it try to allocate terabytes. So the sizes a config claims are checked against the
bytes the directory's weight files hold, the shard index may only name files inside the directory, and every
safetensors header is validated, each failure a FormatError naming the file and the entry.
"""

from __future__ import annotations

from pathlib import Path

from taoke.errors import FormatError
from taoke.files import contained_path, read_json_object

INDEX = "model.safetensors.index.json"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
MIN_BITS_PER_WEIGHT = 1        # the smallest storage of any published quantisation is above 1 bit per weight
MAX_POSITIONS = 1 << 24        # longest context any released model claims is ~10M tokens
# config keys naming a size, and which of them multiply into one stored matrix
SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "max_position_embeddings", "type_vocab_size", "n_embd", "n_layer",
             "n_head", "n_positions", "n_inner", "d_model", "ffn_dim", "num_layers", "num_heads", "dim",
             "hidden_dim", "n_layers", "n_heads")
MATRICES = (("vocab_size", "hidden_size"), ("vocab_size", "n_embd"), ("vocab_size", "d_model"), ("vocab_size", "dim"),
            ("intermediate_size", "hidden_size"), ("n_inner", "n_embd"), ("ffn_dim", "d_model"),
            ("hidden_dim", "dim"), ("num_hidden_layers", "hidden_size"), ("n_layer", "n_embd"),
            ("num_layers", "d_model"), ("n_layers", "dim"), ("num_attention_heads", "head_dim"))


def index_shards(model_dir: Path) -> list[Path] | None:
    """The shard files model.safetensors.index.json names (each inside the directory and present), or None."""
    index = Path(model_dir) / INDEX
    if not index.exists():
        return None
    weight_map = read_json_object(index, "safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(f"{index}: 'weight_map' must map tensor names to shard files")
    shards = []
    for tensor, shard in weight_map.items():
        f = contained_path(model_dir, shard, index, f"weight_map entry {str(tensor)[:80]!r} ->")
        if f not in shards:
            if not f.is_file():
                raise FormatError(f"{index}: weight_map entry {str(tensor)[:80]!r} names {shard!r}, which is missing")
            shards.append(f)
    return sorted(shards)


def weight_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for pattern in WEIGHT_PATTERNS for f in Path(model_dir).glob(pattern) if f.is_file())


def check_config_sizes(config: dict, stored_bytes: int, source: Path) -> None:
    """Refuse sizes the weight files cannot hold: a matrix the config implies must fit in them at >= 1 bit each."""
    cfgs = [config] + [v for k, v in config.items() if k.endswith("_config") and isinstance(v, dict)]
    for cfg in cfgs:
        for key in SIZE_KEYS:
            value = cfg.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise FormatError(f"{source}: '{key}' is {str(value)[:40]!r}; it must be a non-negative integer")
        positions = max(int(cfg.get(k) or 0) for k in ("max_position_embeddings", "n_positions"))
        if positions > MAX_POSITIONS:
            raise FormatError(f"{source}: max_position_embeddings {positions} is beyond any real model's context")
        budget = stored_bytes * 8 // MIN_BITS_PER_WEIGHT
        for a, b in MATRICES:
            x, y = cfg.get(a), cfg.get(b)
            if isinstance(x, int) and isinstance(y, int) and x * y > budget:
                raise FormatError(f"{source}: '{a}' {x} x '{b}' {y} = {x * y:,} weights, more than the "
                                  f"{stored_bytes:,} bytes of weight files beside it can hold; the config does not "
                                  "describe these weights")


def read_tokens(model_dir: Path) -> list[str] | None:
    """Vocabulary (id -> token) from tokenizer.json or vocab.txt, for aligning shared tokens; ids must be dense
    enough that the list is no longer than the vocabulary (a file claiming id 10^12 is refused, not allocated)."""
    tj = Path(model_dir) / "tokenizer.json"
    if tj.exists():
        data = read_json_object(tj, "tokenizer.json")
        model = data.get("model")
        vocab = model.get("vocab") if isinstance(model, dict) else None
        added = data.get("added_tokens") or []
        if isinstance(vocab, dict) and isinstance(added, list):
            pairs = list(vocab.items()) + [(a.get("content"), a.get("id")) for a in added if isinstance(a, dict)]
            ids = {}
            for token, i in pairs:
                if isinstance(i, bool) or not isinstance(i, int) or i < 0 or not isinstance(token, str):
                    raise FormatError(f"{tj}: token {str(token)[:40]!r} has id {str(i)[:40]!r}; ids are "
                                      "non-negative integers")
                ids[i] = token
            n = max(ids) + 1 if ids else 0
            if n > 2 * len(ids) + 1024:
                raise FormatError(f"{tj}: token ids reach {n - 1} for {len(ids)} tokens; the vocabulary is corrupt")
            return [ids.get(i, f"<unk:{i}>") for i in range(n)]
    vt = Path(model_dir) / "vocab.txt"
    if vt.exists():
        return vt.read_text(encoding="utf-8", errors="replace").splitlines()
    return None

