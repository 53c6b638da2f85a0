"""Hostile input, class 3: every reader turns malformed bytes into a FormatError naming the file (exit 2, no
traceback), checking sizes, counts, dims and offsets against the file before it allocates anything.

The issue's cases: GGUF truncated or with absurd tensor/kv counts, dims or offsets; ONNX random, truncated or empty
(an empty file was judged "inconclusive" as if it were a model); safetensors header entries of the wrong type;
negative shapes (accepted by verify as a "copy"); symlink loops; a config whose vocabulary is 10^11 (derive tried
to allocate 153 TB); corrupt weights inside an HF directory. Then seeded fuzzing of each format (a few hundred
cases each here, many more under -m slow)."""

import json
import os
import shutil
import struct
import warnings

import datasets
import gguf
import numpy as np
import onnx
import pytest
from PIL import Image

import taoke
from taoke.data.image import load_images
from taoke.data.load import load_source
from taoke.errors import FormatError, TaokeError
from taoke.formats import check_model_dir, open_weights
from taoke.formats.hf_dir import read_tokens
from taoke.library import resolve
from taoke.models.tokenizer import load_tokenizer
from tests import hostile_files as hf
from tests.lineage_tiny import tiny_llama

FUZZ_CASES = int(os.environ.get("TAOKE_FUZZ_CASES", 300))
SLOW_CASES = 3000
WEIGHT_FORMATS = {"safetensors": hf.safetensors_file, "torch": hf.torch_file, "gguf": hf.gguf_file,
                  "onnx": hf.onnx_file}


def refused(path, match=None):
    with pytest.raises(FormatError, match=match) as e:
        r = open_weights(str(path))
        for name in r.names():
            r.get(name)
    assert str(path) in str(e.value)
    return str(e.value)


# ---------------------------------------------------------------------------------------------------- GGUF

def gguf_layout(path):
    """Byte offsets of the preamble counts and of the first tensor's dims and data offset (from gguf-py)."""
    r = gguf.GGUFReader(str(path))
    field = r.tensors[0].field
    name_len = 8 + len(r.tensors[0].name.encode())
    n_dims = len(r.tensors[0].shape)
    dims_at = field.offset + name_len + 4
    return {"tensor_count": 8, "kv_count": 16, "dim0": dims_at, "data_offset": dims_at + 8 * n_dims + 4}


@pytest.mark.parametrize("what,value", [("tensor_count", 1 << 60), ("kv_count", 1 << 60), ("tensor_count", 10 ** 6),
                                        ("dim0", 1 << 40), ("dim0", (1 << 64) - 1), ("data_offset", 1 << 50)])
def test_gguf_absurd_counts_dims_and_offsets(tmp_path, taoke_main, what, value):
    path = hf.gguf_file(tmp_path)
    data = bytearray(path.read_bytes())
    at = gguf_layout(path)[what]
    data[at:at + 8] = struct.pack("<Q", value)
    path.write_bytes(bytes(data))
    refused(path)
    code, out, err = taoke_main("verify", path, path)
    assert code == 2 and str(path) in err.replace("\n", "") and "Traceback" not in err


@pytest.mark.parametrize("keep", [0, 3, 23, 24, 100, 700, -200])
def test_gguf_truncated(tmp_path, keep):
    path = hf.gguf_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    refused(path)


def test_gguf_tensor_listed_twice(tmp_path):
    path = hf.gguf_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data.replace(b"blk.0.attn_k.weight", b"blk.0.attn_q.weight", 1))   # same length: layout kept
    refused(path, "listed twice")


def test_gguf_head_count_that_does_not_divide_the_rows(tmp_path):
    path = hf.gguf_file(tmp_path)
    data = path.read_bytes()
    key = b"llama.attention.head_count"
    at = data.index(key) + len(key) + 4   # the uint32 value after its type tag
    path.write_bytes(data[:at] + struct.pack("<I", 7) + data[at + 4:])
    refused(path, "7 attention heads")


