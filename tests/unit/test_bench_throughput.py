"""bench/train_throughput.py on CPU: the FLOP count, the workloads, and the orchestrator's process handling.

The GPU numbers themselves come from the device (bench/README.md); what can go wrong without a GPU is
checked here: the MFU denominator, that every stack gets the same batches, and that a stack that crashes,
hangs or cannot start still leaves a row while the others go on.
"""

from __future__ import annotations

import json
import math
import random
import sys
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from trainbench import orchestrate, workloads
from trainbench.flops import DecoderShape, batch_flops, flops_per_token, mfu, sequence_flops

pytestmark = pytest.mark.unit

LLAMA_8B = DecoderShape(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256)


def test_8b_lora_flops_per_token_at_2048_is_the_issues_31_9_gflop() -> None:
    assert round(flops_per_token(LLAMA_8B, 2048, lora_rank=16) / 1e9, 1) == 31.9


def test_8b_adapter_count_matches_the_trainable_parameters_peft_reported_on_the_h200() -> None:
    # bench/results/memory-h200.jsonl: PEFT's own count of the LoRA r=16 parameters of the 8B shape
    rows = [json.loads(line) for line in (ROOT / "bench/results/memory-h200.jsonl").read_text().splitlines()]
    measured = {row["trainable_params"] for row in rows if row.get("shape") == "llama-3.1-8b"}
    assert measured == {LLAMA_8B.lora_params(16)}


def test_attention_term_is_causal_and_per_sequence() -> None:
    d, layers, n = LLAMA_8B.attention_dim, LLAMA_8B.layers, 512
    # doubling a sequence adds the attention of the n x n block the second half sees of the first
    extra = sequence_flops(LLAMA_8B, 2 * n, 16) - 2 * sequence_flops(LLAMA_8B, n, 16)
    assert extra == pytest.approx(3 * 2 * 2 * d * layers * n * n)
    # a batch costs the sum of its sequences at their own lengths: padding adds nothing
    assert batch_flops(LLAMA_8B, [100, 300], 16) == sequence_flops(LLAMA_8B, 100, 16) + sequence_flops(LLAMA_8B, 300, 16)


def test_mfu_is_achieved_over_peak() -> None:
    assert mfu(989e12 * 3, 6.0) == pytest.approx(0.5)
    assert mfu(1.0, 0.0) == 0.0


def test_flop_shapes_match_a_real_peft_model(tiny_shape_model) -> None:
    shape, model, lora = tiny_shape_model
    import torch

    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert linear == shape.linear_params()
    assert sum(p.numel() for p in lora.parameters() if p.requires_grad) == shape.lora_params(4)


@pytest.fixture(scope="module")
def tiny_shape_model():
    import torch
    from peft import LoraConfig, get_peft_model
    from trainbench.flops import LORA_TARGETS
    from trainbench.model import SHAPES, random_model

    shape = SHAPES["tiny"]
    model = random_model(shape, torch.device("cpu"), torch.float32)
    linear_count = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    lora = get_peft_model(random_model(shape, torch.device("cpu"), torch.float32),
                          LoraConfig(r=4, target_modules=list(LORA_TARGETS)))  # fmt: skip
    assert linear_count > 0
    return shape, model, lora


def test_random_model_is_seeded_with_rope_theta_and_predicts_near_uniform(tiny_shape_model) -> None:
    import torch
    from trainbench.model import SHAPES, random_model

    shape, model, _ = tiny_shape_model
    again = random_model(SHAPES["tiny"], torch.device("cpu"), torch.float32)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, shape.vocab, (2, 16))
    loss = model(input_ids=ids, labels=ids).loss
    assert abs(float(loss.detach()) - math.log(shape.vocab)) < 0.5  # random weights: near-uniform predictions
    assert model.config.rope_parameters["rope_theta"] == 500000.0


def test_workloads_are_deterministic_and_shaped_as_the_issue_says() -> None:
    a1, a2 = workloads.build("a", 128256, 2, 3), workloads.build("a", 128256, 2, 3)
    assert a1 == a2 and len(a1.warmup) == 2 and len(a1.timed) == 3
    for batch in a1.timed:
        assert [len(e.input_ids) for e in batch] == [2048, 2048]
        counts = workloads.batch_counts(batch)
        assert counts.trained == counts.real - 2 == counts.padded - 2  # every token but the first of each row
    b = workloads.build("b", 128256, 4, 8)
    assert b == workloads.build("b", 128256, 4, 8)
    tokens = []
    for batch in b.warmup + b.timed:
        assert len(batch) == workloads.EXAMPLES_PER_BATCH
        for e in batch:
            assert 1 <= e.trained < len(e.input_ids) <= workloads.MAX_LEN_B
            assert e.labels[-e.trained :] == e.input_ids[-e.trained :]  # the answer is the end of the example
        tokens.append(workloads.batch_counts(batch).real)
    assert 1500 < sum(tokens) / len(tokens) < 8000  # "a few thousand real tokens" per batch
    assert sum(workloads.batch_counts(x).padded for x in b.timed) > 2 * sum(tokens[4:])  # padding waste is real


def test_banking77_lengths_come_from_the_committed_histogram() -> None:
    histogram = workloads.load_banking77_lengths()
    seen = {(n, t) for n, t, _ in histogram}
    rng = random.Random(0)
    drawn = workloads.sample_lengths(rng, 400, histogram, 2048)
    banking = [pair for pair in drawn if pair in seen]
    assert 0.35 < len(banking) / len(drawn) < 0.75  # about BANKING77_SHARE of the mix
    assert all(1 <= t < n <= 256 for n, t, _ in histogram)  # an intent name and its end-of-turn token; max_seq_len


