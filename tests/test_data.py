import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from taoke.data.image import augment, load_images
from taoke.data.load import load_source
from taoke.data.prepare import prepare_data
from taoke.data.splits import split_frame
from taoke.data.tabular import apply_tabular, fit_tabular
from taoke.errors import DataError
from taoke.recipe import Augment, load_recipe

from conftest import TOPICS


def recipe_for(tmp_path, train, task="text-classification", extra=""):
    p = tmp_path / "r.yaml"
    p.write_text(f"name: t\nbase: scratch:lstm\ntask: {task}\ndata: {{train: {train}}}\n{extra}")
    return load_recipe(p)


def test_csv_loads_real_data():
    t = load_source(str(TOPICS))
    assert {"text", "label"} <= set(t.frame.columns) and len(t.frame) == 564
    assert len(t.files[0]["sha256"]) == 64


def test_malformed_csv_row_names_line(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("text,label\nhello,a\nworld,b,extra\n")
    with pytest.raises(DataError, match=r"bad.csv:3: expected 2 fields"):
        load_source(str(p))


def test_bad_jsonl_names_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        load_source(str(p))


def test_missing_file_and_type(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_source(str(tmp_path / "nope.csv"))
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(DataError, match="unsupported data file type"):
        load_source(str(tmp_path / "x.xlsx"))


def test_missing_label_column(tmp_path):
    r = recipe_for(tmp_path, TOPICS, extra="data: {train: %s, label: topic}\n" % TOPICS)
    with pytest.raises(DataError, match=r"column 'topic' \(label\) not found.*text, label"):
        prepare_data(r)


def test_empty_label_names_line(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(10)) + "t10,\n")
    with pytest.raises(DataError, match=r"d.csv:12: empty label"):
        prepare_data(recipe_for(tmp_path, p))


def test_unknown_label_in_test_file(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(20)))
    test = tmp_path / "test.csv"
    test.write_text("text,label\nx,a\ny,zebra\n")
    r = recipe_for(tmp_path, train)
    r.data.test = str(test)
    with pytest.raises(DataError, match=r"'zebra' not seen in training"):
        prepare_data(r)


def test_dedup_and_split_are_seeded(tmp_path):
    extra = "preprocess: [{normalize_text: {}}, {dedup: {}}]\n"
    a = prepare_data(recipe_for(tmp_path, TOPICS, extra=extra))
    b = prepare_data(recipe_for(tmp_path, TOPICS, extra=extra))
    assert a.rows() == b.rows() and sum(a.rows().values()) <= 564
    assert a.row_index["test"] == b.row_index["test"]
    assert set(a.row_index["train"]).isdisjoint(a.row_index["test"])
    # stratified: every class appears in train and test
    assert set(a.splits["test"]["label"]) == set(a.splits["train"]["label"])


def test_split_fractions():
    frame = pd.DataFrame({"x": range(100), "label": ["a", "b"] * 50})
    parts = split_frame(frame, "label", 0.1, 0.2, 0, True)
    assert {k: len(v) for k, v in parts.items()} == {"train": 70, "validation": 10, "test": 20}


def test_tabular_standardize_one_hot():
    frame = pd.DataFrame({"x": [1.0, 2.0, 3.0, None], "c": ["u", "v", "u", "w"], "label": [0, 1, 0, 1]})
    params = fit_tabular(frame, ["x", "c"], None, standardize=True, one_hot=True, source="f")
    x = apply_tabular(frame, params)
    assert x.shape == (4, 4)
    assert abs(x[:3, 0].mean()) < 0.5 and set(np.unique(x[:, 1:])) <= {0.0, 1.0}
    json.dumps(params)  # stored in taoke.json
    with pytest.raises(DataError, match="not numeric"):
        fit_tabular(frame, ["x", "c"], None, standardize=True, one_hot=False, source="f")


def test_image_folder_and_unreadable_image(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path / "imgs"
    for i in range(12):
        d = root / str(digits.target[i])
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 15).astype(np.uint8)).save(d / f"{i}.png")
    table = load_source(str(root))
    assert len(table.frame) == 12 and table.kind == "image-folder"
    x = load_images(table.frame["image"].tolist(), size=16, channels=1)
    assert x.shape == (12, 1, 16, 16) and 0 <= x.min() and x.max() <= 1
    (root / "0" / "broken.png").write_text("not an image")
    with pytest.raises(DataError, match="broken.png: unreadable image"):
        load_images(load_source(str(root)).frame["image"].tolist(), 16, 1)


def test_augment_keeps_shape_and_changes_pixels():
    x = torch.rand(8, 1, 8, 8)
    y = augment(x, Augment(flip=True, crop=1, rotate=10), torch.Generator().manual_seed(0))
    assert y.shape == x.shape and not torch.allclose(x, y)
    assert torch.equal(augment(x, Augment()), x)


def test_jsonl_and_parquet_load_like_csv(tmp_path):
    frame = load_source(str(TOPICS)).frame.head(50)
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in frame.to_dict("records")))
    pq = tmp_path / "d.parquet"
    frame.to_parquet(pq)
    for path in (jl, pq):
        t = load_source(str(path))
        assert t.frame["text"].tolist() == frame["text"].tolist()
        assert t.frame["label"].tolist() == frame["label"].tolist()