# ---------------------------------------------------------------------------------------------------- ONNX

@pytest.mark.parametrize("make", [lambda d: b"", lambda d: os.urandom(4096), lambda d: bytes(64),
                                  lambda d: hf.onnx_file(d).read_bytes()[:57], lambda d: b"\x08\x07"])
def test_onnx_empty_random_truncated(tmp_path, taoke_main, make):
    (tmp_path / "src").mkdir()
    path = tmp_path / "m.onnx"
    path.write_bytes(make(tmp_path / "src"))
    refused(path)
    code, out, err = taoke_main("verify", path, path, "--json")
    assert code == 2 and "inconclusive" not in out and "Traceback" not in err


def test_onnx_scale_that_is_not_an_initializer(tmp_path):
    path = hf.onnx_file(tmp_path)
    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            node.input[1] = "nowhere"
    onnx.save_model(model, str(path))
    refused(path, "'nowhere', which is not an initialiser")


# ---------------------------------------------------------------------------------------------------- safetensors

def with_header(path, edit):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


@pytest.mark.parametrize("edit,match", [
    (lambda h: h.__setitem__("layer.weight", 5), "is a int, not an object"),
    (lambda h: h["layer.weight"].__setitem__("dtype", 5), "no dtype string"),
    (lambda h: h["layer.weight"].__setitem__("shape", "16x8"), "a shape is a list"),
    (lambda h: h["layer.weight"].__setitem__("shape", [-16, -8]), "a shape is a list of non-negative"),
    (lambda h: h["layer.weight"].__setitem__("shape", [16.0, 8]), "a shape is a list"),
    (lambda h: h["layer.weight"].__setitem__("data_offsets", [0]), "lies outside"),
    (lambda h: h["layer.weight"].__setitem__("data_offsets", ["0", "512"]), "lies outside"),
    (lambda h: h["layer.weight"].__setitem__("data_offsets", [0, 1 << 62]), "lies outside"),
    (lambda h: h["layer.weight"].__setitem__("shape", [1 << 40, 1 << 40]), "needs"),
    (lambda h: h["layer.bias"].__setitem__("data_offsets", [h["layer.weight"]["data_offsets"][0],
                                                            h["layer.weight"]["data_offsets"][0] + 32]), "overlap"),
])
def test_safetensors_header_entries_of_the_wrong_type_or_size(tmp_path, edit, match):
    path = hf.safetensors_file(tmp_path)
    with_header(path, edit)
    refused(path, match)


def test_negative_shapes_are_not_judged_a_copy(tmp_path, taoke_main):
    """A file with shape [-16, -8] once passed verify as a 'copy' of the original."""
    fam = tiny_llama(tmp_path / "base", seed=0)
    bad = shutil.copytree(fam, tmp_path / "neg")
    with_header(bad / "model.safetensors", lambda h: h["model.norm.weight"].__setitem__("shape", [-1, -128]))
    code, out, err = taoke_main("verify", fam, bad, "--json")
    assert code == 2 and out == "" and "non-negative" in err


def test_symlink_loop_inside_a_model_directory(tmp_path, taoke_main):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").symlink_to(d / "model.safetensors")
    code, _, err = taoke_main("verify", d, d)
    assert code == 2 and "model.safetensors" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------- HF dirs