def test_padded_rows_mask_padding_out_of_attention_and_loss() -> None:
    short = workloads.Example((5, 6, 7), (-100, 6, 7))
    long = workloads.Example((1, 2, 3, 4, 5), (-100, -100, -100, 4, 5))
    rows = workloads.padded([short, long])
    assert rows["input_ids"][0] == [5, 6, 7, 0, 0]
    assert rows["attention_mask"] == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert rows["labels"][0] == [-100, 6, 7, -100, -100]
    counts = workloads.batch_counts([short, long])
    assert (counts.real, counts.padded, counts.trained) == (8, 10, 4)


def _args(tmp_path: Path, **kw) -> Namespace:
    base = {"out_dir": tmp_path, "workloads": ["a", "b"], "shape": "tiny", "peers_dir": tmp_path / "no-peers",
            "min_job_seconds": 1, "job_timeout": 60, "warmup_a": 1, "timed_a": 1, "warmup_b": 1, "timed_b": 1}
    return Namespace(**{**base, **kw})


def test_a_job_without_its_peers_or_its_budget_still_leaves_one_error_row_per_workload(tmp_path: Path) -> None:
    recorder = orchestrate.Recorder(tmp_path)
    args = _args(tmp_path)
    orchestrate.run_job(orchestrate.Job("hf+peft+liger", "lora"), args, recorder, deadline=1e12, checkpoint=None)
    orchestrate.run_job(orchestrate.Job("tuneloop", "lora", budget_from="unsloth:lora"), args, recorder, 1e12, None)
    rows = [json.loads(line) for line in recorder.results.read_text().splitlines()]
    assert [(r["stack"], r["workload"]) for r in rows] == [("hf+peft+liger", "a"), ("hf+peft+liger", "b"),
                                                           ("tuneloop", "a"), ("tuneloop", "b")]  # fmt: skip
    assert all("peer packages not found" in r["error"] for r in rows[:2])
    assert all("no unsloth:lora peak_gib" in r["error"] for r in rows[2:])


def test_budget_comes_from_the_unsloth_row_of_the_same_workload(tmp_path: Path) -> None:
    recorder = orchestrate.Recorder(tmp_path)
    unsloth = orchestrate.Job("unsloth", "lora")
    recorder.emit(unsloth, {"stack": "unsloth", "workload": "a", "peak_gib": 30.5})
    recorder.emit(unsloth, {"stack": "unsloth", "workload": "b", "error": "OutOfMemoryError"})
    assert recorder.peak("unsloth:lora", "a") == 30.5
    assert recorder.peak("unsloth:lora", "b") is None


def test_a_hanging_process_is_killed_at_its_timeout_and_a_crash_reports_its_exit(tmp_path: Path) -> None:
    env = orchestrate.child_env(None)
    rc, output, seconds = orchestrate.run_process([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"], env, 2)
    assert rc is None and "up" in output and seconds < 30
    rc, output, _ = orchestrate.run_process([sys.executable, "-c", "raise SystemExit('boom')"], env, 30)
    assert rc == 1 and "boom" in output


def test_deadline_skips_jobs_with_a_row_saying_so(tmp_path: Path) -> None:
    recorder = orchestrate.Recorder(tmp_path)
    args = _args(tmp_path, min_job_seconds=60)
    orchestrate.run_job(orchestrate.Job("hf+peft", "lora"), args, recorder, deadline=0.0, checkpoint=None)
    rows = [json.loads(line) for line in recorder.results.read_text().splitlines()]
    assert len(rows) == 2 and all(r["error"].startswith("skipped:") for r in rows)


def test_checkpointing_modes_name_their_jobs_and_their_memory_matches() -> None:
    unsloth = orchestrate.Job("unsloth", "lora", checkpointing="no-checkpointing")
    held = orchestrate.Job("tuneloop", "lora", budget_from=unsloth.name)
    assert unsloth.name == "unsloth:lora@no-checkpointing"
    assert held.name == "tuneloop:lora@unsloth-no-checkpointing-memory"
    assert orchestrate.Job("tuneloop", "lora", budget_from="unsloth:lora").name == "tuneloop:lora@unsloth-memory"
    names = [job.name for job in orchestrate.PLAN]
    assert len(names) == len(set(names))
    for job in orchestrate.PLAN:  # every budget comes from a job that runs before it
        assert job.budget_from is None or names.index(job.budget_from) < names.index(job.name)
    with pytest.raises(ValueError, match="no checkpointing mode 'none'"):
        orchestrate.Job("hf+peft", "lora", checkpointing="none")


def test_a_checkpointing_mode_reaches_the_stack_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands: list[list[str]] = []

    def fake_process(command: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, float]:
        commands.append(command)
        return 0, "", 0.0

    monkeypatch.setattr(orchestrate, "run_process", fake_process)
    (tmp_path / "peers" / "unsloth").mkdir(parents=True)
    args = _args(tmp_path, peers_dir=tmp_path / "peers", workloads=["a"])
    job = orchestrate.Job("unsloth", "lora", checkpointing="every-layer")
    orchestrate.run_job(job, args, orchestrate.Recorder(tmp_path), deadline=1e12, checkpoint=tmp_path)
    assert commands and commands[0][commands[0].index("--checkpointing") + 1] == "every-layer"
