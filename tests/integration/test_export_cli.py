"""``tuneloop export`` end to end on a tiny trained run: every format, its files, record and round trips."""

from __future__ import annotations

import importlib.util
import json

import pytest
from typer.testing import CliRunner

from tests.conftest import TEST
from tests.unit.test_export_formats import tiny_run
from tuneloop.cli.main import app

pytestmark = pytest.mark.integration

runner = CliRunner()
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("cli-export"), tiny_model_dir)


def export(*args: str):
    result = runner.invoke(app, ["export", *args])
    return result, " ".join(result.output.split())


def test_gguf_f16_with_modelfile_and_eval(run_dir):
    result, text = export(str(run_dir), "--format", "gguf", "--quant", "f16", "--eval")
    assert result.exit_code == 0, result.output
    out = run_dir / "export"
    assert (out / "run-f16.gguf").is_file()
    assert f"round trip (transformers-gguf) │ {len(TEST)}/{len(TEST)} identical" in text
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./run-f16.gguf" in modelfile and "<|im_start|>assistant" in modelfile
    entry = json.loads((out / "record.json").read_text())["exports"]["gguf-f16"]
    assert entry["details"]["tokenizer_check"]["identical_encodings"] == len(TEST)
    loaders = [r["loader"] for r in entry["roundtrips"]]
    assert loaders == (["transformers-gguf", "llama-cpp-python"] if HAS_LLAMA_CPP else ["transformers-gguf"])
    assert all(r["passed"] for r in entry["roundtrips"])
    evaluation = next(iter(entry["evaluation"].values()))
    assert evaluation["n"] == len(TEST) and evaluation["identical_tokens"] == len(TEST)
    assert json.loads((run_dir / "record.json").read_text())["exports"]["gguf-f16"]["paths"] == [
        "run-f16.gguf",
        "Modelfile",
    ]


def test_gguf_q8_0_reports_agreement(run_dir):
    result, text = export(str(run_dir), "--format", "gguf", "--quant", "q8_0", "--min-agreement", "0.5")
    assert result.exit_code == 0, result.output
    entry = json.loads((run_dir / "export" / "record.json").read_text())["exports"]["gguf-q8_0"]
    assert entry["details"]["tensor_types"] == {"q8_0": 15, "float32": 5}
    for check in entry["roundtrips"]:
        assert (
            check["n"] == len(TEST) and check["identical"] >= len(TEST) / 2 and check["min_agreement"] == 0.5
        )


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python (tuneloop[gguf]) not installed")
def test_gguf_q4_k_m_through_llama_cpp(run_dir, tmp_path):
    result, _ = export(
        str(run_dir), "--format", "gguf", "--quant", "q4_k_m", "--min-agreement", "0", "--out", str(tmp_path)
    )
    assert result.exit_code == 0, result.output
    entry = json.loads((tmp_path / "record.json").read_text())["exports"]["gguf-q4_k_m"]
    assert entry["details"]["quantizer"] == "llama.cpp" and (tmp_path / "run-q4_k_m.gguf").is_file()
    assert not list(tmp_path.glob(".*.f16.gguf"))  # the f16 staging file is gone


def test_adapter_and_merged_write_vllm_commands(run_dir, tmp_path):
    for fmt in ("adapter", "merged"):
        result, _ = export(str(run_dir), "--format", fmt, "--out", str(tmp_path))
        assert result.exit_code == 0, result.output
    commands = (tmp_path / "vllm-command.txt").read_text()
    assert "# adapter\nvllm serve" in commands and "--lora-modules run=" in commands
    assert f"# merged-fp16\nvllm serve {tmp_path / 'merged'} --dtype float16" in commands


def test_user_errors_are_one_line(run_dir, tmp_path):
    result, text = export(str(run_dir), "--format", "onnx")
    assert result.exit_code == 1 and "unknown export format 'onnx'" in text
    result, text = export(str(run_dir), "--format", "gguf", "--quant", "q2_k")
    assert result.exit_code == 1 and "--quant q2_k does not apply to format gguf" in text
    result, text = export(str(tmp_path), "--format", "adapter")
    assert result.exit_code == 1 and "no trained model here" in text
