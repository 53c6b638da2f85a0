"""Evaluation variants for verify: derived and independent models built from the real bases.

Used by tests (cheap cases, session-cached) and bench/verify_suite.py (all cases). Every builder writes one
model directory (or file) under `root` once and returns its path; a second call reuses it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from taoke.provenance.normalize import LLAMA_NAMES
from taoke.files import atomic_path, write_json_atomic

DIALOGS = Path(__file__).resolve().parents[1] / "data" / "chatterbot" / "dialogs.jsonl"


def _save_hf(d: Path, sd: dict, cfg: dict, tokenizer_from: Path | None = None) -> Path:
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    with atomic_path(d / "model.safetensors") as tmp:
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}, str(tmp),
                  metadata={"format": "pt"})
    write_json_atomic(d / "config.json", cfg)
    if tokenizer_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                     "generation_config.json"):
            if (tokenizer_from / name).exists():
                shutil.copyfile(tokenizer_from / name, d / name)
    return d


def _load_hf(d: Path) -> tuple[dict, dict]:
    from safetensors.numpy import load_file

    return load_file(str(d / "model.safetensors")), json.loads((d / "config.json").read_text())


def smollm2_hf(root: Path) -> Path:
    """SmolLM2-135M dequantised from the shipped GGUF by transformers' own GGUF loader, saved as a plain HF
    LlamaForCausalLM directory by save_pretrained (transformers 5's config format: rope_parameters)."""
    d = Path(root) / "smollm2-hf"
    if (d / "model.safetensors").exists():
        return d
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from taoke.library import resolve

    base = resolve("smollm2-135m")
    folder, name = base.path.parent, base.path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # a GGUF-loaded model is marked quantised and refuses save_pretrained: rebuild it plain from its config
    config = AutoConfig.from_pretrained(folder, gguf_file=name).to_dict()
    config.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(d, max_shard_size="4GB")
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(str(d))
    return d


def _variant(root: Path, name: str, base: Path, edit) -> Path:
    d = Path(root) / name
    if (d / "model.safetensors").exists():
        return d
    sd, cfg = _load_hf(base)
    sd, cfg = edit(sd, cfg)
    return _save_hf(d, sd, cfg, tokenizer_from=base)


# ---------------------------------------------------------------------------------------------- derived

# The 2023 case: LLaMA with ln1/ln2 norms (and, to be harder, attn/mlp renamed too) under a new arch name.
RENAMES = [("input_layernorm", "ln1"), ("post_attention_layernorm", "ln2"), ("self_attn.q_proj", "attn.wq"),
           ("self_attn.k_proj", "attn.wk"), ("self_attn.v_proj", "attn.wv"), ("self_attn.o_proj", "attn.wo"),
           ("mlp.gate_proj", "ffn.w1"), ("mlp.down_proj", "ffn.w2"), ("mlp.up_proj", "ffn.w3"),
           ("model.layers", "transformer.blocks"), ("model.embed_tokens", "transformer.wte"),
           ("model.norm", "transformer.ln_f")]
RENAMED_ARCH = {"architectures": ["YiForCausalLM"], "model_type": "yi"}


def rename(name: str) -> str:
    for a, b in RENAMES:
        name = name.replace(a, b)
    return name


def renamed(root: Path, base: Path) -> Path:
    """LLaMA under the RENAMES names and a new architecture name."""
    def edit(sd, cfg):
        return {rename(k): v for k, v in sd.items()}, {**cfg, **RENAMED_ARCH}
    return _variant(root, "renamed", base, edit)


def permuted(root: Path, base: Path, seed: int = 0) -> Path:
    """Function-preserving permutation of MLP units and of kv-head groups in every layer."""
    def edit(sd, cfg):
        rng = np.random.default_rng(seed)
        hd = cfg["head_dim"]
        g = cfg["num_attention_heads"] // cfg["num_key_value_heads"]
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            u = rng.permutation(cfg["intermediate_size"])
            for r in ("mlp.gate_proj", "mlp.up_proj"):
                sd[p + r + ".weight"] = sd[p + r + ".weight"][u]
            sd[p + "mlp.down_proj.weight"] = sd[p + "mlp.down_proj.weight"][:, u]
            order = rng.permutation(cfg["num_key_value_heads"])
            qi = np.concatenate([np.arange(o * g * hd, (o + 1) * g * hd) for o in order])
            ki = np.concatenate([np.arange(o * hd, (o + 1) * hd) for o in order])
            sd[p + "self_attn.q_proj.weight"] = sd[p + "self_attn.q_proj.weight"][qi]
            sd[p + "self_attn.o_proj.weight"] = sd[p + "self_attn.o_proj.weight"][:, qi]
            for r in ("k_proj", "v_proj"):
                sd[p + f"self_attn.{r}.weight"] = sd[p + f"self_attn.{r}.weight"][ki]
        return sd, cfg
    return _variant(root, f"permuted-s{seed}", base, edit)


def rescaled(root: Path, base: Path, factor: float = 3.0) -> Path:
    """Uniform rescaling that keeps the function: up_proj x c, down_proj / c (SwiGLU is linear in up)."""
    def edit(sd, cfg):
        for i in range(cfg["num_hidden_layers"]):
            sd[f"model.layers.{i}.mlp.up_proj.weight"] = sd[f"model.layers.{i}.mlp.up_proj.weight"] * factor
            sd[f"model.layers.{i}.mlp.down_proj.weight"] = sd[f"model.layers.{i}.mlp.down_proj.weight"] / factor
        return sd, cfg
    return _variant(root, "rescaled", base, edit)


def pruned(root: Path, base: Path, drop=range(10, 16)) -> Path:
    drop = set(drop)

    def edit(sd, cfg):
        keep = [i for i in range(cfg["num_hidden_layers"]) if i not in drop]
        out = {k: v for k, v in sd.items() if not k.startswith("model.layers.")}
        for new, old in enumerate(keep):
            pre = f"model.layers.{old}."
            out.update({f"model.layers.{new}." + k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)})
        return out, {**cfg, "num_hidden_layers": len(keep)}
    return _variant(root, "pruned", base, edit)


