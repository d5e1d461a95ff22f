"""Throughput of padded vs packed batches (``packing``) on support-ticket data, through the real training stage.

A random-initialised Llama with the embedded SmolLM2 tokenizer and chat template (no download; its size set
by ``--hidden``/``--layers``, so a CPU can run it) is trained for ``--max-steps`` optimizer steps on
``examples/support-triage`` twice, padded and packed, same seed. Tickets are 20-90 tokens once rendered, so a
padded batch spends part of its compute on padding; packing spends none.

    python bench/packing.py --out bench/results/packing-cpu.jsonl                 # CPU, small model
    python bench/packing.py --hidden 576 --layers 30 --heads 9 --kv-heads 3 --precision bf16 --batch-size 32 \
        --max-steps 60 --out bench/results/packing-h200.jsonl                      # SmolLM2-135M shape, GPU

One JSON line per layout: tokens/s (median over logging windows after the first, real tokens only in both
layouts), train seconds, the first logged loss, the share of padding in the padded batches, and the device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tuneloop import train
from tuneloop.config import validate_config
from tuneloop.data import ChatRenderer, encode_dataset
from tuneloop.models import load_tokenizer, resolve_model
from tuneloop.train.batching import epoch_batches
from tuneloop.train.prepare import prepare_data

EXAMPLE = ROOT / "examples" / "support-triage"


def build_model(folder: Path, args: argparse.Namespace) -> None:
    """A random Llama of the requested size beside the embedded model's tokenizer and chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(resolve_model("smollm2-135m-instruct"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def padding_share(config) -> float:
    """Share of the padded layout's tokens that are padding, over the batches the run sees."""
    train_set, _ = encode_dataset(
        ChatRenderer(load_tokenizer(config.base_model)),
        prepare_data(config).train,
        config.max_seq_len,
        config.truncation,
    )
    batches = epoch_batches(train_set, config.batch_size, config.seed, 0)[
        : config.max_steps * config.grad_accum
    ]
    real = sum(len(train_set[i].input_ids) for b in batches for i in b)
    padded = sum(len(b) * max(len(train_set[i].input_ids) for i in b) for b in batches)
    return 1 - real / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_model(model_dir, args)
        rows = []
        for packing in (False, True):
            config = validate_config(
                {
                    "base_model": str(model_dir),
                    "task": "classification",
                    "train_file": str(EXAMPLE / "train.csv"),
                    "test_file": str(EXAMPLE / "test.csv"),
                    "output_dir": str(Path(tmp) / f"run-{packing}"),
                    "batch_size": args.batch_size,
                    "max_steps": args.max_steps,
                    "precision": args.precision,
                    "lora_dropout": 0.0,
                    "logging_steps": 2,
                    "report_to": "none",
                    "packing": packing,
                }
            )
            result = train.run(config)
            logged = [
                json.loads(line) for line in (config.output_dir / "metrics.jsonl").read_text().splitlines()
            ]
            losses = [row for row in logged if "loss" in row]
            rows.append(
                {
                    "bench": "packing",
                    "packing": packing,
                    "tokens_per_s": statistics.median(row["tokens_per_s"] for row in losses[1:]),
                    "train_seconds": round(result.train_seconds, 2),
                    "first_loss": losses[0]["loss"],
                    "padding_share_when_padded": round(padding_share(config), 3),
                    "model": f"llama h{args.hidden} l{args.layers} heads {args.heads}/{args.kv_heads}",
                    "batch_size": args.batch_size,
                    "steps": result.steps,
                    "precision": args.precision,
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "torch": torch.__version__,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
