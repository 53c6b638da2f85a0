"""Train a causal LM (continued pretraining or SFT): a plain loop you can read top to bottom.

AdamW, warmup + cosine (transformers.get_scheduler), gradient accumulation, clipping, bf16 autocast
where the hardware runs it natively, sequence packing, chunked cross-entropy, and a rich progress bar
with loss and tokens/s. Adaptation: full | freeze (embeddings + first N layers) | lora | dora (PEFT).
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass, field, fields
from typing import Callable

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from taoke.errors import RecipeError
from taoke.lm.data import IGNORE
from taoke.lm.compiled import CompiledDecoder, want_compile
from taoke.lm.fast_lora import FastLoraForward
from taoke.lm.frozen import FrozenInLowPrecision
from taoke.lm.loss import lm_loss_sum, unwrap
from taoke.lm.pack import batches, pack_rows, packed_batch, padded_batch
from taoke.train.precision import autocast, autocast_dtype
from taoke.utils import release_freed_memory


@dataclass
class LMTrainConfig:
    # adaptation
    method: str = "lora"                 # full | freeze | lora | dora
    freeze_layers: int | None = None     # freeze: embeddings + this many bottom layers (default half)
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str | None = None   # None: all attention + MLP projections
    train_only: list[str] | None = None  # full/freeze: only parameters whose names contain one of these train
    trainable_tokens: list[int] | None = None  # lora/dora: embedding rows (e.g. new tokens) trained beside the adapter
    # optimisation
    lr: float = 2e-4
    weight_decay: float = 0.0
    scheduler: str = "cosine"            # any transformers.get_scheduler name
    warmup_ratio: float = 0.05
    max_steps: int | None = None         # optimizer steps; None: epochs over the data
    epochs: float = 1.0
    batch_size: int = 4                  # rows per micro-batch (packed rows of seq_len tokens when packing)
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    seq_len: int = 512
    packing: bool = True
    precision: str = "auto"              # auto | bf16 | fp32
    chunk_tokens: int | None = None      # tokens per lm_head/CE chunk; None: ~32M logits per chunk
    seed: int = 0
    threads: int | None = None           # CPU threads for torch (None: torch's default; 1 wins on a busy machine)
    compile: bool | str = "auto"         # torch.compile the decoder layers: true | false | auto (long packed runs)
    eval_every: int | None = None        # steps between held-out evaluations (None: only at the end)
    progress: bool = True

    @classmethod
    def from_dict(cls, d: dict | "LMTrainConfig" | None) -> "LMTrainConfig":
        if isinstance(d, cls):
            return d
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RecipeError(f"unknown LM training option(s) {unknown}; known: {sorted(known)}")
        cfg = cls(**d)
        if cfg.method not in ("full", "freeze", "lora", "dora"):
            raise RecipeError(f"adapt.method '{cfg.method}' is not one of full, freeze, lora, dora for a causal LM")
        if cfg.train_only and cfg.method in ("lora", "dora"):
            raise RecipeError(f"expand_layers.train_only_new trains the new blocks in full, which adapt.method "
                              f"'{cfg.method}' contradicts: set adapt.method: full, or train_only_new: false.")
        if cfg.precision not in ("auto", "bf16", "fp32"):
            raise RecipeError(f"precision '{cfg.precision}': choose auto, bf16 or fp32")
        return cfg


@dataclass
class LMHistory:
    steps: list[dict] = field(default_factory=list)   # step, loss, lr, tokens, tokens_per_s
    evals: list[dict] = field(default_factory=list)   # step, loss, perplexity
    model: torch.nn.Module | None = None              # the trained model (a PeftModel for lora/dora)
    tokens: int = 0                                   # non-padding tokens seen
    seconds: float = 0.0
    adaptation: dict = field(default_factory=dict)
    compiled: bool = False                            # whether the decoder layers ran under torch.compile

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("steps", "evals", "tokens", "seconds", "adaptation", "compiled")}
        d["tokens_per_s"] = self.tokens_per_s
        return d


# ---------------------------------------------------------------------------------------------- adaptation

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def decoder_layers(model) -> torch.nn.ModuleList:
    lm = unwrap(model)
    body = getattr(lm, lm.base_model_prefix)
    for name in ("layers", "h", "blocks"):
        if isinstance(getattr(body, name, None), torch.nn.ModuleList):
            return getattr(body, name)
    raise RecipeError(f"cannot find the decoder layers of {type(lm).__name__}")


def adapt_lm(model, cfg: LMTrainConfig | dict):
    """Set which parameters train; returns (model, record). lora/dora wrap the model with PEFT."""
    cfg = LMTrainConfig.from_dict(cfg)
    if hasattr(model, "peft_config"):   # already adapted (e.g. resumed): leave as is
        return model, {"method": cfg.method, **_counts(model)}
    if cfg.method in ("lora", "dora"):
        from peft import LoraConfig, get_peft_model

        leaves = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        targets = cfg.target_modules or [t for t in LORA_TARGETS if t in leaves] or "all-linear"
        if isinstance(targets, list):
            missing = [t for t in targets if t not in leaves]
            if missing:
                raise RecipeError(f"adapt.target_modules {missing} match no Linear layer; leaves here: "
                                  f"{', '.join(sorted(leaves))}")
        # trainable tokens: PEFT trains just those rows of the embedding (and of a head tied to it)
        config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                            use_dora=cfg.method == "dora", task_type="CAUSAL_LM", bias="none",
                            trainable_token_indices=cfg.trainable_tokens or None)
        model = get_peft_model(model, config)
        tokens = {"trainable_tokens": len(cfg.trainable_tokens)} if cfg.trainable_tokens else {}
        return model, {"method": cfg.method, "r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout,
                       "target_modules": targets, **tokens, **_counts(model)}
    for p in model.parameters():
        p.requires_grad = True
    record = {"method": cfg.method}
    if cfg.method == "freeze":
        layers = decoder_layers(model)
        n = cfg.freeze_layers if cfg.freeze_layers is not None else len(layers) // 2
        if not 0 <= n <= len(layers):
            raise RecipeError(f"adapt.layers={n} but the model has {len(layers)} layers")
        frozen = [unwrap(model).get_input_embeddings(), *layers[:n]]
        if unwrap(model).config.tie_word_embeddings:
            frozen = frozen[1:]  # the tied embedding is also the lm_head: it stays trainable
        for m in frozen:
            for p in m.parameters():
                p.requires_grad = False
        record["frozen_layers"] = n
    if cfg.train_only:  # LLaMA-Pro: the rest of the model keeps its base weights
        for name, p in model.named_parameters():
            p.requires_grad = any(part in name for part in cfg.train_only)
        record["train_only"] = list(cfg.train_only)
    return model, {**record, **_counts(model)}


def _counts(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise RecipeError("the adaptation leaves no trainable parameters")
    return {"trainable_params": trainable, "total_params": total}


# ---------------------------------------------------------------------------------------------- helpers

def model_device(model) -> torch.device:
    return next(model.parameters()).device


def make_batches(rows: list[dict], cfg: LMTrainConfig, pad_id: int, seed: int | None) -> list[dict]:
    """Packed (or padded) micro-batches as tensors dicts, each with its count of real tokens."""
    if cfg.packing:
        packed = pack_rows(rows, cfg.seq_len, pad_id, seed=seed)
        out = []
        for group in batches(packed, cfg.batch_size):
            b = packed_batch(group)
            b["n_real"] = sum(r["n_real"] for r in group)
            out.append(b)
        return out
    cut = [{"input_ids": r["input_ids"][:cfg.seq_len], "labels": r["labels"][:cfg.seq_len]} for r in rows]
    out = []
    for group in batches(cut, cfg.batch_size, seed=seed):
        b = padded_batch(group, pad_id)
        b["n_real"] = int(b["attention_mask"].sum())
        out.append(b)
    return out


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}


# ---------------------------------------------------------------------------------------------- training

def train_lm(model, tokenizer, train_rows: list[dict], eval_rows: list[dict] | None, cfg: LMTrainConfig | dict,
             on_step: Callable[[dict], None] | None = None) -> LMHistory:
    """Train on tokenized rows ({input_ids, labels}); returns the history with the trained model in .model."""
    cfg = LMTrainConfig.from_dict(cfg)
    if not train_rows:
        raise RecipeError("no training rows after tokenization")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, record = adapt_lm(model, cfg)
    device = model_device(model)
    dtype = autocast_dtype(cfg.precision, device, model, cfg.batch_size * cfg.seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    unshuffled = make_batches(train_rows, cfg, pad_id, seed=None)
    per_epoch = math.ceil(len(unshuffled) / cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(per_epoch * cfg.epochs))
    compile_layers = want_compile(cfg.compile, device, total_steps, cfg.packing)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                            fused=True)  # fused AdamW runs on CPU as well: ~6x faster steps here
    from transformers import get_scheduler

    sched = get_scheduler(cfg.scheduler, opt, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                          num_training_steps=total_steps)

    def micro_batches():
        epoch = 0
        while True:  # a fresh shuffle (and packing) per epoch
            yield from make_batches(train_rows, cfg, pad_id, seed=cfg.seed + epoch)
            epoch += 1

    stream = micro_batches()
    hist = LMHistory(adaptation=record)
    model.train()
    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                        TimeElapsedColumn(), disable=not cfg.progress, transient=False)
    start = time.perf_counter()
    eval_seconds = 0.0  # periodic evaluations are left out of tokens/s

    def probe():  # one forward and backward that compiles the layers (and shows a failure before training)
        try:
            with autocast(device, dtype):
                loss_sum, _ = lm_loss_sum(model, _to(unshuffled[0], device), cfg.chunk_tokens)
            loss_sum.backward()
        finally:
            model.zero_grad(set_to_none=True)

    # frozen base weights live in bf16 while training runs in bf16 (same numerics, less memory and copying);
    # not for DoRA, whose magnitude term reads the base weight's fp32 column norms. Compiled layers get
    # PEFT's own LoRA forward: inductor fuses its casts and sums itself.
    with FrozenInLowPrecision(model, dtype if cfg.method != "dora" else None), \
            CompiledDecoder(decoder_layers(model), compile_layers, probe) as compiled, \
            FastLoraForward(model, enabled=not compiled.active):
        hist.compiled = compiled.active
        with progress:
            task = progress.add_task("train", total=total_steps, info="")
            for step in range(1, total_steps + 1):
                group = [next(stream) for _ in range(cfg.grad_accum)]
                # normalise by the labelled tokens of the whole optimizer step, so packing and accumulation
                # do not change what one step optimises
                n_targets = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in group)
                loss_total = 0.0
                for b in group:
                    with autocast(device, dtype):
                        loss_sum, _ = lm_loss_sum(model, _to(b, device), cfg.chunk_tokens)
                    (loss_sum / max(n_targets, 1)).backward()
                    loss_total += float(loss_sum.detach())
                    hist.tokens += b["n_real"]
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)) if cfg.max_grad_norm \
                    else float("nan")
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                elapsed = time.perf_counter() - start - eval_seconds
                row = {"step": step, "loss": loss_total / max(n_targets, 1), "lr": sched.get_last_lr()[0],
                       "grad_norm": grad_norm, "tokens": hist.tokens, "tokens_per_s": hist.tokens / elapsed}
                hist.steps.append(row)
                progress.update(task, advance=1,
                                info=f"loss {row['loss']:.4f}  {row['tokens_per_s']:.0f} tok/s")
                if on_step:
                    on_step(row)
                if eval_rows and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                    t0 = time.perf_counter()
                    with compiled.eager():
                        hist.evals.append({"step": step, **evaluate_lm(model, eval_rows, cfg, pad_id)})
                    eval_seconds += time.perf_counter() - t0
        hist.seconds = time.perf_counter() - start - eval_seconds
        if eval_rows:
            with compiled.eager():
                hist.evals.append({"step": total_steps, **evaluate_lm(model, eval_rows, cfg, pad_id)})
    if device.type == "cpu":
        release_freed_memory()  # hand the training activations' memory back before what comes next
    model.eval()
    hist.model = model
    return hist


@torch.no_grad()
def evaluate_lm(model, rows: list[dict], cfg: LMTrainConfig | dict | None = None, pad_id: int = 0) -> dict:
    """Mean token loss over labelled positions and its perplexity (packed, which the packing test shows is exact)."""
    cfg = LMTrainConfig.from_dict(cfg or {})
    was_training = model.training
    model.eval()
    device = model_device(model)
    dtype = autocast_dtype(cfg.precision, device, model, cfg.batch_size * cfg.seq_len)
    total, n = 0.0, 0
    for b in make_batches(rows, cfg, pad_id, seed=None):
        with autocast(device, dtype):
            loss_sum, k = lm_loss_sum(model, _to(b, device), cfg.chunk_tokens)
        total += float(loss_sum)
        n += k
    if was_training:
        model.train()
    loss = total / max(n, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": n}


# ---------------------------------------------------------------------------------------------- generation eval

def _prompt_messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


@torch.no_grad()
def generate(model, tokenizer, prompts: list, max_new_tokens: int = 64, batch_size: int = 8) -> list[str]:
    """Greedy completions for chat prompts (strings or message lists), batched with left padding."""
    device = model_device(model)
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outs = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [tokenizer.apply_chat_template(_prompt_messages(p), tokenize=False, add_generation_prompt=True)
                     for p in prompts[i:i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            outs += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [o.strip() for o in outs]


class _CJKAwareTokens:
    """Words, and each CJK character on its own: rouge_score's default tokenizer drops every non-ASCII char."""

    pattern = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]|\w+")

    def tokenize(self, text: str) -> list[str]:
        return self.pattern.findall(text.lower())