def duplicated(root: Path, base: Path, repeat=range(20, 24)) -> Path:
    """Depth up-scaling: layers in `repeat` appear twice."""
    def edit(sd, cfg):
        order = []
        for i in range(cfg["num_hidden_layers"]):
            order += [i, i] if i in repeat else [i]
        out = {k: v for k, v in sd.items() if not k.startswith("model.layers.")}
        for new, old in enumerate(order):
            pre = f"model.layers.{old}."
            out.update({f"model.layers.{new}." + k[len(pre):]: v.copy() for k, v in sd.items() if k.startswith(pre)})
        return out, {**cfg, "num_hidden_layers": len(order)}
    return _variant(root, "duplicated", base, edit)


def _paley12() -> np.ndarray:
    """The Hadamard matrix of order 12 (Paley's construction I, q = 11)."""
    q = 11
    residues = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if i in residues else -1 for i in range(1, q)])
    jac = np.array([[chi[(j - i) % q] for j in range(q)] for i in range(q)])
    s = np.zeros((q + 1, q + 1), dtype=np.int64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jac
    return s + np.eye(q + 1, dtype=np.int64)


def hadamard(n: int) -> np.ndarray:
    """An orthonormal Hadamard matrix of order n = 2^a * 12^b (576 = 12 * 12 * 4), as QuaRot builds them."""
    from scipy.linalg import hadamard as sylvester

    h, m = np.ones((1, 1)), n
    while m % 12 == 0 and m > 1:
        h, m = np.kron(h, _paley12()), m // 12
    if m & (m - 1):
        raise ValueError(f"no Hadamard construction here for order {n} (needs 2^a * 12^b)")
    h = np.kron(h, sylvester(m))
    return (h / np.sqrt(n)).astype(np.float64)


def random_orthogonal(n: int, seed: int) -> np.ndarray:
    """Haar-random orthogonal matrix: QR of a Gaussian with the signs of R's diagonal fixed."""
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def rotated(root: Path, base: Path, kind: str = "random", seed: int = 0) -> Path:
    """The residual stream rotated by an orthogonal Q (SliceGPT/QuaRot style), same function.

    RMSNorm commutes with an orthogonal map once its gain is folded into the matrices that read it, so: every norm
    gain goes into the q/k/v (gate/up, head) columns and becomes 1; reads W -> W diag(g) Q, writes W -> Q^T W, the
    embedding E -> E Q, the head (untied now) -> E diag(g_final) Q.
    """
    def edit(sd, cfg):
        h = cfg["hidden_size"]
        return rotate(sd, cfg, hadamard(h) if kind == "hadamard" else random_orthogonal(h, seed))
    return _variant(root, f"rotated-{kind}-s{seed}", base, edit)


def sliced(root: Path, base: Path, keep: float = 0.9) -> Path:
    """SliceGPT-style width pruning: rotate onto the embedding's principal axes, then drop the weakest residual
    dims (hidden_size shrinks; attention and MLP widths stay). The function changes, as SliceGPT's does."""
    def edit(sd, cfg):
        emb = sd["model.embed_tokens.weight"].astype(np.float64)
        vals, vecs = np.linalg.eigh(emb.T @ emb)
        q = vecs[:, np.argsort(vals)[::-1][:int(round(cfg["hidden_size"] * keep))]]
        return rotate(sd, cfg, q)
    return _variant(root, f"sliced-{keep}", base, edit)


def rotate(sd: dict, cfg: dict, q: np.ndarray) -> tuple[dict, dict]:
    """Fold every norm gain into the matrices that read it, then map the residual stream through q (hidden x k,
    orthonormal columns; k = hidden keeps the function exactly)."""
    h = q.shape[1]
    out = dict(sd)
    emb = sd["model.embed_tokens.weight"].astype(np.float64)
    head = sd.get("lm_head.weight", emb).astype(np.float64)
    out["model.embed_tokens.weight"] = emb @ q
    out["lm_head.weight"] = (head * sd["model.norm.weight"]) @ q
    out["model.norm.weight"] = np.ones(h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for norm, reads in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                            ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))):
            g = sd[p + norm + ".weight"].astype(np.float64)
            for r in reads:
                out[p + r + ".weight"] = (sd[p + r + ".weight"] * g) @ q
            out[p + norm + ".weight"] = np.ones(h)
        for w in ("self_attn.o_proj", "mlp.down_proj"):
            out[p + w + ".weight"] = q.T @ sd[p + w + ".weight"]
    return out, {**cfg, "hidden_size": h, "tie_word_embeddings": False}


