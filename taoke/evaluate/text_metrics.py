"""Scores of a generated answer against a reference: exact match, containment, ROUGE-L (rouge-score)."""

from __future__ import annotations

import re

from rouge_score import rouge_scorer


class _CJKAwareTokens:
    """Words, and each CJK character on its own: rouge_score's default tokenizer drops every non-ASCII char."""

    pattern = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]|\w+")

    def tokenize(self, text: str) -> list[str]:
        return self.pattern.findall(text.lower())


def rouge_l(pred: str, ref: str) -> float:
    ascii_only = (pred + ref).isascii()  # keep the standard (stemmed) scorer where it applies
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True) if ascii_only else \
        rouge_scorer.RougeScorer(["rougeL"], tokenizer=_CJKAwareTokens())
    return scorer.score(ref, pred)["rougeL"].fmeasure


TEXT_METRICS = {
    "exact_match": lambda p, r: float(p.strip().lower() == r.strip().lower()),
    "contains": lambda p, r: float(r.strip().lower() in p.lower()),
    "rouge_l": rouge_l,
}
