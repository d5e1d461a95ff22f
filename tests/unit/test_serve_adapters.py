"""Adapter names and folders: traversal, symlinks, pickles and template drift are refused before loading."""

from __future__ import annotations

import json
import shutil

import pytest

from tuneloop.serve.adapters import AdapterError, inspect_adapter, resolve_in_dir, validate_name

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "name", ["../../x", "/etc/passwd", "a/b", "a.b", "..", ".hidden", "-x", "", "x" * 65, "a\x00b"]
)
def test_names_that_could_be_paths_are_refused(name):
    with pytest.raises(AdapterError) as refused:
        validate_name(name)
    assert refused.value.status == 400


@pytest.mark.parametrize("name", ["support", "A", "v2_final-3"])
def test_plain_names_are_accepted(name):
    assert validate_name(name) == name


def fake_adapter(folder, weights="adapter_model.safetensors", template_sha="ab" * 32):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (folder / weights).write_bytes(b"not really weights")
    meta = {
        "base_model": "tiny",
        "chat_template": "t",
        "task": {"task": "classification", "system_prompt": "s", "labels": ["a", "b"]},
        "chat_format": {
            "template_sha256": template_sha,
            "eot_token": "<e>",
            "eot_token_id": 2,
            "eot_text": "<e>",
        },
    }
    (folder / "tuneloop.json").write_text(json.dumps(meta))
    return folder


def test_a_run_directory_resolves_to_its_adapter_folder(tmp_path):
    fake_adapter(tmp_path / "root" / "ticket" / "adapter")
    folder = resolve_in_dir(tmp_path / "root", "ticket")
    assert folder == (tmp_path / "root" / "ticket" / "adapter").resolve()
    info = inspect_adapter("ticket", folder, (tmp_path / "root"))
    assert info.spec.labels == ("a", "b") and len(info.weights_sha256) == 64


def test_symlinks_pointing_out_are_refused_before_opening(tmp_path):
    outside = fake_adapter(tmp_path / "outside")
    root = tmp_path / "root"
    root.mkdir()
    (root / "evil").symlink_to(outside, target_is_directory=True)
    with pytest.raises(AdapterError, match="outside the adapter directory") as refused:
        resolve_in_dir(root, "evil")
    assert refused.value.status == 400
    # a folder inside whose weight file links out is refused too
    inside = fake_adapter(root / "sneaky")
    (inside / "adapter_model.safetensors").unlink()
    (inside / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="points outside"):
        inspect_adapter("sneaky", resolve_in_dir(root, "sneaky"), root)


def test_missing_names_are_404(tmp_path):
    with pytest.raises(AdapterError) as refused:
        resolve_in_dir(tmp_path, "nothing")
    assert refused.value.status == 404


def test_pickled_weights_are_refused(tmp_path):
    folder = fake_adapter(tmp_path / "old", weights="adapter_model.bin")
    with pytest.raises(AdapterError, match="pickled weights") as refused:
        inspect_adapter("old", folder, tmp_path)
    assert refused.value.status == 422


def test_folders_without_the_tuneloop_record_are_refused(tmp_path):
    folder = fake_adapter(tmp_path / "bare")
    (folder / "tuneloop.json").unlink()
    with pytest.raises(AdapterError, match="no tuneloop.json"):
        inspect_adapter("bare", folder, tmp_path)
    shutil.rmtree(folder)
