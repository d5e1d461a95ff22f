"""Where the GPU waits during tuneloop's training steps: idle gaps on the compute stream (diagnostic, one GPU).

Builds the ``tuneloop`` stack of ``train_throughput.py`` (same model shape, workloads and fast path), runs the
warm-up steps and one unprofiled step, then profiles two steps with ``torch.profiler`` and prints one JSON line:
the compute stream's busy and elapsed milliseconds, its idle gaps by size, and which kernels end the gaps of
0.3 ms or more (a kernel that starts a layer, ending many such gaps, means the host reaches that layer late),
the idle time in each 20 ms of the steps, and the host's synchronizing calls with the ops that made them.
The profiler slows the host, so gaps are larger than in unprofiled steps; ``unprofiled_step_s`` is the reference.

    source bench/gpu_setup.sh && python3 bench/step_gaps.py --method qlora --budget-gib 7.02 --workload a
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "src"))

GAP_US = 20  # idle time between kernels below this is launch latency, not waiting
LONG_GAP_US = 300
BIN_US = 20_000


def compute_stream_gaps(events: list, min_gap_us: float) -> tuple[list, list]:
    """The compute stream's kernels as ``(start_us, end_us, name)``, sorted, and its idle gaps longer than
    ``min_gap_us`` as ``(length_us, name of the kernel ending it, start_us)``. The compute stream is the one with
    the most kernels (the offload copies run on another)."""
    import torch

    kernels = [e for e in events if e.device_type() == torch.autograd.DeviceType.CUDA]
    compute = collections.Counter(e.device_resource_id() for e in kernels).most_common(1)[0][0]
    spans = sorted(
        (e.start_ns() / 1e3, (e.start_ns() + e.duration_ns()) / 1e3, e.name())
        for e in kernels
        if e.device_resource_id() == compute
    )
    gaps, end = [], spans[0][1]
    for start, finish, name in spans[1:]:
        if start - end > min_gap_us:
            gaps.append((start - end, name, end))
        end = max(end, finish)
    return spans, gaps


def host_waits(events: list) -> list[dict]:
    """The host's synchronizing CUDA calls of the profiled steps, longest first: milliseconds waited and the ops
    that made them (a wait mid-step empties the GPU's queue, which then idles while the host queues work again)."""
    waits = []
    for event in events:
        if event.name in ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize"):
            chain, parent = [], event.cpu_parent
            while parent is not None and len(chain) < 4:
                chain.append(parent.name[:60])
                parent = parent.cpu_parent
            waits.append({"ms": round(event.time_range.elapsed_us() / 1e3, 1), "in": " < ".join(chain)})
    return sorted(waits, key=lambda w: -w["ms"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="qlora", choices=["lora", "qlora"])
    p.add_argument(
        "--budget-gib", type=float, default=None, help="memory_budget_gib (default: the free GPU memory)"
    )
    p.add_argument("--workload", default="a", choices=["a", "b"])
    p.add_argument("--shape", default="llama-3.1-8b")
    args = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile
    from trainbench.model import SHAPES
    from trainbench.stacks import StackContext, get_stack
    from trainbench.workloads import build

    shape = SHAPES[args.shape]
    workload = build(args.workload, shape.vocab, 3, 3)
    context = StackContext(shape, torch.device("cuda"), args.method, workload, args.budget_gib)
    trainer = get_stack("tuneloop").build(context)
    warm = [trainer.inputs(b) for b in workload.warmup]
    timed = [trainer.inputs(b) for b in workload.timed]
    for inputs in warm:
        trainer.step(inputs)
    torch.cuda.synchronize()
    started = time.perf_counter()
    trainer.step(timed[0])
    torch.cuda.synchronize()
    unprofiled = time.perf_counter() - started
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for inputs in timed[1:]:
            trainer.step(inputs)
        torch.cuda.synchronize()

    spans, gaps = compute_stream_gaps(list(prof.profiler.kineto_results.events()), GAP_US)
    sizes = collections.Counter()
    for length, *_ in gaps:
        sizes["under_0.1_ms" if length < 100 else "under_1_ms" if length < 1000 else "1_ms_or_more"] += length
    enders = collections.Counter()
    for length, name, _ in gaps:
        if length >= LONG_GAP_US:
            enders[name[:80]] += length
    first = spans[0][0]
    idle_per_bin = collections.Counter()  # where in the step the GPU waits: forward, head, backward
    for length, _, start in gaps:
        idle_per_bin[int((start - first) // BIN_US)] += length
    bins = int((spans[-1][1] - first) // BIN_US) + 1
    row = {
        "stack": "tuneloop", "method": args.method, "workload": args.workload, "budget_gib": args.budget_gib,
        "gpu": torch.cuda.get_device_name(), "unprofiled_step_s": round(unprofiled, 4), "profiled_steps": len(timed) - 1,
        "compute_busy_ms": round(sum(b - a for a, b, _ in spans) / 1e3, 1),
        "compute_elapsed_ms": round((spans[-1][1] - spans[0][0]) / 1e3, 1),
        "gap_ms_by_size": {k: round(v / 1e3, 1) for k, v in sizes.items()},
        "long_gaps": sum(1 for length, *_ in gaps if length >= LONG_GAP_US),
        "long_gap_ms_by_ending_kernel": {k: round(v / 1e3, 1) for k, v in enders.most_common(6)},
        "idle_ms_per_20_ms": [round(idle_per_bin[i] / 1e3, 1) for i in range(bins)],
        "host_waits": host_waits(prof.events()),
    }  # fmt: skip
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
