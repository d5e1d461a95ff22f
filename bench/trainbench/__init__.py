"""The pieces of bench/train_throughput.py: FLOP count, workloads, random models, stacks, worker, orchestrator.

A package beside the script (not inside ``src/``) because it benchmarks tuneloop against other libraries and
is never shipped; ``bench/`` is put on ``sys.path`` by the script and by its tests.
"""
