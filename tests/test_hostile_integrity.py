"""Hostile input, class 1: a run's own model files are tamper-evident, and a non-finite output is never printed
as a result.

The issue's cases: bit flips in model/model.safetensors made `taoke predict` print `"probability": NaN` (invalid
JSON) with exit 0; adding 5 to a head bias made every input one class, silently."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import taoke
from taoke.errors import FormatError
from taoke.run import Run
from tests.hostile_files import iris_rows, iris_run


@pytest.fixture(scope="module")
def run(module_tmp):
    return iris_run(module_tmp / "iris")


@pytest.fixture
def rows(tmp_path):
    return iris_rows(tmp_path)


def copy_of(run, tmp_path, name="copy"):
    return shutil.copytree(run, tmp_path / name)


def edit_weights(model_dir, change):
    f = model_dir / "model.safetensors"
    state = load_file(str(f))
    change(state)
    save_file(state, str(f), metadata={"format": "pt"})


def last_bias(state):
    return [k for k in state if k.endswith("bias")][-1]


def test_bit_flips_in_run_weights_are_refused_naming_the_file(run, rows, tmp_path, taoke_main):
    copy = copy_of(run, tmp_path)
    f = copy / "model" / "model.safetensors"
    data = bytearray(f.read_bytes())
    for i in (-4, -40, -400):
        data[i] ^= 0x7F   # the exponent bits of float32 values: NaN/huge weights
    f.write_bytes(bytes(data))
    code, out, err = taoke_main("predict", copy, "--file", rows, "--json")
    assert code == 2 and "model.safetensors: sha256 differs" in err.replace("\n", "") and "Traceback" not in err
    assert out == ""


def test_a_head_bias_plus_5_is_refused(run, rows, tmp_path, taoke_main):
    copy = copy_of(run, tmp_path)
    edit_weights(copy / "model", lambda s: s[last_bias(s)].__setitem__(0, s[last_bias(s)][0] + 5))
    code, out, err = taoke_main("predict", copy, "--file", rows, "--json")
    assert code == 2 and "sha256 differs" in err and out == ""
    code, _, err = taoke_main("eval", copy, "--split", "test")
    assert code == 2 and "sha256 differs" in err


def test_a_weight_file_added_to_model_dir_is_refused(run, rows, tmp_path, taoke_main):
    """Loaders read every *.safetensors in model/: an extra file would change the model without changing a hash."""
    copy = copy_of(run, tmp_path)
    shutil.copy(copy / "model" / "model.safetensors", copy / "model" / "zz-extra.safetensors")
    code, out, err = taoke_main("predict", copy, "--file", rows)
    assert code == 2 and "zz-extra.safetensors: not written by the run" in err.replace("\n", "")


def test_a_model_files_entry_outside_model_dir_is_refused(run, rows, tmp_path, taoke_main):
    copy = copy_of(run, tmp_path)
    lineage = json.loads((copy / "lineage.json").read_text())
    lineage["model_files"]["../../../etc/hostname"] = {"bytes": 1, "sha256": "0" * 64}
    (copy / "lineage.json").write_text(json.dumps(lineage))
    code, _, err = taoke_main("predict", copy, "--file", rows)
    assert code == 2 and "points outside" in err and "Traceback" not in err


def nan_weights(state):
    for k in state:
        state[k] = torch.full_like(state[k], float("nan"))


def test_nan_weights_never_print_nan_even_with_rewritten_hashes(run, rows, tmp_path, taoke_main):
    """Whoever rewrites both the weights and lineage.json passes the hash check; the outputs are still checked."""
    copy = copy_of(run, tmp_path)
    edit_weights(copy / "model", nan_weights)
    lineage = json.loads((copy / "lineage.json").read_text())
    lineage["model_files"] = Run(copy).hash_model_files()
    (copy / "lineage.json").write_text(json.dumps(lineage))
    code, out, err = taoke_main("predict", copy, "--file", rows, "--json")
    assert code == 2 and "not a finite number" in err and "NaN" not in out and out == ""
    code, out, err = taoke_main("eval", copy, "--split", "test", "--json")
    assert code == 2 and "not a finite number" in err and "NaN" not in out


def test_a_model_folder_copied_out_of_its_run_is_checked_too(run, rows, tmp_path, taoke_main):
    """model/ alone has no lineage.json to check against: non-finite outputs still never become results."""
    folder = shutil.copytree(run / "model", tmp_path / "model-copy")
    edit_weights(folder, nan_weights)
    code, out, err = taoke_main("predict", folder, "--file", rows)
    assert code == 2 and "not a finite number" in err and "nan" not in out.lower()


def test_a_truncated_model_folder_is_a_format_error(run, tmp_path):
    folder = shutil.copytree(run / "model", tmp_path / "model-copy")
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(FormatError, match="model.safetensors: tensor .* lies outside the file"):
        taoke.load(folder)


def test_taoke_json_sizes_the_weights_cannot_hold_are_refused_before_allocating(run, tmp_path):
    folder = shutil.copytree(run / "model", tmp_path / "model-copy")
    meta = json.loads((folder / "taoke.json").read_text())
    meta["arch_config"]["hidden"] = [10 ** 6, 10 ** 6]   # 10^12 weights: 4 TB if built
    (folder / "taoke.json").write_text(json.dumps(meta))
    with pytest.raises(FormatError, match="describes .* weights; model.safetensors holds"):
        taoke.load(folder)
