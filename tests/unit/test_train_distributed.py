"""Two processes (CPU, gloo) train exactly like one process that accumulates their micro-batches.

``torchrun --nproc_per_node 2`` is what ``accelerate launch`` does on a two-GPU host; here it runs on the
CPU so CI covers the data sharding (round-robin micro-batches, an idle rank weighted zero in a short last
window), the global loss normalisation and the learning-rate schedule of the multi-process path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tuneloop import train

pytestmark = pytest.mark.unit

SCRIPT = "import sys\nfrom tuneloop import train\nfrom tuneloop.config import load_config\ntrain.run(load_config(sys.argv[1]))\n"


def rows(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_process_accumulating(tiny_config, tmp_path):
    # 12 examples / batch 4 = 3 micro-batches per epoch: windows of 2, then 1 (the second process idles)
    options = dict(batch_size=4, epochs=2, lora_dropout=0.0, report_to="none")
    single = train.run(tiny_config(output_dir=str(tmp_path / "one"), grad_accum=2, **options))
    config = tiny_config(output_dir=str(tmp_path / "two"), **options)
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two, one = rows(config.output_dir), rows(single.output_dir)
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for mine, theirs in zip(two, one):
        for key, value in theirs.items():
            assert mine[key] == pytest.approx(value, rel=1e-5), (key, mine, theirs)
    record = json.loads((config.output_dir / "record.json").read_text())
    assert record["train"]["processes"] == 2
    assert (config.output_dir / "adapter" / "adapter_model.safetensors").is_file()