def vocab_expanded(root: Path, base: Path, n_new: int = 512) -> Path:
    d = Path(root) / "vocab-expanded"
    if (d / "model.safetensors").exists():
        return d
    from transformers import AutoTokenizer

    sd, cfg = _load_hf(base)
    tok = AutoTokenizer.from_pretrained(str(base))
    tok.add_tokens([f"<taoke_extra_{i}>" for i in range(n_new)])
    emb = sd["model.embed_tokens.weight"]
    rng = np.random.default_rng(0)
    new = emb.mean(0) + rng.standard_normal((len(tok) - emb.shape[0], emb.shape[1])).astype(np.float32) * emb.std()
    sd["model.embed_tokens.weight"] = np.concatenate([emb, new])
    d.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(d))
    return _save_hf(d, sd, {**cfg, "vocab_size": int(sd["model.embed_tokens.weight"].shape[0])})


def merged(root: Path, parents: list[Path], weights: list[float]) -> Path:
    """mergekit's `linear` merge by hand: every tensor is sum_i w_i * parent_i."""
    d = Path(root) / ("merged-" + "-".join(f"{p.name}x{w:g}" for p, w in zip(parents, weights)))
    if (d / "model.safetensors").exists():
        return d
    sds = [_load_hf(p)[0] for p in parents]
    out = {k: sum(w * sd[k] for w, sd in zip(weights, sds)) for k in sds[0]}
    return _save_hf(d, out, _load_hf(parents[0])[1], tokenizer_from=parents[0])


def _load_model(d: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)


def lora_merged(root: Path, base: Path, rank: int = 8, seed: int = 0) -> Path:
    """A random-but-seeded LoRA (q, v, up) merged into the base with peft."""
    d = Path(root) / "lora-merged"
    if (d / "model.safetensors").exists():
        return d
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(_load_model(base), LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                                                         target_modules=["q_proj", "v_proj", "up_proj"]))
    merged = model.merge_and_unload()
    sd = {k: v.detach().numpy() for k, v in merged.state_dict().items() if k != "lm_head.weight"}
    _, cfg = _load_hf(base)
    return _save_hf(d, sd, cfg, tokenizer_from=base)


def _dialog_texts() -> list[str]:
    rows = [json.loads(line) for line in DIALOGS.read_text().splitlines() if line.strip()]
    return [" ".join(m["content"] for m in r["messages"]) for r in rows]


