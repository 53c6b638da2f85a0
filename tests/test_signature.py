"""Signed records through the real CLI: `taoke sign` / `taoke verify-signature` with EC P-256 keys made by openssl,
checked by model-signing; one changed byte in any signed file fails; `taoke lineage` marks signed nodes."""

import json
import shutil
import subprocess

import pytest

from conftest import ROOT, run_cli


def ec_pair(folder, name):
    """An EC P-256 key pair in PEM, made by openssl as users make it (cryptography where openssl is missing)."""
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    if shutil.which("openssl"):
        subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", private], check=True)
        subprocess.run(["openssl", "ec", "-in", private, "-pubout", "-out", public], check=True, capture_output=True)
    else:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                              serialization.NoEncryption()))
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture(scope="module")
def signed(module_tmp):
    root = module_tmp
    runs = root / "runs"
    run_cli("derive", "recipes/tabular-cancer.yaml", "--out", runs / "parent", "--set", "train.epochs=2", "--quiet")
    child = root / "child.yaml"   # the same recipe on the parent run (a run base takes no `model:` sizes)
    child.write_text("".join(l for l in (ROOT / "recipes" / "tabular-cancer.yaml").read_text().splitlines(True)
                             if not l.startswith("model:")))
    run_cli("derive", child, "--out", runs / "child", "--set", "train.epochs=1", "--set", f"base=run:{runs / 'parent'}",
            "--quiet")
    key, pub = ec_pair(root, "signer")
    proc = run_cli("sign", runs / "parent", "--key", key)
    assert "signed" in proc.stdout and (runs / "parent" / "model.sig").is_file()
    return runs, key, pub, root


def test_a_signed_run_verifies_and_a_wrong_key_does_not(signed):
    runs, key, pub, root = signed
    res = json.loads(run_cli("verify-signature", runs / "parent", "--key", pub, "--json").stdout)
    assert res["verified"] is True and res["files"] >= 8   # model/ files, lineage, recipe, report, metrics, plots
    _, other = ec_pair(root, "stranger")
    proc = run_cli("verify-signature", runs / "parent", "--key", other, check=False)
    assert proc.returncode == 2 and "verification failed" in proc.stderr
    proc = run_cli("verify-signature", runs / "child", "--key", pub, check=False)
    assert proc.returncode == 2 and "not signed" in proc.stderr
    proc = run_cli("sign", runs / "child", "--key", root / "missing.pem", check=False)
    assert proc.returncode == 2 and "key file not found" in proc.stderr


@pytest.mark.parametrize("target", ["model/model.safetensors", "lineage.json", "model/README.md", "recipe.yaml"])
def test_one_changed_byte_in_any_signed_file_fails(signed, target, tmp_path):
    runs, key, pub, _ = signed
    copy = tmp_path / "copy"
    shutil.copytree(runs / "parent", copy)
    f = copy / target
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    proc = run_cli("verify-signature", copy, "--key", pub, check=False)
    assert proc.returncode == 2 and f"changed since signing: {target}" in proc.stderr


def test_a_file_added_after_signing_fails_but_live_state_does_not(signed, tmp_path):
    runs, key, pub, _ = signed
    copy = tmp_path / "copy"
    shutil.copytree(runs / "parent", copy)
    (copy / "status.json").write_text('{"state": "complete"}\n')   # live state: rewritten by the run itself
    run_cli("verify-signature", copy, "--key", pub)
    (copy / "notes.txt").write_text("added later")
    proc = run_cli("verify-signature", copy, "--key", pub, check=False)
    assert proc.returncode == 2 and "notes.txt" in proc.stderr


def test_lineage_marks_signed_and_unsigned_nodes(signed, tmp_path):
    runs, key, pub, _ = signed
    tree = json.loads(run_cli("lineage", runs, "--json").stdout)
    marks = {n["id"]: n["signature"] for n in tree["nodes"] if not n.get("external")}
    assert marks == {"parent": "signed", "child": "unsigned"}
    tree = json.loads(run_cli("lineage", runs, "--key", pub, "--out", tmp_path, "--json").stdout)
    marks = {n["id"]: n["signature"] for n in tree["nodes"] if not n.get("external")}
    assert marks == {"parent": "verified", "child": "unsigned"}
    assert '["parent (verified)"]' in (tmp_path / "lineage_tree.mmd").read_text()
    assert (tmp_path / "lineage_tree.png").stat().st_size > 1000
