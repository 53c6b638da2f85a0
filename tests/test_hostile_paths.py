"""Hostile input, class 2: a path read from inside a file stays inside the directory that file belongs to, and a
path on the command line always means that path.

The issue's cases: a shard index whose weight_map points at ../other/model.safetensors made `verify` judge a file
the user never named; pointing it at a system file leaked that file's first bytes in the error; a registry name
that is itself a path shadowed the real path."""

import json
import os
import shutil

import onnx
import pytest
import yaml

import taoke
from taoke.errors import FormatError, ModelError
from taoke.formats import open_weights
from taoke.library import registry_path, resolve
from tests.hostile_files import onnx_file
from tests.lineage_tiny import finetune_like, tiny_llama

SECRET = "TOP-SECRET-BYTES-0123456789"


@pytest.fixture(scope="module")
def fam(module_tmp):
    root = module_tmp
    return {"base": tiny_llama(root / "base", seed=0), "other": tiny_llama(root / "other", seed=3)}


def indexed_dir(tmp_path, fam, shard: str):
    """A copy of the base whose shard index sends every tensor to `shard`."""
    d = shutil.copytree(fam["base"], tmp_path / "indexed")
    names = list(open_weights(str(fam["base"])).names())
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))
    return d


@pytest.mark.parametrize("shard", ["../other/model.safetensors", "sub/../../other/model.safetensors"])
def test_a_shard_index_pointing_outside_is_refused_naming_the_entry(fam, tmp_path, taoke_main, shard):
    shutil.copytree(fam["other"], tmp_path / "other")
    d = indexed_dir(tmp_path, fam, shard)
    code, out, err = taoke_main("verify", fam["base"], d, "--json")
    err = err.replace("\n", "")
    assert code == 2 and out == "" and "Traceback" not in err
    assert "weight_map entry" in err and "points outside" in err and shard in err


def test_a_shard_index_naming_a_system_file_leaks_none_of_its_bytes(fam, tmp_path, taoke_main):
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET * 100)
    for shard in (str(secret), "../secret.txt"):
        d = indexed_dir(tmp_path, fam, shard)
        code, out, err = taoke_main("verify", fam["base"], d)
        assert code == 2 and "points outside" in err
        assert SECRET[:8] not in out + err and "5345435245542d" not in (out + err).lower()
        shutil.rmtree(d)


def test_a_symlink_named_as_a_shard_inside_the_directory_does_not_leak_its_target(fam, tmp_path, taoke_main):
    """Inside-the-directory names are allowed (the HF cache is all symlinks); a non-safetensors target is refused
    without quoting its bytes (the header-length field would be 8 of them)."""
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET * 100)
    d = indexed_dir(tmp_path, fam, "link.safetensors")
    os.symlink(secret, d / "link.safetensors")
    code, out, err = taoke_main("verify", fam["base"], d)
    assert code == 2 and "not a safetensors file" in err
    assert str(int.from_bytes(SECRET[:8].encode(), "little")) not in err and SECRET[:8] not in err


def test_derive_refuses_a_base_whose_index_points_outside_before_writing_a_lineage(tmp_path):
    base = tmp_path / "enc"
    src = resolve("minilm-l6").path
    base.mkdir()
    for f in src.iterdir():
        if f.is_file():
            os.symlink(f, base / f.name)
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../decoy.safetensors"}}))
    recipe = {"name": "t", "base": str(base), "task": "text-classification",
              "data": {"train": "data/chatterbot/topics.csv"}, "train": {"epochs": 1}}
    with pytest.raises(FormatError, match="points outside"):
        taoke.derive(recipe, out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run" / "lineage.json").exists()


def write_registry(entries):
    registry_path().parent.mkdir(parents=True, exist_ok=True)
    registry_path().write_text(yaml.safe_dump(entries))


def test_a_registry_entry_cannot_shadow_a_command_line_path(fam, tmp_path, monkeypatch, taoke_main):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(fam["base"], tmp_path / "models" / "mine")
    # a hand-edited registry whose names are the paths the user types
    write_registry({"models/mine": {"path": str(fam["other"])}, str(tmp_path / "models" / "mine"): {"path": str(fam["other"])}})
    for typed in ("models/mine", str(tmp_path / "models" / "mine"), "./models/mine"):
        code, out, err = taoke_main("models", "show", typed)
        assert code == 0, err
        assert json.loads(out)["path"] == str((tmp_path / "models" / "mine").resolve())
    # bare names do consult the registry, which is refused with the bad entry named
    code, _, err = taoke_main("models", "show", "mine")
    assert code == 2 and "models.yaml: entry" in err and "character '/'" in err and "Rename or remove" in err


def test_a_bare_name_that_is_both_registered_and_a_path_is_refused_listing_both(fam, tmp_path, monkeypatch, taoke_main):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(fam["base"], tmp_path / "mine")
    write_registry({"mine": {"path": str(fam["other"])}})
    code, _, err = taoke_main("verify", "mine", fam["base"])
    assert code == 2 and "ambiguous" in err and "./mine" in err and str(fam["other"]) in err.replace("\n", "")


def test_a_relative_registry_path_is_refused(fam, tmp_path, taoke_main):
    write_registry({"mine": {"path": "../somewhere/model"}})
    code, _, err = taoke_main("models", "show", "mine")
    assert code == 2 and "relative path" in err


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/hostname", "sub/../../secret.bin"])
def test_onnx_external_data_outside_the_model_folder_is_refused(tmp_path, taoke_main, location):
    d = tmp_path / "m"
    d.mkdir()
    path = onnx_file(d, external=True)
    (tmp_path / "secret.bin").write_bytes(SECRET.encode() * 100)
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save_model(model, str(path))
    with pytest.raises(FormatError, match="points outside"):
        open_weights(str(path))
    code, out, err = taoke_main("verify", path, path)
    assert code == 2 and "points outside" in err and SECRET[:8] not in out + err


def test_onnx_external_data_inside_the_folder_still_reads(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    r = open_weights(str(onnx_file(d, external=True)))
    assert r.get("w").shape == (4, 8)   # MatMul weight [in, out] read back as [out, in]


def test_lineage_claims_outside_the_scanned_folder_are_not_followed(fam, tmp_path, taoke_main):
    outside = tmp_path / "outside"
    shutil.copytree(fam["other"], outside / "decoy")
    zoo = tmp_path / "zoo"
    shutil.copytree(fam["base"], zoo / "base")
    finetune_like(fam["base"], zoo / "child", scale=0.2, card_base=str(outside / "decoy"))
    finetune_like(fam["base"], zoo / "child2", scale=0.2, card_base="../outside/decoy")
    code, out, err = taoke_main("lineage", zoo, "--json")
    assert code == 0, err
    tree = json.loads(out)
    assert not any("decoy" in str(n["id"]) for n in tree["nodes"])     # never opened, never a node
    assert sum("not followed" in f for f in tree["flags"]) == 2


def test_a_dangling_or_looping_symlink_is_named(tmp_path, taoke_main):
    (tmp_path / "a.safetensors").symlink_to(tmp_path / "b.safetensors")
    (tmp_path / "b.safetensors").symlink_to(tmp_path / "a.safetensors")
    with pytest.raises(ModelError, match="symlink"):
        resolve(str(tmp_path / "a.safetensors"))
    code, _, err = taoke_main("verify", tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert code == 2 and "symlink" in err and "Traceback" not in err
