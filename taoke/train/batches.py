"""Batching without per-sample Python in the hot loop: inputs are tensorised once, batches are index sets.

Text batches are length-bucketed (similar lengths together) and padded only to the batch's longest row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Encoded:
    """A split encoded once: either token id lists (text) or one dense tensor (images, tabular)."""
    kind: str                                   # text | image | tabular
    targets: torch.Tensor                       # class ids (long) or values (float)
    ids: list[list[int]] | None = None
    dense: torch.Tensor | None = None
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.targets)

    def lengths(self) -> list[int]:
        return [len(x) for x in self.ids] if self.ids is not None else [1] * len(self)

    def batch(self, index: list[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(index, dtype=torch.long)
        out = {"labels": self.targets[idx]}
        if self.kind == "text":
            rows = [self.ids[i] for i in idx.tolist()]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, : len(r)] = torch.as_tensor(r)
                mask[j, : len(r)] = 1
            out.update(input_ids=ids, attention_mask=mask)
        elif self.kind == "image":
            out["pixel_values"] = self.dense[idx]
        else:
            out["features"] = self.dense[idx]
        return out


def batch_indices(data: Encoded, batch_size: int, shuffle: bool, generator: torch.Generator | None = None,
                  bucket: bool = True) -> list[list[int]]:
    n = len(data)
    order = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
    if data.kind == "text" and bucket:
        lengths = data.lengths()
        # Sort within windows of 50 batches: similar lengths share a batch, order stays random across windows.
        window = batch_size * 50
        order = [i for s in range(0, n, window)
                 for i in sorted(order[s:s + window], key=lambda i: lengths[i])]
    batches = [order[s:s + batch_size] for s in range(0, n, batch_size)]
    if shuffle:
        perm = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in perm]
    return batches


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
