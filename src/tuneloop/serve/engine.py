"""Batched generation over one base model with many LoRA adapters, in one worker thread.

Requests that arrive together (within ``batch_window_ms``) form one batch, whatever adapter each asks for:
PEFT applies each row's adapter inside the same forward pass (``adapter_names=[...]``, ``"__base__"`` for
the plain base), so three requests for three adapters cost one forward per token, not three. Decoding is a
plain KV-cached loop rather than ``generate`` so that every row streams its own tokens, stops on its own
end-of-turn token or ``max_tokens``, and can be dropped when its client goes away; a batch whose rows are
all done or dropped ends at once.

All model work (generation, adapter loads and unloads) runs in the one thread, in submission order, so an
adapter is never changed under a running forward, and the event loop never blocks on compute.
"""

from __future__ import annotations

import hashlib
import inspect
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tuneloop.models import load_causal_lm, load_tokenizer, pick_device, resolve_model

BASE = "__base__"


@dataclass
class GenerationRequest:
    """One row of a batch. ``sink`` callbacks run on the engine thread and must only hand data over."""

    prompt_ids: list[int]
    adapter: str | None
    max_new_tokens: int
    stop_ids: frozenset[int]
    on_token: Callable[[int], None]
    on_finish: Callable[[str, str | None], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)


_STOP = object()


@dataclass
class _Control:
    action: Callable[[], Any]
    future: Future


