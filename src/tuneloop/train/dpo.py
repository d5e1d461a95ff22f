"""Direct preference optimisation (DPO), as one recipe you can read top to bottom.

``run(config)`` on rows of ``prompt``/``chosen``/``rejected``: pairs -> both answers rendered with the chat
template (loss only on the answer and its end-of-turn token, as in SFT) -> the base model with a fresh
adapter, or a trained SFT adapter (``init_adapter``) -> the reference log-probabilities, computed once with
the adapter switched off -> the shared loop on the DPO loss -> the adapter and the run record.

The reference model is the frozen base itself: PEFT's ``disable_adapter()`` turns the policy into the
reference, so no second copy of the weights is ever in memory. Because the reference never changes, its
log-probabilities are computed once before training (in eval mode, deterministic), which also halves the
forward passes per step and makes a resumed run see exactly the same targets.

Logged per step and per validation: ``reward_accuracy`` (share of pairs whose implicit reward
``beta * (log pi - log ref)`` ranks chosen above rejected) and ``reward_margin`` (mean reward gap).

``packing`` is ignored here: chosen and rejected answers are scored as padded rows side by side, and a pair's
sequence log-probabilities are read per row (packing is an SFT speed-up, see ``train/fast/packing.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from tuneloop.adapters import get_adapter_method
from tuneloop.config import RunConfig, dump_config
from tuneloop.data import ChatRenderer, Conversation, DataError, EncodedExample, Message
from tuneloop.data.preference import PREFERENCE_SHAPES, PreferencePair
from tuneloop.data.readers import read_rows
from tuneloop.data.render import IGNORE_INDEX
from tuneloop.data.shapes import ShapeOptions
from tuneloop.models import load_tokenizer, resolve_model
from tuneloop.registry import write_json_atomic
from tuneloop.tasks import TaskSpec
from tuneloop.train.batching import collate, epoch_batches
from tuneloop.train.loop import Loop, LoopData, Objective, run_loop
from tuneloop.train.loss import _backbone_and_head
from tuneloop.train.observer import TrainObserver
from tuneloop.train.rundir import fingerprint
from tuneloop.train.setup import (
    MixedPrecision,
    TrainResult,
    artifact_saver,
    build_model,
    build_optimization,
    finish,
    start,
    tracked,
)

__all__ = ["DPOLoss", "EncodedPair", "load_preference_pairs", "run", "sequence_logps"]


@dataclass(frozen=True)
class EncodedPair:
    chosen: EncodedExample
    rejected: EncodedExample


def run(
    config: RunConfig, *, resume: bool = False, overwrite: bool = False, observer: TrainObserver | None = None
) -> TrainResult:
    accelerator, setup, precision, out = start(config, resume=resume, overwrite=overwrite)
    method = get_adapter_method(config.adapter)
    if not method.saves_adapter:
        raise ValueError(f"method dpo needs an adapter method (the reference is the base with it off), not {method.name}")

    # --- data: preference pairs -> chosen and rejected token ids with answer-only labels --------------------
    with accelerator.main_process_first():
        source = resolve_model(config.base_model)
    tokenizer = load_tokenizer(source)
    renderer = ChatRenderer(tokenizer)
    train_raw = load_preference_pairs(config.train_file)
    val_raw = load_preference_pairs(config.validation_file) if config.validation_file else []
    train_pairs, dropped = encode_pairs(renderer, train_raw, config)
    val_pairs, val_dropped = encode_pairs(renderer, val_raw, config)
    if not train_pairs:
        raise ValueError(f"{config.train_file}: every preference pair was dropped as too long")
    if accelerator.is_main_process:
        (out / "config.yaml").write_text(dump_config(config))
        report = {"train": {"kept": len(train_pairs), "dropped_too_long": dropped},
                  "validation": {"kept": len(val_pairs), "dropped_too_long": val_dropped}}  # fmt: skip
        write_json_atomic(out / "data_report.json", report)

    # --- model: the policy is base + adapter; the reference is the same weights with the adapter off -------
    model, fast_path = build_model(config, method, source, setup, keep_peft_layers=True)
    if fast_path.kernels == "fused":  # the swap hides the PEFT layers that the reference pass switches off
        fast_path = replace(fast_path, kernels="eager", reasons=(*fast_path.reasons, "DPO keeps PEFT's LoRA layers"))
    pad = tokenizer.pad_token_id
    with precision.autocast():  # the same mixed precision as the policy's forward, so step 0 has zero rewards
        train_ref = reference_logps(model, train_pairs, pad, config.eval_batch_size, setup.device)
        val_ref = reference_logps(model, val_pairs, pad, config.eval_batch_size, setup.device)
    batches_per_epoch = math.ceil(len(train_pairs) / config.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / (config.grad_accum * accelerator.num_processes))
    optimizer, scheduler = build_optimization(config, model, setup.device, steps_per_epoch, processes=accelerator.num_processes)
    dpo_module, optimizer = accelerator.prepare(DPOLoss(model, config.dpo_beta), optimizer)  # scheduler: see sft.py
    before = _validate(accelerator, precision, dpo_module, val_pairs, val_ref, config.eval_batch_size, pad)

    # --- the loop ------------------------------------------------------------------------------------------
    chosen = [p.chosen for p in train_pairs]
    loop_data = LoopData(
        epoch_batches=lambda epoch: epoch_batches(chosen, config.batch_size, config.seed, epoch),
        collate=lambda indices: collate_pairs(train_pairs, train_ref, indices, pad),
        validate=lambda: _validate(accelerator, precision, dpo_module, val_pairs, val_ref, config.eval_batch_size, pad),
        steps_per_epoch=steps_per_epoch,
    )
    objective = Objective(
        count=lambda batch: batch["input_ids"].shape[0] // 2, forward=lambda module, batch: module(**batch), count_name="pairs"
    )
    stream = ([p.chosen.input_ids, p.chosen.labels, p.rejected.input_ids, p.rejected.labels] for p in train_pairs)
    with tracked(config, out, observer, accelerator, resume, fast_path) as tracked_observer:
        loop = Loop(
            config, out, accelerator, dpo_module, model, optimizer, scheduler, tracked_observer,
            fingerprint(config, stream, accelerator.num_processes), precision,
        )  # fmt: skip
        result = run_loop(loop, loop_data, objective, resume=resume)

    # --- artefacts -----------------------------------------------------------------------------------------
    spec = _task_spec(config, train_raw)
    save = artifact_saver(tokenizer, renderer.format, spec, source, out, method)
    extra = {
        "chat_format": renderer.format.as_dict(),
        "task": spec.as_dict(),
        "dpo": {"beta": config.dpo_beta, "validation_before_training": before},
    }
    return finish("dpo", config, out, accelerator, model, save, result, setup, source, extra, fast_path)


# --- data ------------------------------------------------------------------------------------------------


def load_preference_pairs(path: Path) -> list[PreferencePair]:
    """Every row of ``path`` as a preference pair; a row of another shape is an error naming file and line."""
    shape = PREFERENCE_SHAPES["preference"]
    options = ShapeOptions()
    pairs = []
    for row in read_rows(path):
        if not shape.matches(row.data, options):
            raise DataError(row.ref, "method dpo needs preference rows with prompt, chosen and rejected")
        pairs.append(shape.convert(row, options))
    return pairs


def encode_pairs(
    renderer: ChatRenderer, pairs: list[PreferencePair], config: RunConfig
) -> tuple[list[EncodedPair], list[str]]:
    """Render both answers after the same prompt; a pair with either side too long follows ``truncation``."""
    encoded, dropped = [], []
    for pair in pairs:
        sides = []
        for answer in (pair.chosen, pair.rejected):
            messages = (*pair.prompt, Message("assistant", answer))
            conversation = Conversation(messages, pair.source).with_system_prompt(config.system_prompt)
            sides.append(renderer.encode(conversation))
        longest = max(len(side.input_ids) for side in sides)
        if longest > config.max_seq_len:
            if config.truncation == "error":
                raise DataError(
                    pair.source,
                    f"renders to {longest} tokens, over max_seq_len={config.max_seq_len}; raise max_seq_len "
                    "or set truncation: drop",
                )
            dropped.append(str(pair.source))
            continue
        encoded.append(EncodedPair(*sides))
    return encoded, dropped


def collate_pairs(
    pairs: list[EncodedPair], reference: torch.Tensor, indices: list[int], pad_id: int
) -> dict[str, torch.Tensor]:
    """One batch of ``2B`` rows: the chosen answers, then the rejected ones, with their reference log-probs."""
    rows = [pairs[i].chosen for i in indices] + [pairs[i].rejected for i in indices]
    batch = collate(rows, pad_id)
    batch["ref_logps"] = torch.cat([reference[indices, 0], reference[indices, 1]])
    return batch


def _task_spec(config: RunConfig, pairs: list[PreferencePair]) -> TaskSpec:
    """Classification pairs answer with labels: the label set is every answer seen unless configured."""
    labels: tuple[str, ...] = tuple(config.labels or ())
    if config.task == "classification" and not labels:
        labels = tuple(sorted({p.chosen for p in pairs} | {p.rejected for p in pairs}))
    return TaskSpec(config.task, config.system_prompt, labels)


# --- the loss --------------------------------------------------------------------------------------------


def sequence_logps(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's trained tokens (the answer and its end-of-turn token).

    As in :class:`~tuneloop.train.loss.TrainedTokenLoss`, logits are computed only at trained positions.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    parts = _backbone_and_head(model)
    if parts is None:
        selected = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][keep]
    else:
        decoder, head = parts
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        selected = head(hidden[:, :-1][keep])
    token_logps = torch.log_softmax(selected.float(), dim=-1).gather(1, targets[keep].unsqueeze(1)).squeeze(1)
    rows = keep.nonzero()[:, 0]
    return torch.zeros(input_ids.shape[0], device=token_logps.device).index_add(0, rows, token_logps)


class DPOLoss(nn.Module):
    """Wraps the policy; ``forward(batch)`` returns the summed DPO loss and summed reward statistics.

    ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` per pair, summed (the loop divides by the
    window's pairs). A module, like the SFT loss, so DDP/FSDP wrap the whole computation.
    """

    def __init__(self, model: nn.Module, beta: float) -> None:
        super().__init__()
        self.model = model
        self.beta = beta

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, ref_logps: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy = sequence_logps(self.model, input_ids, attention_mask, labels)
        n = input_ids.shape[0] // 2
        rewards = self.beta * (policy - ref_logps.to(policy.dtype))
        chosen, rejected = rewards[:n], rewards[n:]
        loss = -F.logsigmoid(chosen - rejected).sum()
        stats = {
            "reward_accuracy": (chosen > rejected).float().sum(),
            "reward_margin": (chosen - rejected).sum(),
            "reward_chosen": chosen.sum(),
            "reward_rejected": rejected.sum(),
        }
        return loss, {k: v.detach() for k, v in stats.items()}


@torch.no_grad()
def reference_logps(
    model: Any, pairs: list[EncodedPair], pad_id: int, batch_size: int, device: torch.device
) -> torch.Tensor:
    """``(n, 2)`` log-probabilities of chosen and rejected under the base: the adapter switched off."""
    out = torch.zeros(len(pairs), 2)
    if not pairs:
        return out
    was_training = model.training
    model.eval()
    with model.disable_adapter():
        for start in range(0, len(pairs), batch_size):
            indices = list(range(start, min(start + batch_size, len(pairs))))
            batch = collate_pairs(pairs, out, indices, pad_id)
            logps = sequence_logps(model, *(batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")))
            out[indices, 0] = logps[: len(indices)].float().cpu()
            out[indices, 1] = logps[len(indices) :].float().cpu()
    model.train(was_training)
    return out


@torch.no_grad()
def _validate(
    accelerator: Accelerator,
    precision: MixedPrecision,
    module: nn.Module,
    pairs: list[EncodedPair],
    reference: torch.Tensor,
    batch_size: int,
    pad_id: int,
) -> dict[str, float | None]:
    """Held-out pairs: mean DPO loss (``val_loss``, what early stopping watches), reward accuracy and margin."""
    if not pairs:
        return {"val_loss": None}
    module.eval()
    totals: dict[str, float] = {}
    for start in range(0, len(pairs), batch_size):
        indices = list(range(start, min(start + batch_size, len(pairs))))
        batch = {k: v.to(accelerator.device) for k, v in collate_pairs(pairs, reference, indices, pad_id).items()}
        with precision.autocast():
            loss, stats = module(**batch)
        for key, value in {"loss": loss, **stats}.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    n = len(pairs)
    return {
        "val_loss": totals["loss"] / n,
        "val_reward_accuracy": totals["reward_accuracy"] / n,
        "val_reward_margin": totals["reward_margin"] / n,
    }