def _rouge_l(pred: str, ref: str) -> float:
    from rouge_score import rouge_scorer

    ascii_only = (pred + ref).isascii()  # keep the standard (stemmed) scorer where it applies
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True) if ascii_only else \
        rouge_scorer.RougeScorer(["rougeL"], tokenizer=_CJKAwareTokens())
    return scorer.score(ref, pred)["rougeL"].fmeasure


METRICS = {
    "exact_match": lambda p, r: float(p.strip().lower() == r.strip().lower()),
    "contains": lambda p, r: float(r.strip().lower() in p.lower()),
    "rouge_l": _rouge_l,
}


def generate_eval(model, tokenizer, prompts: list, references: list[str], metric: str = "rouge_l",
                  max_new_tokens: int = 64, samples: int = 5) -> dict:
    """Greedy generations scored against references; returns {metric, score, samples: [...]}."""
    if metric not in METRICS:
        raise RecipeError(f"eval metric '{metric}': choose one of {', '.join(METRICS)}")
    preds = generate(model, tokenizer, prompts, max_new_tokens)
    scores = [METRICS[metric](p, r) for p, r in zip(preds, references)]
    show = [{"prompt": _prompt_messages(q)[-1]["content"], "reference": r, "prediction": p, "score": s}
            for q, r, p, s in zip(prompts, references, preds, scores)]
    return {"metric": metric, "score": sum(scores) / max(len(scores), 1), "n": len(scores),
            "samples": show[:samples], "predictions": preds}