class Engine:
    """Owns the model. ``submit`` queues a request; ``load_adapter``/``unload_adapter`` return futures."""

    def __init__(
        self,
        base: str,
        precision: str = "auto",
        max_batch_size: int = 8,
        batch_window_ms: float = 10.0,
        on_batch: Callable[[int, set[str], float], None] | None = None,
    ) -> None:
        self.source = resolve_model(base)
        self.setup = pick_device(precision)
        self.tokenizer = load_tokenizer(self.source)
        self.model = load_causal_lm(self.source, self.setup.dtype, self.setup.device).eval()
        self.peft = False
        # transformers 5.2x renamed the KV cache argument and output `past_key_values` -> `cache`
        forward_args = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward_args else "past_key_values"
        self.template_sha256 = hashlib.sha256(
            (self.tokenizer.chat_template or "").encode("utf-8")
        ).hexdigest()
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.max_batch_size = max_batch_size
        self.batch_window = batch_window_ms / 1000.0
        self.on_batch = on_batch
        self._queue: queue.Queue[Any] = queue.Queue()
        self._held: Any = None
        self._thread = threading.Thread(target=self._loop, name="tuneloop-engine", daemon=True)
        self._thread.start()

    # --- public, thread-safe -----------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> None:
        self._queue.put(request)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=30)

    def load_adapter(self, name: str, folder: Path) -> Future:
        return self._control(lambda: self._load(name, folder))

    def unload_adapter(self, name: str) -> Future:
        return self._control(lambda: self._unload(name))

    def _control(self, action: Callable[[], Any]) -> Future:
        future: Future = Future()
        self._queue.put(_Control(action, future))
        return future

    # --- adapters (engine thread only) ---------------------------------------------------------------------
    def _load(self, name: str, folder: Path) -> None:
        """Add a LoRA adapter; a failure leaves the model exactly as it was (the failed adapter removed)."""
        from peft import PeftConfig, PeftModel, set_peft_model_state_dict
        from safetensors.torch import load_file

        config = PeftConfig.from_pretrained(str(folder))
        config.inference_mode = True
        weights = load_file(str(folder / "adapter_model.safetensors"), device=str(self.setup.device))
        if not self.peft:
            wrapped = PeftModel(self.model, config, adapter_name=name)
            try:
                _strict_state_dict(wrapped, weights, name, set_peft_model_state_dict)
            except Exception:
                self.model = wrapped.unload()  # take the half-made adapter out again
                raise
            self.model, self.peft = wrapped, True
        else:
            self.model.add_adapter(name, config)
            try:
                _strict_state_dict(self.model, weights, name, set_peft_model_state_dict)
            except Exception:
                self.model.delete_adapter(name)
                raise
        self.model.to(self.setup.device)  # adapter weights stay fp32, as PEFT keeps them for Predictor
        self.model.eval()

    def _unload(self, name: str) -> None:
        if not self.peft or name not in self.model.peft_config:
            return
        if len(self.model.peft_config) == 1:
            self.model, self.peft = self.model.unload(), False
        else:
            self.model.delete_adapter(name)
        self.model.eval()

    # --- the loop ------------------------------------------------------------------------------------------
    def _next(self, timeout: float | None) -> Any:
        if self._held is not None:
            item, self._held = self._held, None
            return item
        return (
            self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()
        )

    def _loop(self) -> None:
        while True:
            item = self._next(None)
            if item is _STOP:
                return
            if isinstance(item, _Control):
                self._run_control(item)
                continue
            batch = [item]
            deadline = time.monotonic() + self.batch_window
            while len(batch) < self.max_batch_size:
                try:
                    more = self._next(max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if not isinstance(more, GenerationRequest):  # a control or stop: handled after this batch
                    self._held = more
                    break
                batch.append(more)
            batch = [r for r in batch if not r.cancelled.is_set()]
            if batch:
                self._run_batch(batch)

    def _run_control(self, control: _Control) -> None:
        try:
            control.future.set_result(control.action())
        except Exception as exc:  # noqa: BLE001 - handed to the caller, the engine keeps serving
            control.future.set_exception(exc)

    def _run_batch(self, batch: list[GenerationRequest]) -> None:
        started = time.perf_counter()
        missing = [
            r
            for r in batch
            if r.adapter is not None and not (self.peft and r.adapter in self.model.peft_config)
        ]
        for request in missing:
            request.on_finish("unloaded", f"adapter {request.adapter!r} is not loaded")
        batch = [r for r in batch if r not in missing]
        if not batch:
            return
        try:
            self._generate(batch)
        except Exception as exc:  # noqa: BLE001 - one failed batch must not take the server down
            for request in batch:
                request.on_finish("error", f"generation failed: {type(exc).__name__}: {exc}")
        if self.on_batch is not None:
            self.on_batch(len(batch), {r.adapter or BASE for r in batch}, time.perf_counter() - started)

    @torch.inference_mode()
    def _generate(self, batch: list[GenerationRequest]) -> None:
        device = self.setup.device
        width = max(len(r.prompt_ids) for r in batch)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, request in enumerate(batch):
            input_ids[row, width - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
            attention[row, width - len(request.prompt_ids) :] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        extra: dict[str, Any] = {"adapter_names": [r.adapter or BASE for r in batch]} if self.peft else {}
        generators = [_rng(r, device) for r in batch]
        for request in batch:
            request.started.set()
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )
        done = [False] * len(batch)
        produced = [0] * len(batch)
        step_positions = positions[:, -1:]
        while True:
            logits = out.logits[:, -1, :].float()
            chosen = [_choose(logits[row], batch[row], generators[row]) for row in range(len(batch))]
            for row, request in enumerate(batch):
                if done[row]:
                    continue
                if request.cancelled.is_set():
                    done[row] = True
                    request.on_finish("cancelled", None)
                    continue
                token = chosen[row]
                if token in request.stop_ids:
                    done[row] = True
                    request.on_finish("stop", None)
                    continue
                request.on_token(token)
                produced[row] += 1
                if produced[row] >= request.max_new_tokens:
                    done[row] = True
                    request.on_finish("length", None)
            if all(done):
                return
            next_ids = torch.tensor(chosen, dtype=torch.long, device=device)[:, None]
            attention = torch.cat([attention, torch.ones_like(next_ids)], dim=1)
            step_positions = step_positions + 1
            out = self.model(
                input_ids=next_ids,
                attention_mask=attention,
                position_ids=step_positions,
                use_cache=True,
                **{self._cache_kwarg: getattr(out, self._cache_kwarg)},
                **extra,
            )


def _rng(request: GenerationRequest, device: torch.device) -> torch.Generator | None:
    if request.temperature <= 0:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(
        request.seed if request.seed is not None else random.SystemRandom().randrange(2**63)
    )
    return generator


def _choose(logits: torch.Tensor, request: GenerationRequest, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0 (what training-time evaluation and ``Predictor`` do); else top-p sampling."""
    if generator is None:
        return int(logits.argmax())
    probs = torch.softmax(logits / request.temperature, dim=-1)
    if request.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < request.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _strict_state_dict(
    model: Any, weights: dict[str, torch.Tensor], name: str, setter: Callable[..., Any]
) -> None:
    """Load adapter weights and refuse files that leave adapter tensors unset or carry unknown ones."""
    result = setter(model, weights, adapter_name=name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    missing = [k for k in getattr(result, "missing_keys", []) if f".{name}." in k and "lora_" in k]
    if unexpected or missing:
        raise ValueError(
            f"adapter weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
