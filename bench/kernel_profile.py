"""Diagnostic: one profiled training step of a stack (8B shape, workload a), its GPU kernels and idle gaps.

Builds a stack of ``train_throughput.py`` in this process (run Unsloth's with its peer folder on PYTHONPATH, and
after a ``train_throughput.py`` run has written its checkpoint folder), runs the warm-up steps and two timed
steps, then profiles one step and prints: the compute stream's kernel count, busy and elapsed milliseconds, its
idle gaps by size, the 40 kernels taking the most time (with their counts), and the CUDA runtime calls.
Comparing two stacks' kernel tables is how issue 7's QLoRA gap was found (results/kernel-profile-qlora-h200.txt).

    source bench/gpu_setup.sh
    python3 bench/kernel_profile.py tuneloop qlora 7.02
    PYTHONPATH=/tmp/peers/unsloth:$PYTHONPATH python3 bench/kernel_profile.py unsloth qlora 0
    PYTHONPATH=/tmp/peers/unsloth:$PYTHONPATH python3 bench/kernel_profile.py unsloth lora 0 no-checkpointing
"""

import collections
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "src")]
from step_gaps import compute_stream_gaps
from torch.profiler import ProfilerActivity, profile
from trainbench.model import SHAPES
from trainbench.stacks import StackContext, get_stack
from trainbench.workloads import build

stack, method, budget = sys.argv[1], sys.argv[2], float(sys.argv[3])
checkpointing = sys.argv[4] if len(sys.argv) > 4 else None  # a mode of the stack's own (trainbench.stacks)
shape = SHAPES["llama-3.1-8b"]
wl = build("a", shape.vocab, 3, 3)
ctx = StackContext(
    shape,
    torch.device("cuda"),
    method,
    wl,
    budget,
    Path("/tmp/tuneloop-bench-checkpoint") if stack == "unsloth" else None,
    checkpointing,
)
tr = get_stack(stack).build(ctx)
warm = [tr.inputs(b) for b in wl.warmup]
timed = [tr.inputs(b) for b in wl.timed]
for x in warm:
    tr.step(x)
torch.cuda.synchronize()
ts = []
for x in timed[:2]:
    t = time.perf_counter()
    tr.step(x)
    torch.cuda.synchronize()
    ts.append(time.perf_counter() - t)
print("plan", tr.info.get("fast_path", {}).get("reasons") or tr.info)
print(
    stack,
    method,
    "unprofiled steps",
    [round(t, 4) for t in ts],
    "peak",
    round(torch.cuda.max_memory_allocated() / 2**30, 2),
)
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    tr.step(timed[2])
    torch.cuda.synchronize()
events = list(prof.profiler.kineto_results.events())
spans, gaps = compute_stream_gaps(events, 0)
buckets = collections.Counter()
counts = collections.Counter()
for g, *_ in gaps:
    k = (
        "<5us"
        if g < 5
        else "5-20us"
        if g < 20
        else "20-100us"
        if g < 100
        else "0.1-1ms"
        if g < 1000
        else ">1ms"
    )
    buckets[k] += g
    counts[k] += 1
print(
    "compute kernels",
    len(spans),
    "busy ms",
    round(sum(f - s for s, f, _ in spans) / 1e3, 1),
    "elapsed ms",
    round((spans[-1][1] - spans[0][0]) / 1e3, 1),
)
print("gaps ms", {k: round(v / 1e3, 1) for k, v in buckets.items()}, "counts", dict(counts))
by = collections.defaultdict(lambda: [0, 0.0])
for s, f, n in spans:
    key = n[:70]
    by[key][0] += 1
    by[key][1] += (f - s) / 1e3
for n, (c, ms) in sorted(by.items(), key=lambda kv: -kv[1][1])[:40]:
    print(f"{ms:8.1f} ms {c:6d}  {n}")
cpu = collections.defaultdict(lambda: [0, 0.0])
for e in events:
    if e.device_type() == torch.autograd.DeviceType.CPU and e.name().startswith("cuda"):
        cpu[e.name()][0] += 1
        cpu[e.name()][1] += e.duration_ns() / 1e6
print(
    "runtime calls",
    {k: (c, round(ms, 1)) for k, (c, ms) in sorted(cpu.items(), key=lambda kv: -kv[1][1])[:8]},
)
