"""Run every stack in its own process, in an order that lets tuneloop match Unsloth's memory, within a deadline.

Order (:data:`PLAN`): Unsloth LoRA, so its measured peak per workload is known; tuneloop LoRA with
``memory_budget_gib`` set to that peak ("same memory as Unsloth"); transformers+PEFT; the same pair for
QLoRA; Liger and the transformers QLoRA; last, tuneloop with its default budget (the GPU's free memory),
the row that shows what it does when memory is not the constraint. The first jobs are the comparisons the
issue's targets rest on, so a deadline that cuts the run short cuts the least needed rows. A job that cannot run (its peers missing, no Unsloth peak to match, the
deadline near) still prints one row per workload, with ``error`` saying why, and the others go on.

Each process gets ``PYTHONPATH`` = its stack's peer folder (only Unsloth's process sees Unsloth) + ``bench/``
+ ``src/`` + the caller's path, and ``HF_HUB_OFFLINE=1`` (no hub lookups, no telemetry; Unsloth's generated code goes to /tmp). Its output is
kept (the tail) in one log file beside the JSON lines.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainbench.stacks import STACKS

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "train_throughput.py"
LOG_TAIL_BYTES = 400_000
SAME_MEMORY = "same memory as Unsloth: memory_budget_gib = Unsloth's measured peak_gib on this workload"


@dataclass(frozen=True)
class Job:
    """One stack and method in one process. Its name is what ``--only`` takes and each row's ``job``:
    ``unsloth:lora``, ``unsloth:lora@no-checkpointing`` (a mode of the stack's own, ``Stack.checkpointing``),
    ``tuneloop:lora@unsloth-memory`` (budget = ``unsloth:lora``'s peak), ``tuneloop:lora@unsloth-no-checkpointing-memory``.
    """

    stack: str
    method: str
    budget_from: str | None = None  # a job name whose peak_gib per workload becomes this job's memory budget
    checkpointing: str | None = None  # one of STACKS[stack].checkpointing; None: the stack's default

    def __post_init__(self) -> None:
        if self.checkpointing and self.checkpointing not in STACKS[self.stack].checkpointing:
            raise ValueError(f"{self.stack} has no checkpointing mode {self.checkpointing!r}")

    @property
    def name(self) -> str:
        name = f"{self.stack}:{self.method}" + (f"@{self.checkpointing}" if self.checkpointing else "")
        if self.budget_from:
            budget_stack = self.budget_from.partition(":")[0]
            budget_mode = self.budget_from.partition("@")[2]
            name += f"@{budget_stack}{'-' + budget_mode if budget_mode else ''}-memory"
        return name


PLAN = (  # LoRA comparisons first (they decide issue 7's main targets), each tuneloop job after its Unsloth job
    Job("unsloth", "lora"),
    Job("tuneloop", "lora", budget_from="unsloth:lora"),
    Job("hf+peft", "lora"),
    Job("unsloth", "qlora"),
    Job("tuneloop", "qlora", budget_from="unsloth:qlora"),
    Job("hf+peft+liger", "lora"),
    Job("hf+peft", "qlora"),
    Job("tuneloop", "lora"),
    # Unsloth keeping every activation (the memory of the reference row), tuneloop held to its peak
    Job("unsloth", "lora", checkpointing="no-checkpointing"),
    Job("tuneloop", "lora", budget_from="unsloth:lora@no-checkpointing"),
    Job("unsloth", "lora", checkpointing="every-layer"),
    Job("tuneloop", "lora", budget_from="unsloth:lora@every-layer"),
)
DRY_RUN = ("hf+peft:lora", "tuneloop:lora")


class Recorder:
    """Prints each row and appends it to the results file; keeps them for budgets and the summary."""

    def __init__(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.results = out_dir / "train_throughput.jsonl"
        self.log = out_dir / "train_throughput.log"
        self.rows: dict[str, list[dict[str, Any]]] = {}

    def emit(self, job: Job, row: dict[str, Any]) -> None:
        row = {**row, "job": job.name}
        self.rows.setdefault(job.name, []).append(row)
        line = json.dumps(row)
        print(line, flush=True)
        with self.results.open("a") as handle:
            handle.write(line + "\n")

    def note(self, title: str, text: str) -> None:
        with self.log.open("a") as handle:
            handle.write(f"\n===== {title} =====\n{text}\n")

    def peak(self, job_name: str, workload: str) -> float | None:
        for row in self.rows.get(job_name, []):
            if row.get("workload") == workload and row.get("peak_gib"):
                return float(row["peak_gib"])
        return None


def child_env(peers: Path | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    paths = ([str(peers)] if peers else []) + [str(ROOT / "bench"), str(ROOT / "src")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env.update({"PYTHONPATH": os.pathsep.join(paths), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                "UNSLOTH_COMPILE_LOCATION": "/tmp/unsloth_compiled_cache", **(extra or {})})  # fmt: skip
    return env


def run_process(command: list[str], env: dict[str, str], timeout: float) -> tuple[int | None, str, float]:
    """Run ``command`` in its own process group; on timeout the whole group is killed. (rc, output, seconds)."""
    started = time.perf_counter()
    with subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          start_new_session=True) as proc:  # fmt: skip
        try:
            output, _ = proc.communicate(timeout=max(timeout, 1))
            rc: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # this job's own process group (start_new_session above)
            output, _ = proc.communicate()
            rc = None
    text = output.decode("utf-8", "replace")[-LOG_TAIL_BYTES:]
    return rc, text, time.perf_counter() - started


def write_checkpoint(args: Any, recorder: Recorder, folder: Path, timeout: float) -> str | None:
    """The random checkpoint folder Unsloth loads; returns an error text or None."""
    if (folder / "config.json").exists():
        return None
    command = [sys.executable, str(SCRIPT), "--write-checkpoint", str(folder), "--shape", args.shape]
    rc, output, seconds = run_process(command, child_env(None), timeout)
    recorder.note(f"write checkpoint ({seconds:.0f} s, rc {rc})", output)
    if rc == 0:
        return None
    return f"writing the random checkpoint failed (rc {rc}): {output[-600:]}"


def run_job(job: Job, args: Any, recorder: Recorder, deadline: float, checkpoint: Path | None) -> None:
    stack = STACKS[job.stack]
    workloads = list(args.workloads)
    reasons: dict[str, str] = {}
    budgets: dict[str, float] = {}
    if job.budget_from:
        for name in workloads:
            peak = recorder.peak(job.budget_from, name)
            if peak is None:
                reasons[name] = f"no {job.budget_from} peak_gib on workload {name} to match"
            else:
                budgets[name] = peak
    peers = Path(args.peers_dir) / stack.peers if stack.peers else None
    remaining = deadline - time.monotonic()
    for name in workloads:
        if name in reasons:
            continue
        if peers is not None and not peers.is_dir():
            reasons[name] = f"peer packages not found at {peers} (run bench/gpu_setup.sh first)"
        elif stack.needs_checkpoint and checkpoint is None:
            reasons[name] = "no checkpoint folder (see the write-checkpoint error)"
        elif remaining < args.min_job_seconds:
            reasons[name] = f"skipped: {remaining:.0f} s left of --budget-seconds"
    runnable = [w for w in workloads if w not in reasons]
    if runnable:
        result_file = Path(args.out_dir) / f".rows-{job.name.replace(':', '-').replace('+', '_').replace('@', '-')}.jsonl"
        result_file.unlink(missing_ok=True)
        command = [sys.executable, str(SCRIPT), "--worker", "--stack", job.stack, "--method", job.method,
                   "--shape", args.shape, "--result-file", str(result_file), "--workloads", *runnable,
                   "--warmup-a", str(args.warmup_a), "--timed-a", str(args.timed_a),
                   "--warmup-b", str(args.warmup_b), "--timed-b", str(args.timed_b)]  # fmt: skip
        if checkpoint is not None and stack.needs_checkpoint:
            command += ["--checkpoint", str(checkpoint)]
        if job.checkpointing:
            command += ["--checkpointing", job.checkpointing]
        for name, gib in budgets.items():
            command += ["--budget", f"{name}={gib}"]
        rc, output, seconds = run_process(command, child_env(peers), min(args.job_timeout, remaining))
        recorder.note(f"{job.name} ({seconds:.0f} s, rc {rc})", output)
        rows = [json.loads(line) for line in result_file.read_text().splitlines()] if result_file.exists() else []
        result_file.unlink(missing_ok=True)
        done = {row["workload"] for row in rows}
        for row in rows:
            if job.budget_from:
                row["memory_note"] = SAME_MEMORY
            if "traceback" in row:
                recorder.note(f"{job.name} workload {row['workload']} traceback", row.pop("traceback"))
            recorder.emit(job, row)
        for name in runnable:
            if name not in done:
                why = "timed out" if rc is None else f"process exited with {rc}"
                reasons[name] = f"{why} before a row: {output[-800:]}"
    for name in workloads:
        if name in reasons:
            recorder.emit(job, {"stack": job.stack, "method": job.method, "workload": name, "error": reasons[name]})


def orchestrate(args: Any) -> int:
    started = time.monotonic()
    deadline = started + args.budget_seconds
    recorder = Recorder(Path(args.out_dir))
    names = args.only or (list(DRY_RUN) if args.dry_run else [job.name for job in PLAN])
    unknown = set(names) - {job.name for job in PLAN}
    if unknown:
        raise SystemExit(f"unknown jobs {sorted(unknown)}; known: {[job.name for job in PLAN]}")
    jobs = [job for job in PLAN if job.name in names]
    checkpoint: Path | None = None
    if any(STACKS[job.stack].needs_checkpoint for job in jobs):
        folder = Path(args.checkpoint_dir) / args.shape
        error = write_checkpoint(args, recorder, folder, min(args.job_timeout, deadline - time.monotonic()))
        checkpoint = None if error else folder
        if error:
            recorder.note("checkpoint error", error)
    for job in jobs:
        run_job(job, args, recorder, deadline, checkpoint)
    errors = sum(1 for rows in recorder.rows.values() for row in rows if "error" in row)
    print(f"# {sum(len(r) for r in recorder.rows.values())} rows ({errors} with error) in "
          f"{time.monotonic() - started:.0f} s -> {recorder.results}", file=sys.stderr)  # fmt: skip
    return 0
