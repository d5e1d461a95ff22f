"""``tuneloop data`` end to end: exit codes, reports, files written, and bad input without tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tuneloop.cli.main import app

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).parents[1] / "fixtures" / "data"
PLANTED, CLEAN = FIXTURES / "planted", FIXTURES / "clean"


def tuneloop(*args: str | Path):
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert "Traceback" not in result.output
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), repr(result.exception)
    return result


@pytest.fixture
def config(tiny_model_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "base_model": str(tiny_model_dir),
                "train_file": str(PLANTED / "train.jsonl"),
                "test_file": str(PLANTED / "test.jsonl"),
                "system_prompt": "Route the ticket.",
                "max_seq_len": 4096,
                "max_new_tokens": 16,
            }
        )
    )
    return path


def test_audit_of_planted_data_blocks_and_writes_a_json_report(tmp_path):
    out = tmp_path / "report.json"
    result = tuneloop(
        "data", "audit", PLANTED / "train.jsonl", "--test", PLANTED / "test.jsonl", "--json", out
    )
    assert result.exit_code == 1
    assert "BLOCK leakage (exact) · test.jsonl · 2 rows" in result.output
    assert "4 blocking problem(s)" in result.output
    report = json.loads(out.read_text())
    assert report["ok"] is False and report["blocking"] == 4
    counts = {(f["check"], f["kind"], Path(f["file"]).name): f["count"] for f in report["findings"]}
    assert (
        counts[("near_duplicate", None, "train.jsonl")] == 2 and counts[("pii", "secret", "train.jsonl")] == 4
    )


def test_audit_of_clean_data_passes():
    result = tuneloop("data", "audit", CLEAN / "train.jsonl", "-t", CLEAN / "test.jsonl")
    assert result.exit_code == 0, result.output
    assert "no problems found" in result.output


def test_audit_with_config_checks_tokens_and_the_configs_test_file(config):
    result = tuneloop("data", "audit", "--config", config, "--json", "-")
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert [f["role"] for f in report["files"]] == ["train", "test"]
    assert report["files"][0]["token_lengths"]["max"] == 5047
    checks = {(f["check"], f["kind"]) for f in report["findings"]}
    assert {("too_long", "prompt"), ("too_long", "answer"), ("template", "empty_turn")} <= checks


def test_clean_writes_a_new_file_and_a_log_and_refuses_its_input(tmp_path):
    mapping = tmp_path / "labels.yaml"
    mapping.write_text("Billing: billing\nbug-report: bug_report\n")
    out = tmp_path / "train.clean.jsonl"
    result = tuneloop("data", "clean", PLANTED / "train.jsonl", "--out", out, "--labels", mapping)
    assert result.exit_code == 0, result.output
    assert "76 / 59" in result.output
    assert len((tmp_path / "train.clean.changes.jsonl").read_text().splitlines()) == 32
    refused = tuneloop("data", "clean", out, "--out", out)
    assert refused.exit_code == 1 and "is the input file" in refused.output


def test_split_then_audit_finds_no_leakage(tmp_path):
    result = tuneloop(
        "data",
        "split",
        CLEAN / "train.jsonl",
        "--out-dir",
        tmp_path,
        "--ratios",
        "0.6,0.2,0.2",
        "--seed",
        "7",
    )
    assert result.exit_code == 0, result.output
    audit = tuneloop(
        "data",
        "audit",
        tmp_path / "train.jsonl",
        "-t",
        tmp_path / "validation.jsonl",
        "-t",
        tmp_path / "test.jsonl",
    )
    assert audit.exit_code == 0, audit.output


def test_preview_marks_exactly_the_trained_tokens(config):
    result = tuneloop("data", "preview", CLEAN / "train.jsonl", "--config", config, "-n", "2")
    assert result.exit_code == 0, result.output
    assert result.output.count("⟦billing<|im_end|>⟧") == 2
    assert "<|im_start|>system\nRoute the ticket.<|im_end|>" in result.output
    assert "Why was I charged twice for the March invoice?<|im_end|>" in result.output


def bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    row = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "billing"}]}
    )
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    truncated = tmp_path / "truncated.jsonl"
    truncated.write_text(row + "\n" + row[:25] + "\n")
    huge = tmp_path / "huge.jsonl"
    with huge.open("wb") as handle:  # one 9 MB line: over the reader's 8 MiB cap, so it is never loaded whole
        handle.write(row.encode() + b'\n{"text": "')
        handle.write(b"x" * (9 * 1024 * 1024))
        handle.write(b'"}\n')
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("text,label\ncafé crème,billing\n".encode("latin-1"))
    return {
        "binary": (binary, "binary.jsonl:1: binary data (NUL byte)"),
        "truncated": (truncated, "truncated.jsonl:2: not valid JSON"),
        "huge": (huge, "huge.jsonl:2: line is 9,437,197 bytes, over the 8,388,608-byte limit"),
        "latin1": (latin1, "latin1.csv:2: not UTF-8 text"),
    }


@pytest.mark.parametrize("kind", ["binary", "truncated", "huge", "latin1"])
def test_bad_input_gives_one_clear_line_and_exit_1(tmp_path, kind):
    path, message = bad_files(tmp_path)[kind]
    result = tuneloop("data", "split", path, "--out-dir", tmp_path / "out")
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    audit = tuneloop("data", "audit", path)
    assert audit.exit_code == 1 and message.split(": ", 1)[1] in audit.output


def test_the_installed_command_prints_no_traceback(tmp_path):
    path, message = bad_files(tmp_path)["binary"]
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "tuneloop.cli.main", "data", "audit", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    assert message in done.stdout