def train_lm(model, tokenizer_dir: Path, steps: int, lr: float, seed: int, batch: int = 8, seq: int = 64):
    """A plain AdamW loop on the shipped dialog text (real, BSD-licensed)."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = torch.tensor(tok("\n".join(_dialog_texts()))["input_ids"])
    return train_on_ids(model, ids, steps, lr, seed, batch, seq)


def train_on_ids(model, ids, steps: int, lr: float, seed: int, batch: int = 8, seq: int = 64) -> list[float]:
    """A plain AdamW loop over random windows of a token stream; the losses per step."""
    import torch

    n = (len(ids) - 1) // seq
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)   # fused: ~10x faster step on CPU than the loop
    model.train()
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, n, (batch,), generator=g) * seq
        x = torch.stack([ids[s:s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def finetuned(root: Path, base: Path, steps: int = 200, lr: float = 1e-4, seed: int = 0, batch: int = 4,
              seq: int = 32) -> Path:
    d = Path(root) / f"finetuned-{steps}"
    if (d / "model.safetensors").exists():
        return d
    import torch

    torch.manual_seed(seed)
    model = _load_model(base)
    t0 = time.perf_counter()
    losses = train_lm(model, base, steps, lr, seed, batch=batch, seq=seq)
    seconds = time.perf_counter() - t0
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    _, cfg = _load_hf(base)
    _save_hf(d, sd, cfg, tokenizer_from=base)
    write_json_atomic(d / "train_log.json", {"steps": steps, "lr": lr, "batch": batch, "seq": seq, "loss_first": losses[0],
                                             "loss_last": losses[-1], "train_s": round(seconds, 1),
                                             "torch_threads": torch.get_num_threads()})
    return d


def to_gguf(root: Path, src: Path, name: str, qtype: str = "Q4_0") -> Path:
    """HF llama dir -> GGUF with llama.cpp's naming and q/k permutation, weights quantised with gguf-py."""
    import gguf

    out = Path(root) / f"{name}.gguf"
    if out.exists():
        return out
    sd, cfg = _load_hf(src)
    w = gguf.GGUFWriter(str(out) + ".tmp", "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])  # transformers 5 nests it
    tok_file = src / "tokenizer.json"
    if tok_file.exists():
        vocab = json.loads(tok_file.read_text())["model"]["vocab"]
        w.add_token_list([t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])])
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    gguf_name = {v.format(i="{i}"): k for k, v in LLAMA_NAMES.items()}
    roles = {"embed": "token_embd", "final_norm": "output_norm", "head": "output", "attn_norm": "blk.{i}.attn_norm",
             "ffn_norm": "blk.{i}.ffn_norm", "attn_q": "blk.{i}.attn_q", "attn_k": "blk.{i}.attn_k",
             "attn_v": "blk.{i}.attn_v", "attn_o": "blk.{i}.attn_output", "ffn_gate": "blk.{i}.ffn_gate",
             "ffn_up": "blk.{i}.ffn_up", "ffn_down": "blk.{i}.ffn_down"}
    for k, v in sd.items():
        parts = k.split(".")
        i = int(parts[2]) if k.startswith("model.layers.") else None
        template = k if i is None else k.replace(f".{i}.", ".{i}.", 1)
        role = gguf_name[template]
        v = np.ascontiguousarray(v, dtype=np.float32)
        if role in ("attn_q", "attn_k"):  # llama.cpp's converter permute (inverse of gguf_io.unpermute_qk)
            n = cfg["num_attention_heads"] if role == "attn_q" else cfg["num_key_value_heads"]
            v = v.reshape(n, 2, v.shape[0] // n // 2, *v.shape[1:]).swapaxes(1, 2).reshape(v.shape)
        gname = roles[role].format(i=i) + ".weight"
        if v.ndim == 2 and v.shape[1] % 32 == 0:
            w.add_tensor(gname, gguf.quants.quantize(v, qt), raw_dtype=qt)
        else:
            w.add_tensor(gname, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    Path(str(out) + ".tmp").replace(out)
    return out


def to_onnx_int8(root: Path, src: Path, name: str) -> Path:
    """ONNX file in the layout of an exported-then-quantised model: per-row int8 weights behind DequantizeLinear,
    MatMul weights stored [in, out], anonymous initialiser names, node names carrying the module path.

    Built with onnx.helper because torch.onnx.export of transformers' LLaMA fails in this environment
    (TorchScript exporter: unsupported aten::diff; dynamo exporter needs onnxscript)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out = Path(root) / f"{name}.onnx"
    if out.exists():
        return out
    sd, cfg = _load_hf(src)
    inits, nodes = [], []
    x = "hidden"
    for n_i, (k, v) in enumerate(sd.items()):
        module = k[: -len(".weight")]
        if v.ndim == 2 and "embed_tokens" not in k:
            wt = v.T                                               # MatMul(x, W) needs [in, out]
            scale = np.maximum(np.abs(wt).max(axis=0), 1e-12) / 127.0   # per output channel
            q = np.clip(np.round(wt / scale), -127, 127).astype(np.int8)
            base = f"onnx::MatMul_{1000 + n_i}"
            inits += [numpy_helper.from_array(q, base + "_quantized"),
                      numpy_helper.from_array(scale.astype(np.float32), base + "_scale"),
                      numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), base + "_zero_point")]
            nodes.append(helper.make_node("DequantizeLinear", [base + "_quantized", base + "_scale",
                                                               base + "_zero_point"], [base + "_dq"], axis=1,
                                          name=f"/{module.replace('.', '/')}/DequantizeLinear"))
            nodes.append(helper.make_node("MatMul", [x, base + "_dq"], [f"{module}_out"],
                                          name="/" + module.replace(".", "/") + "/MatMul"))
        else:
            inits.append(numpy_helper.from_array(np.ascontiguousarray(v, dtype=np.float32), k))
            op = "Gather" if "embed_tokens" in k else "Mul"
            nodes.append(helper.make_node(op, [k, x] if op == "Gather" else [x, k], [f"{module}_out"],
                                          name="/" + module.replace(".", "/") + f"/{op}"))
    graph = helper.make_graph(nodes, "taoke-int8", [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    with atomic_path(out) as tmp:
        onnx.save(model, str(tmp))
    return out


def to_torch_bin(root: Path, src_ref: str, name: str) -> Path:
    """Any reference -> pytorch_model.bin directory (format conversion to the pickle-free torch format)."""
    import torch

    from taoke.formats import open_weights

    d = Path(root) / name
    if (d / "pytorch_model.bin").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    r = open_weights(src_ref)
    with atomic_path(d / "pytorch_model.bin") as tmp:
        torch.save({n: torch.from_numpy(r.get(n).copy()) for n in r.names()}, str(tmp))
    if r.config:
        write_json_atomic(d / "config.json", r.config)
    return d


def bert_pruned(root: Path, src_ref: str = "minilm-l6", drop=(2, 3)) -> Path:
    from taoke.formats import open_weights

    d = Path(root) / "minilm-pruned"
    if (d / "model.safetensors").exists():
        return d
    r = open_weights(src_ref)
    cfg = dict(r.config)
    keep = [i for i in range(cfg["num_hidden_layers"]) if i not in set(drop)]
    sd = {}
    for n in r.names():
        parts = n.split(".")
        if "layer" in parts and parts[parts.index("layer") + 1].isdigit():
            pos = parts.index("layer") + 1
            old = int(parts[pos])
            if old not in keep:
                continue
            parts[pos] = str(keep.index(old))
        sd[".".join(parts)] = r.get(n)
    return _save_hf(d, sd, {**cfg, "num_hidden_layers": len(keep)})


# ------------------------------------------------------------------------------------------ independent

def scratch_llama(root: Path, tokenizer_dir: Path, seed: int, steps: int, hidden: int = 256, layers: int = 4) -> Path:
    """Small LLaMA trained from scratch on the dialog text: same recipe, different seeds -> independent models."""
    d = Path(root) / f"scratch-h{hidden}-l{layers}-s{seed}-{steps}"
    if (d / "model.safetensors").exists():
        return d
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _, base_cfg = _load_hf(tokenizer_dir)
    cfg = dict(base_cfg, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 32 * 32, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    losses = train_lm(model, tokenizer_dir, steps, lr=1e-3, seed=seed) if steps else []
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    _save_hf(d, sd, cfg, tokenizer_from=tokenizer_dir)
    if losses:
        write_json_atomic(d / "train_log.json", {"steps": steps, "loss_first": losses[0], "loss_last": losses[-1]})
    return d


def random_init_like(root: Path, base: Path, seed: int = 1) -> Path:
    """The base's exact architecture, freshly initialised (what a from-scratch run starts from)."""
    d = Path(root) / f"random-init-s{seed}"
    if (d / "model.safetensors").exists():
        return d
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _, cfg = _load_hf(base)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return _save_hf(d, sd, cfg, tokenizer_from=base)
