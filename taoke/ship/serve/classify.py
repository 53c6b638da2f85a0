"""Classifiers, regressors and encoders over HTTP: /v1/classify and /v1/embeddings (OpenAI's shape).

The service talks to a predictor through a small interface (taoke.inference.TaskPredictor has it; any other
backend, such as an ONNX Runtime session behind the same encoding, plugs in by providing it):

    predictor.meta            the model's taoke.json: inputs (kind, column, image size/channels), labels
    predictor.labels          class names, or None for a regressor
    predictor.outputs(frame)  raw outputs (logits, or standardised values) for the rows of a DataFrame
    predictor.embed(texts)    optional: one vector per text

Concurrent requests are batched: a single batcher task takes everything waiting (up to `max_batch` inputs)
and runs it through one `outputs` call. Images arrive base64-encoded and are decoded in memory exactly as
`taoke predict` decodes image files; no request field is ever used as a path.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import time

import numpy as np
import pandas as pd
import torch
from fastapi import FastAPI, Request
from PIL import Image, UnidentifiedImageError

from taoke.data.encode import to_target_units
from taoke.errors import TaokeError
from taoke.ship.serve.app import ServeSettings, check_model, read_body
from taoke.ship.serve.errors import ApiError
from taoke.ship.serve.schemas import ClassifyRequest, EmbeddingRequest

MAX_INPUTS = 256


def decode_image(data: str, size: int | None, channels: int | None) -> np.ndarray:
    """A base64 (or data: URL) image as an HxWxC float array in [0, 1], resized as in training."""
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        raw = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(raw)) as im:
            im = im.convert("L" if channels == 1 else "RGB") if channels else \
                (im.convert("RGB") if im.mode not in ("L", "RGB") else im.copy())
            if size:
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.float32) / 255.0
    except (binascii.Error, ValueError):
        raise ApiError(400, "image inputs must be base64-encoded image files", param="input") from None
    except (UnidentifiedImageError, OSError):
        raise ApiError(400, "an input is not a readable image (PNG, JPEG, ...)", param="input") from None


class ClassifierService:
    def __init__(self, predictor, settings: ServeSettings, metrics, max_batch: int = 64):
        self.predictor = predictor
        self.settings = settings
        self.metrics = metrics
        self.max_batch = max_batch
        self.pending: asyncio.Queue | None = None
        self.batcher: asyncio.Task | None = None
        self.created = int(time.time())

    async def start(self) -> None:
        self.pending = asyncio.Queue()
        self.batcher = asyncio.create_task(self._batch_forever())

    async def stop(self) -> None:
        if self.batcher is not None:
            self.batcher.cancel()

    def ready(self) -> bool:
        return self.batcher is not None and not self.batcher.done()

    # ------------------------------------------------------------------------------------------ routes

    def register(self, app: FastAPI) -> None:
        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.settings.model_id, "object": "model",
                                                "created": self.created, "owned_by": "taoke",
                                                "task": self.predictor.meta.get("task")}]}

        @app.post("/v1/classify")
        async def classify(request: Request):
            body = await read_body(request, ClassifyRequest)
            check_model(self.settings, body.model)
            frame = self._frame(body.inputs)
            request.state.audit.update(model=body.model, inputs=len(frame))
            outputs = await self._submit(frame)
            return {"object": "list", "model": body.model, "data": self._results(outputs),
                    "usage": {"inputs": len(frame)}}

        @app.post("/v1/embeddings")
        async def embeddings(request: Request):
            body = await read_body(request, EmbeddingRequest)
            check_model(self.settings, body.model)
            if not hasattr(self.predictor, "embed"):
                raise ApiError(400, "this model does not provide embeddings")
            if len(body.inputs) > MAX_INPUTS:
                raise ApiError(400, f"at most {MAX_INPUTS} inputs per request", param="input")
            try:
                vectors = await asyncio.to_thread(self.predictor.embed, body.inputs)
            except TaokeError as e:
                raise ApiError(400, str(e)) from None
            if body.dimensions is not None:
                if not 0 < body.dimensions <= vectors.shape[1]:
                    raise ApiError(400, f"dimensions must be between 1 and {vectors.shape[1]}", param="dimensions")
                vectors = vectors[:, :body.dimensions]
            tokens = sum(len(t) for t in self.predictor.tokenizer(body.inputs)["input_ids"]) \
                if getattr(self.predictor, "tokenizer", None) is not None else 0
            request.state.audit.update(model=body.model, inputs=len(body.inputs), prompt_tokens=tokens)
            data = [{"object": "embedding", "index": i, "embedding": self._encode(v, body.encoding_format)}
                    for i, v in enumerate(vectors)]
            return {"object": "list", "model": body.model, "data": data,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @staticmethod
    def _encode(vector: torch.Tensor, fmt: str):
        if fmt == "base64":
            return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
        return vector.tolist()

    # ------------------------------------------------------------------------------------------ inputs

    def _frame(self, inputs: list) -> pd.DataFrame:
        if len(inputs) > MAX_INPUTS:
            raise ApiError(400, f"at most {MAX_INPUTS} inputs per request", param="input")
        spec = self.predictor.meta["inputs"]
        kind = spec["kind"]
        if kind == "tabular":
            if not all(isinstance(x, dict) for x in inputs):
                raise ApiError(400, "this model takes tabular rows: objects of {column: value}", param="input")
            return pd.DataFrame(inputs)
        if not all(isinstance(x, str) for x in inputs):
            what = "texts" if kind == "text" else "base64-encoded images"
            raise ApiError(400, f"this model takes {what} (strings)", param="input")
        if kind == "image":
            inputs = [decode_image(x, spec.get("size"), spec.get("channels")) for x in inputs]
        return pd.DataFrame({spec["column"]: inputs})

    def _results(self, outputs: torch.Tensor) -> list[dict]:
        labels = self.predictor.labels
        if labels is None:
            values = to_target_units(outputs.view(-1), self.predictor.meta).tolist()
            return [{"index": i, "prediction": float(v)} for i, v in enumerate(values)]
        probs = torch.softmax(outputs.float(), -1)
        return [{"index": i, "label": labels[int(p.argmax())],
                 "probabilities": {name: float(x) for name, x in zip(labels, p.tolist())}}
                for i, p in enumerate(probs)]

    # ------------------------------------------------------------------------------------------ batching

    async def _submit(self, frame: pd.DataFrame) -> torch.Tensor:
        done = asyncio.get_running_loop().create_future()
        await self.pending.put((frame, done))
        return await done

    async def _batch_forever(self) -> None:
        while True:
            items = [await self.pending.get()]
            rows = len(items[0][0])
            while not self.pending.empty() and rows < self.max_batch:
                items.append(self.pending.get_nowait())
                rows += len(items[-1][0])
            frame = pd.concat([f for f, _ in items], ignore_index=True)
            started = time.perf_counter()
            try:
                outputs = await asyncio.to_thread(self.predictor.outputs, frame)
            except TaokeError as e:
                for one, done in items:   # one bad request must not fail the others batched with it
                    await self._alone(one, done, e)
                continue
            except Exception as e:  # noqa: BLE001 - reported to each waiting request as a 500
                for _, done in items:
                    if not done.done():
                        done.set_exception(e)
                continue
            self.metrics.step(len(items), time.perf_counter() - started)
            at = 0
            for one, done in items:
                if not done.done():
                    done.set_result(outputs[at:at + len(one)])
                at += len(one)

    async def _alone(self, frame, done, batch_error: TaokeError) -> None:
        if done.done():
            return
        if len(frame) == 0:
            done.set_exception(ApiError(400, str(batch_error)))
            return
        try:
            done.set_result(await asyncio.to_thread(self.predictor.outputs, frame))
        except TaokeError as e:
            done.set_exception(ApiError(400, str(e)))
        except Exception as e:  # noqa: BLE001
            done.set_exception(e)
