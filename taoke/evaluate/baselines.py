"""What a derived model is compared with on the same test split.

- a pretrained encoder without a task head: a linear probe on its frozen features, and zero-shot
  by similarity to the label names (sentence encoders);
- a parent run: the parent model itself;
- a from-scratch model: a classical baseline (logistic regression / ridge) on simple features.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from transformers import AutoModel

from taoke.evaluate.metrics import classification_metrics, regression_metrics
from taoke.models.task_model import mean_pool
from taoke.models.tokenizer import load_tokenizer


@torch.no_grad()
def encoder_embeddings(model_dir, text_sets: list[list[str]], max_length: int, batch_size: int = 64) -> list[np.ndarray]:
    """Frozen sentence embeddings (mean pooling + L2 norm, as sentence-transformers encoders are used) for
    each list of texts, loading the encoder once."""
    tok = load_tokenizer(model_dir)
    enc = AutoModel.from_pretrained(model_dir).eval()
    results = []
    for texts in text_sets:
        emb = None
        order = np.argsort([len(t) for t in texts])  # length-sorted batches pad less
        for s in range(0, len(texts), batch_size):
            idx = order[s:s + batch_size]
            batch = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
            e = mean_pool(enc(**batch).last_hidden_state, batch["attention_mask"])
            e = torch.nn.functional.normalize(e, dim=-1).numpy()
            if emb is None:
                emb = np.zeros((len(texts), e.shape[1]), dtype=np.float32)
            emb[idx] = e
        results.append(emb)
    return results


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, regression: bool, seed: int = 0):
    """Logistic regression (or ridge) on frozen features; returns test predictions."""
    if regression:
        model = make_pipeline(StandardScaler(), Ridge(alpha=1.0))
    else:
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=1.0, random_state=seed))
    model.fit(train_x, train_y)
    return model.predict(test_x)


def zero_shot(text_emb: np.ndarray, label_emb: np.ndarray) -> np.ndarray:
    return (text_emb @ label_emb.T).argmax(1)


def tfidf_features(train_texts: list[str], test_texts: list[str]):
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
    return vec.fit_transform(train_texts), vec.transform(test_texts)


def classical_text_baseline(train_texts, train_y, test_texts, regression: bool, seed: int = 0):
    tr, te = tfidf_features(train_texts, test_texts)
    model = Ridge(alpha=1.0) if regression else LogisticRegression(max_iter=3000, C=10.0, random_state=seed)
    model.fit(tr, train_y)
    return model.predict(te)


def score(y_true, y_pred, regression: bool, labels: list[str] | None) -> dict:
    if regression:
        return regression_metrics(y_true, y_pred)
    return classification_metrics(y_true, y_pred, labels)
