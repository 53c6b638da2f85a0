"""/v1/classify and /v1/embeddings on real uvicorn servers (in this process, free loopback ports), for a text
classifier on MiniLM, an image CNN (base64 PNGs) and a tabular MLP; checked against plain transformers and
against `taoke predict` on the same inputs."""

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

import taoke
from taoke.ship.serve import ServeOptions, build_app
from tests.serve_helpers import ThreadServer, http

pytestmark = pytest.mark.slow
TEXTS = ["can you write bubble sort in python?", "what is the meaning of life", "tell me about the stock market",
         "who won the football game", "I love pizza with cheese"]


@pytest.fixture(scope="module")
def runs(module_tmp):
    root = module_tmp
    from sklearn.datasets import load_digits

    d = load_digits()
    images = root / "digits"
    for i in range(200):
        (images / str(d.target[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray((d.images[i] * 15).astype(np.uint8)).save(images / str(d.target[i]) / f"{i}.png")
    return {
        "text": taoke.derive("recipes/text-topics.yaml", ["data.max_rows=120", "train.epochs=1",
                                                          "train.early_stopping=null"], out=root / "text", quiet=True),
        "image": taoke.derive("recipes/digits-cnn.yaml", [f"data.train={images}", "train.epochs=1",
                                                          "preprocess=[{resize: {size: 16, channels: 1}}]"],
                              out=root / "image", quiet=True),
        "tabular": taoke.derive("recipes/tabular-cancer.yaml", ["train.epochs=2"], out=root / "tabular", quiet=True),
        "images": images,
    }


def serve(run):
    return ThreadServer(build_app(str(run.path), ServeOptions(max_batch=16)))


def test_text_classify_and_embeddings_match_plain_transformers(runs):
    run = runs["text"]
    s = serve(run)
    try:
        with ThreadPoolExecutor(5) as pool:        # concurrent requests are batched together
            replies = list(pool.map(lambda t: http("POST", s.url + "/v1/classify", {"model": "text", "input": [t]}),
                                    TEXTS))
        model_dir = run.path / "model"
        tok = AutoTokenizer.from_pretrained(model_dir)
        enc = tok([t.lower() for t in TEXTS], padding=True, truncation=True, max_length=64, return_tensors="pt")
        with torch.no_grad():
            probs = torch.softmax(AutoModelForSequenceClassification.from_pretrained(model_dir)(**enc).logits, -1)
            hidden = AutoModel.from_pretrained(model_dir)(**enc).last_hidden_state
        labels = taoke.load(run.path).labels
        for (status, body, _), p in zip(replies, probs):
            assert status == 200
            got = body["data"][0]
            assert got["label"] == labels[int(p.argmax())]
            assert np.allclose([got["probabilities"][name] for name in labels], p.numpy(), atol=1e-4)

        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        emb = c.embeddings.create(model="text", input=TEXTS)      # the client asks for base64 and decodes it
        assert np.allclose(np.array([e.embedding for e in emb.data]), pooled.numpy(), atol=1e-4)
        assert emb.usage.prompt_tokens > 0
        status, body, _ = http("POST", s.url + "/v1/embeddings", {"model": "text", "input": "one", "dimensions": 8})
        assert status == 200 and len(body["data"][0]["embedding"]) == 8
        for bad in ({"model": "text", "input": []}, {"model": "text", "input": [1, 2]},
                    {"model": "text", "input": {"a": 1}}, {"model": "/etc/passwd", "input": ["x"]}):
            status, body, _ = http("POST", s.url + "/v1/classify", bad)
            assert 400 <= status < 500 and body["error"]["message"]
    finally:
        s.stop()


def test_image_classify_takes_base64_pngs_like_predict_takes_files(runs):
    run = runs["image"]
    files = sorted(runs["images"].rglob("*.png"))[:6]
    expected = taoke.load(run.path).predict([str(f) for f in files])
    s = serve(run)
    try:
        inputs = [base64.b64encode(f.read_bytes()).decode() for f in files]
        inputs[1] = "data:image/png;base64," + inputs[1]
        status, body, _ = http("POST", s.url + "/v1/classify", {"model": "image", "input": inputs})
        assert status == 200
        assert [d["label"] for d in body["data"]] == [e["label"] for e in expected]
        assert np.allclose([max(d["probabilities"].values()) for d in body["data"]],
                           [e["probability"] for e in expected], atol=1e-5)
        for bad in ["not base64!", base64.b64encode(b"not an image").decode(), "/etc/passwd"]:
            status, body, _ = http("POST", s.url + "/v1/classify", {"model": "image", "input": [bad]})
            assert status == 400 and "image" in body["error"]["message"]
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), "white").save(buf, format="JPEG")      # any size or mode is resized as in training
        status, body, _ = http("POST", s.url + "/v1/classify",
                               {"model": "image", "input": base64.b64encode(buf.getvalue()).decode()})
        assert status == 200 and len(body["data"]) == 1
    finally:
        s.stop()


def test_tabular_classify_takes_rows(runs):
    from sklearn.datasets import load_breast_cancer

    run = runs["tabular"]
    frame = load_breast_cancer(as_frame=True).frame.drop(columns=["target"]).head(8)
    expected = taoke.load(run.path).predict(frame)
    s = serve(run)
    try:
        status, body, _ = http("POST", s.url + "/v1/classify",
                               {"model": "tabular", "input": frame.to_dict(orient="records")})
        assert status == 200 and [d["label"] for d in body["data"]] == [e["label"] for e in expected]
        status, body, _ = http("POST", s.url + "/v1/classify", {"model": "tabular", "input": ["a text"]})
        assert status == 400 and "tabular rows" in body["error"]["message"]
        status, body, _ = http("POST", s.url + "/v1/classify", {"model": "tabular", "input": [{"nope": 1}]})
        assert status == 400
        assert http("POST", s.url + "/v1/embeddings", {"model": "tabular", "input": "x"})[0] == 400
    finally:
        s.stop()