def minilm_copy(tmp_path, edit_config=None):
    """minilm-l6 with its weights symlinked (no 90 MB copy) and, optionally, an edited config."""
    src = resolve("minilm-l6").path
    d = tmp_path / "enc"
    d.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json":
            (d / f.name).symlink_to(f)
    cfg = json.loads((src / "config.json").read_text())
    if edit_config:
        edit_config(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


TEXT_RECIPE = {"name": "t", "task": "text-classification", "data": {"train": "data/chatterbot/topics.csv"},
               "train": {"epochs": 1}}


@pytest.mark.parametrize("key,value,match", [("vocab_size", 10 ** 11, "vocab_size' 100000000000 x 'hidden_size'"),
                                             ("hidden_size", -384, "non-negative integer"),
                                             ("num_hidden_layers", "6", "non-negative integer"),
                                             ("max_position_embeddings", 1 << 40, "beyond any real model")])
def test_a_config_the_weights_cannot_hold_is_refused_before_allocating(tmp_path, key, value, match):
    d = minilm_copy(tmp_path, lambda c: c.__setitem__(key, value))
    with pytest.raises(FormatError, match=match):
        taoke.derive({**TEXT_RECIPE, "base": str(d)}, out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_corrupt_weights_inside_an_hf_directory(tmp_path):
    d = minilm_copy(tmp_path)
    weights = (d / "model.safetensors").resolve().read_bytes()
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(FormatError, match="model.safetensors: tensor .* lies outside the file"):
        taoke.derive({**TEXT_RECIPE, "base": str(d)}, out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_tokenizer_ids_that_would_allocate_a_huge_vocabulary(tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 10 ** 12}}}))
    with pytest.raises(FormatError, match="token ids reach"):
        read_tokens(d)
    (d / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": "zero"}}}))
    with pytest.raises(FormatError, match="non-negative integers"):
        read_tokens(d)


def test_a_tokenizer_file_the_libraries_cannot_parse(tmp_path):
    d = minilm_copy(tmp_path)
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.json").write_text('{"model": {"type": "WordPiece", "vocab": 7}}')
    with pytest.raises(FormatError, match="tokenizer files cannot be loaded"):
        load_tokenizer(d)


# ---------------------------------------------------------------------------------------------------- data

def test_deeply_nested_and_non_utf8_json_data(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(FormatError, match="nested too deeply"):
        load_source(str(deep))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"text": "caf\xe9", "label": "a"}\n'.encode("latin-1"))
    with pytest.raises(FormatError, match="not UTF-8"):
        load_source(str(latin))


def test_an_image_bomb_is_refused_not_decoded(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("L", (12000, 12000)).save(path)   # 144M pixels in a few hundred kB
    with pytest.raises(FormatError, match="bomb.png: unreadable image"):
        load_images([str(path)], 16, 1)


# ---------------------------------------------------------------------------------------------------- fuzzing

def fuzz_weights(tmp_path, fmt, cases, seed):
    """Seeded truncations, bit flips and word overwrites of a real file: each opens and reads fully, or is a
    FormatError naming the file; no other exception, and nothing larger than the file could describe."""
    src = WEIGHT_FORMATS[fmt](tmp_path)
    data = src.read_bytes()
    span = hf.header_span(data, fmt)
    rng = np.random.default_rng(seed)
    target = tmp_path / f"case{src.suffix}"
    outcomes = {"read": 0, "refused": 0}
    for _ in range(cases):
        what, mutated = hf.mutate(data, rng, span)
        target.write_bytes(mutated)
        try:
            r = open_weights(str(target))
            for name in r.names():
                a = r.get(name)
                assert a.shape == r.meta(name).shape, (what, name)
                assert a.nbytes <= 64 * max(len(mutated), 1), (what, name, a.shape)   # bounded by the file
            outcomes["read"] += 1
        except FormatError as e:
            assert str(target) in str(e), (what, str(e))
            outcomes["refused"] += 1
        except Exception as e:  # noqa: BLE001 - the point: anything else is a bug, reported with its mutation
            raise AssertionError(f"{fmt}: {what} -> {e.__class__.__name__}: {e}") from e
    assert outcomes["refused"] > cases // 4 and outcomes["read"] > 0, outcomes   # the mutations do reach the parser


@pytest.mark.parametrize("fmt", sorted(WEIGHT_FORMATS))
def test_fuzz_weight_readers(tmp_path, fmt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # overflow in dequantising flipped scales, odd pickle protocols
        fuzz_weights(tmp_path, fmt, FUZZ_CASES, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(WEIGHT_FORMATS))
def test_fuzz_weight_readers_long(tmp_path, fmt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fuzz_weights(tmp_path, fmt, SLOW_CASES, seed=2)


def fuzz_json(tmp_path, cases, seed):
    """config.json and tokenizer.json of a real model directory with one hostile value each: the directory check,
    the weight reader and the vocabulary reader accept it or raise a FormatError."""
    fam = tiny_llama(tmp_path / "m", seed=0)
    tok = hf.word_tokenizer(fam)
    config, tokenizer = json.loads((fam / "config.json").read_text()), json.loads(tok.read_text())
    rng = np.random.default_rng(seed)
    for i in range(cases):
        target, doc = (fam / "config.json", config) if i % 2 else (tok, tokenizer)
        mutated, what = hf.mutate_json(doc, rng)
        target.write_text(json.dumps(mutated))
        try:
            check_model_dir(fam)
            open_weights(str(fam))
            read_tokens(fam)
        except FormatError as e:
            assert target.name in str(e), (what, str(e))
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"{target.name}: {what} -> {e.__class__.__name__}: {e}") from e
        target.write_text(json.dumps(doc))


def test_fuzz_config_and_tokenizer_json(tmp_path):
    fuzz_json(tmp_path, FUZZ_CASES, seed=1)


def fuzz_tokenizer_loading(tmp_path, cases, seed):
    fam = tiny_llama(tmp_path / "m", seed=0)
    tok = hf.word_tokenizer(fam)
    data = tok.read_bytes()
    rng = np.random.default_rng(seed)
    for _ in range(cases):
        what, mutated = hf.mutate(data, rng, len(data))
        tok.write_bytes(mutated)
        try:
            load_tokenizer(fam)
        except FormatError:
            pass
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"tokenizer.json: {what} -> {e.__class__.__name__}: {e}") from e


def test_fuzz_tokenizer_loading(tmp_path):
    fuzz_tokenizer_loading(tmp_path, FUZZ_CASES // 3, seed=1)


DATA_FORMATS = {"csv": hf.csv_file, "jsonl": hf.jsonl_file, "parquet": hf.parquet_file, "png": hf.png_file}


def fuzz_data(tmp_path, fmt, cases, seed, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))  # no litter in ~
    src = DATA_FORMATS[fmt](tmp_path)
    data = src.read_bytes()
    rng = np.random.default_rng(seed)
    for i in range(cases):
        what, mutated = hf.mutate(data, rng, len(data))
        target = tmp_path / f"case{i}{src.suffix}"
        target.write_bytes(mutated)
        try:
            if fmt == "png":
                load_images([str(target)], 8, 3)
            else:
                load_source(str(target))
        except TaokeError as e:   # a table error names the file (and line): DataError or FormatError
            assert str(target) in str(e), (what, str(e))
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"{fmt}: {what} -> {e.__class__.__name__}: {e}") from e
        target.unlink()


@pytest.mark.parametrize("fmt", sorted(DATA_FORMATS))
def test_fuzz_data_readers(tmp_path, fmt, monkeypatch):
    # datasets takes ~0.1 s per parquet file: fewer cases there, many more under -m slow
    fuzz_data(tmp_path, fmt, {"png": FUZZ_CASES, "parquet": FUZZ_CASES // 10}.get(fmt, FUZZ_CASES // 3), 1, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(DATA_FORMATS))
def test_fuzz_data_readers_long(tmp_path, fmt, monkeypatch):
    fuzz_data(tmp_path, fmt, SLOW_CASES // 3, 2, monkeypatch)


@pytest.mark.slow
def test_fuzz_json_and_tokenizers_long(tmp_path):
    fuzz_json(tmp_path, SLOW_CASES, seed=2)
    fuzz_tokenizer_loading(tmp_path / "t", SLOW_CASES // 3, seed=2)
