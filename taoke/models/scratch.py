"""From-scratch architectures. Each is a plain nn.Module with a `head` (the classifier, replaceable by
edits) and `features(**inputs)` returning the vector the head reads; `forward` returns logits."""

from __future__ import annotations

import torch
from torch import nn


class ScratchModel(nn.Module):
    head: nn.Module

    def forward(self, **inputs) -> torch.Tensor:
        return self.head(self.features(**inputs))


class CNN(ScratchModel):
    def __init__(self, num_outputs: int, in_channels: int = 1, image_size: int = 8,
                 channels: tuple[int, ...] = (32, 64), dropout: float = 0.1):
        super().__init__()
        layers, c = [], in_channels
        for out in channels:
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            if image_size >= 4:  # keep at least 2x2 spatial cells
                layers.append(nn.MaxPool2d(2))
                image_size //= 2
            c = out
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.feature_dim = c
        self.head = nn.Linear(c, num_outputs)

    def features(self, pixel_values: torch.Tensor, **_) -> torch.Tensor:
        return self.body(pixel_values)


class MLP(ScratchModel):
    def __init__(self, num_outputs: int, in_features: int, hidden: tuple[int, ...] = (128, 64), dropout: float = 0.1):
        super().__init__()
        layers, d = [nn.Flatten()], in_features
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU(), nn.Dropout(dropout)]
            d = h
        self.body = nn.Sequential(*layers)
        self.feature_dim = d
        self.head = nn.Linear(d, num_outputs)

    def features(self, features: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None, **_):
        return self.body(features if features is not None else pixel_values)


def _masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


class RNNClassifier(ScratchModel):
    def __init__(self, num_outputs: int, vocab_size: int, cell: str = "lstm", embed_dim: int = 128,
                 hidden: int = 128, layers: int = 1, bidirectional: bool = True, dropout: float = 0.2,
                 pad_id: int = 0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        rnn_cls = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn_cls(embed_dim, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional,
                           dropout=dropout if layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.feature_dim = hidden * (2 if bidirectional else 1)
        self.head = nn.Linear(self.feature_dim, num_outputs)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_) -> torch.Tensor:
        lengths = attention_mask.sum(1).clamp_min(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(input_ids), lengths, batch_first=True,
                                                   enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=input_ids.shape[1])
        return self.drop(_masked_mean(out, attention_mask))


class TransformerClassifier(ScratchModel):
    def __init__(self, num_outputs: int, vocab_size: int, d_model: int = 128, heads: int = 4, layers: int = 2,
                 ff: int = 256, max_length: int = 512, dropout: float = 0.1, pad_id: int = 0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.pos = nn.Embedding(max_length, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.feature_dim = d_model
        self.head = nn.Linear(d_model, num_outputs)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.embed(input_ids) + self.pos(pos)[None]
        h = self.encoder(h, src_key_padding_mask=attention_mask == 0)
        return _masked_mean(self.norm(h), attention_mask)


def build_scratch(arch: str, num_outputs: int, cfg: dict) -> ScratchModel:
    """`arch` is the part after 'scratch:'; cfg carries sizes from the recipe plus data-derived ones."""
    cfg = dict(cfg)
    if arch == "cnn":
        cfg["channels"] = tuple(cfg.get("channels", (32, 64)))
        return CNN(num_outputs, **cfg)
    if arch == "mlp":
        cfg["hidden"] = tuple(cfg.get("hidden", (128, 64)))
        return MLP(num_outputs, **cfg)
    if arch in ("lstm", "gru"):
        return RNNClassifier(num_outputs, cell=arch, **cfg)
    if arch == "transformer":
        return TransformerClassifier(num_outputs, **cfg)
    raise ValueError(f"unknown scratch architecture {arch}")
