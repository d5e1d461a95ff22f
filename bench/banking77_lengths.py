"""Token lengths of BANKING77 training examples as tuneloop renders them: the histogram workload b draws from.

Renders ``shared/data/banking77/train.csv`` exactly as ``tuneloop train examples/banking77/config.yaml``
does (the task's system prompt, the embedded SmolLM2 tokenizer and its ChatML template, loss on the intent
name and its end-of-turn token), and writes ``(rendered length, trained tokens, count)`` rows, so the data
itself never enters the repository:

    python bench/banking77_lengths.py [--train ../shared/data/banking77/train.csv] [--out bench/data/banking77_lengths.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tuneloop.config import load_config
from tuneloop.data import ChatRenderer, encode_dataset
from tuneloop.models import load_tokenizer, resolve_model
from tuneloop.train.prepare import prepare_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, default=ROOT.parent / "shared/data/banking77/train.csv")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/data/banking77_lengths.json")
    args = parser.parse_args()
    config = load_config(ROOT / "examples/banking77/config.yaml", {"train_file": str(args.train.resolve())})
    source = resolve_model(config.base_model)
    renderer = ChatRenderer(load_tokenizer(source))
    data = prepare_data(config)
    encoded, report = encode_dataset(renderer, data.train, config.max_seq_len, config.truncation)
    counts = Counter((len(e.input_ids), e.num_trained_tokens) for e in encoded)
    lengths = [len(e.input_ids) for e in encoded]
    payload = {
        "what": "BANKING77 train split rendered by tuneloop for examples/banking77/config.yaml",
        "tokenizer": f"{source.name} (embedded SmolLM2-135M-Instruct, ChatML template)",
        "system_prompt": data.spec.system_prompt,
        "examples": len(encoded),
        "mean_length": round(sum(lengths) / len(lengths), 2),
        "max_length": max(lengths),
        "mean_trained": round(report.trained_tokens / len(encoded), 2),
        "columns": ["rendered_tokens", "trained_tokens", "count"],
        "histogram": [[n, t, c] for (n, t), c in sorted(counts.items())],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=None, separators=(",", ":")) + "\n")
    print(json.dumps({k: v for k, v in payload.items() if k != "histogram"} | {"rows": len(counts)}))


if __name__ == "__main__":
    main()
