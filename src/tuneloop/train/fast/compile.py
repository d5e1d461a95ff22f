"""Regional compilation: each decoder layer compiled by ``torch.compile``, chosen by ``kernels:`` from a registry.

Why layers and not the model: the decoder is one block repeated 16-80 times. Compiling the block (each layer's
``Module.compile()``) traces one layer's code; the layers share that compiled code (dynamo guards on the
module's structure, not its identity), so compile time is that of one or two layers instead of the whole
model, and the embedding, head and loss stay eager (the head is already one fused loss, see ``linear_ce``).
Inside a layer Inductor fuses RMSNorm, RoPE, SwiGLU and the LoRA scaling into a few kernels, and its min-cut
partitioner recomputes cheap element-wise results in the backward pass instead of saving them: fewer saved
activations, which is what lets :mod:`tuneloop.train.fast.memory` checkpoint fewer layers.

``Module.compile()`` (rather than ``torch.compile(module)``) keeps each layer the same object of the same
class, so parameter names, state dicts, PEFT saving and FSDP2's class-based wrapping are untouched.
``dynamic=True`` compiles one graph for every sequence length (padded batches vary in length), so the
number of compiled graphs stays a handful: checkpointed or not, input needing a gradient or not (the first
layer's does not), train or eval, batch size 1 or more. Dynamo keeps at most ``recompile_limit`` (8)
graphs per function *per process*; several compiled runs in one process (a sweep, a notebook) share them,
and beyond the limit torch warns and runs the extra cases eagerly.

A failed compile must not cost a run: before any layer is compiled, a *probe* compiles the first layer of
each kind separately and runs it forward and backward on the inputs a short synthetic batch in the run's layout
(padded, or a packed row under the packed attention) gives it. If that raises, every layer stays eager and one
warning says why. Training then compiles nothing new: no KV cache is built (one graph per layer otherwise),
and a packed row's ``max_length`` is the run's ``max_seq_len``, not a per-batch value.

Compiled layers run with their LoRA linears swapped for :class:`~tuneloop.train.fast.fused.FusedLoraLinear`
(the probe and the training loop both make the swap, :func:`~tuneloop.train.fast.fused.fused_layers_for`). Over a
4-bit base (QLoRA) that is what lets the layer compile at all: the swap rebuilds the dense weight with plain
tensor ops when compiled (:mod:`~tuneloop.train.fast.four_bit`), so no bitsandbytes module forward (a tensor
subclass with custom kernels, whose support under compile varies by version) is traced. A layer with any other bitsandbytes module (a 4-bit linear without a
plain adapter), or a run that keeps PEFT's layers (DPO: its reference pass switches them off), stays eager.

With Inductor, layers that are not checkpointed compile through :func:`inductor_recomputing_elementwise`: the same
Inductor, with its partitioner also allowed to recompute an element-wise result that the backward pass must
materialise (the normed inputs of the LoRA matmuls, SwiGLU's product for the down projection). By default
Inductor saves those, because recomputing them costs one more pass over memory. Measured on the H200 (8B shape,
LoRA, 2 x 2,048 tokens, no layer checkpointed): 27.8 GiB peak against 33.4, the GPU busy 240 against 242 ms a
step. Memory that is not saved is memory the plan does not spend on checkpointing layers. Checkpointed layers
keep Inductor's default: what they save lives only through their own recompute and backward, where the
recomputed values are extra temporaries (every layer checkpointed and offloaded, the peak was 0.16 GiB higher).

Layers whose checkpointed inputs are **offloaded** to host memory are not ``Module.compile()``-d: their
checkpoint function runs the layer's code through a compiled trampoline of its own, outside the
Function that moves the inputs (:mod:`tuneloop.train.fast.offload`; it says ``compiles_layer``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tuneloop.train.fast.fused import fused_layers, is_bitsandbytes_module, unfused_four_bit_layers

# torch._functorch.config's switch for the heuristic that never recomputes what the backward pass must materialise.
ELEMENTWISE_RECOMPUTE_FLAG = "ban_recompute_materialized_backward"


def elementwise_recompute_available() -> bool:
    """Whether the installed torch has the partitioner switch :func:`inductor_recomputing_elementwise` sets."""
    from torch._functorch import config as functorch_config

    return hasattr(functorch_config, ELEMENTWISE_RECOMPUTE_FLAG)


def inductor_recomputing_elementwise(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
    """``torch.compile``'s Inductor backend, whose min-cut partitioner may recompute materialised element-wise results.

    Inductor saves an element-wise result for the backward pass when a matmul there reads it (the result would
    have to be written to memory again: "materialized in backward"), even though the inputs it is computed from
    are saved anyway. In a Llama layer under LoRA those are both normed inputs (read by the adapters' weight
    gradients) and SwiGLU's product (read by the down projection's): about a third of what a layer keeps.
    Lifting that one heuristic, for this compilation only (a scoped config patch, restored on return), lets
    the min cut keep the smaller set. Compute-intensive ops (matmuls, attention) are still never recomputed,
    and the recomputed values are the same operations on the same inputs, so results do not change.
    """
    from torch._functorch import config as functorch_config

    inductor = torch._dynamo.lookup_backend("inductor")
    with functorch_config.patch({ELEMENTWISE_RECOMPUTE_FLAG: False}):
        return inductor(graph, example_inputs)


@dataclass(frozen=True)
class CompileOptions:
    """How to compile: the backend (``"inductor"``; tests pass ``"aot_eager"`` or a counting callable), shapes,
    whether to probe first, and the autocast dtype the training step runs under (the probe uses it too)."""

    backend: str | Callable[..., Any] = "inductor"
    dynamic: bool = True
    probe: bool = True
    autocast_dtype: torch.dtype | None = None
    max_seq_len: int | None = None  # the longest training sequence (CPU attention choice, packing bound)
    packing: bool = False  # batches are packed rows: the probe traces that layout, so training adds no graph
    cuda_graphs: bool = False  # the step is replayed as CUDA graphs (train/fast/graphs.py): auto keeps layers uncompiled
    fuse_lora: bool = True  # LoRA linears swapped for fused ones, as the SFT loop runs them (False: DPO keeps PEFT's)

    def compiler(self, *, checkpointed: bool = False) -> str | Callable[..., Any]:
        """The backend handed to ``torch.compile`` for a layer: for ``"inductor"`` and a layer that is not
        checkpointed, :func:`inductor_recomputing_elementwise` (where the installed torch has its switch);
        otherwise ``backend`` as given."""
        if self.backend == "inductor" and not checkpointed and elementwise_recompute_available():
            return inductor_recomputing_elementwise
        return self.backend


@dataclass(frozen=True)
class KernelOutcome:
    """What a kernel choice did: the kernels actually in use (``compile``, ``fused`` or ``eager``) and why."""

    kernels: str
    compiled_layers: int
    reason: str


KernelChoice = Callable[[Any, list[nn.Module], torch.device, CompileOptions], KernelOutcome]


def use_eager(model: Any, layers: list[nn.Module], device: torch.device, options: CompileOptions) -> KernelOutcome:
    return KernelOutcome("eager", 0, "kernels: eager")


def use_fused(model: Any, layers: list[nn.Module], device: torch.device, options: CompileOptions) -> KernelOutcome:
    """Uncompiled layers whose LoRA linears and RMSNorms the SFT loop swaps for fused ones
    (:mod:`tuneloop.train.fast.fused`); nothing to do to the model here."""
    return KernelOutcome("fused", 0, "kernels: fused LoRA linears and RMSNorms in uncompiled layers")


def compile_layers(model: Any, layers: list[nn.Module], device: torch.device, options: CompileOptions) -> KernelOutcome:
    """Compile every decoder layer in place, after a probe; eager (with one warning) if the probe fails."""
    if not layers:
        return KernelOutcome("eager", 0, "no decoder layers found to compile")
    if any(_is_quantized(layer) for layer in layers):
        if not options.fuse_lora:
            return KernelOutcome("eager", 0, "4-bit (bitsandbytes) layers are kept eager: this recipe keeps PEFT's layers")
        left = sum(unfused_four_bit_layers(layer) for layer in layers)
        if left:
            reason = f"{left} bitsandbytes modules without a plain LoRA adapter; 4-bit layers are kept eager"
            return KernelOutcome("eager", 0, reason)
    if options.probe:
        try:
            _probe(model, layers, device, options)
        except Exception as error:  # any failure of tracing, compiling or running: fall back, say why
            message = f"compiling the decoder layers failed ({_describe(error)}); training eagerly"
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            return KernelOutcome("eager", 0, message)
    lean = 0
    for layer in layers:
        if not getattr(getattr(layer, "_gradient_checkpointing_func", None), "compiles_layer", False):
            compiler = options.compiler(checkpointed=_is_checkpointed(layer))
            lean += compiler is inductor_recomputing_elementwise
            layer.compile(backend=compiler, dynamic=options.dynamic)
    backend = options.backend if isinstance(options.backend, str) else getattr(options.backend, "__name__", "custom")
    if lean:
        backend += f"; {lean} uncheckpointed layers recompute element-wise results in backward"
    return KernelOutcome("compile", len(layers), f"{len(layers)} decoder layers compiled ({backend}, dynamic={options.dynamic})")


def use_auto(model: Any, layers: list[nn.Module], device: torch.device, options: CompileOptions) -> KernelOutcome:
    """``compile`` on CUDA (where Inductor's Triton kernels pay), ``fused`` elsewhere (CPU tests and demo) and
    under ``cuda_graphs`` (the graphs remove the launches compiling would fuse, without compiling)."""
    if device.type == "cuda" and options.cuda_graphs:
        return KernelOutcome("fused", 0, "kernels: auto is fused (uncompiled) under cuda_graphs")
    if device.type == "cuda":
        return compile_layers(model, layers, device, options)
    outcome = use_fused(model, layers, device, options)
    reason = f"kernels: auto on {device.type} is fused (uncompiled)"
    if device.type == "cpu" and _use_math_attention(model, options.max_seq_len):
        reason += "; attention computed by plain matmul + softmax (faster than SDPA's CPU kernel at these lengths)"
    return KernelOutcome(outcome.kernels, 0, reason)


MATH_ATTENTION_MAX_LEN = 1024  # scores of batch x heads x len^2 stay small on the host below this


def _use_math_attention(model: Any, max_seq_len: int | None) -> bool:
    """On CPU, switch this model instance from SDPA to transformers' plain (``eager``) attention.

    SDPA's CPU flash kernel is slow in the backward pass at the short lengths CPU training sees: on the
    support-triage demo (2-core AMX Xeon, bf16, batches of 8 x ~90 tokens) it took a quarter of the step,
    and plain attention cut the step from 1.04 s to 0.90 s. Plain attention holds the scores of a whole
    sequence, so it is only chosen up to :data:`MATH_ATTENTION_MAX_LEN` tokens; packed training replaces the
    attention for its duration either way (:mod:`tuneloop.train.fast.attention`).
    """
    if max_seq_len is None or max_seq_len > MATH_ATTENTION_MAX_LEN:
        return False
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if not hasattr(inner, "set_attn_implementation"):
        return False
    inner.set_attn_implementation("eager")
    return True


KERNELS: dict[str, KernelChoice] = {"eager": use_eager, "fused": use_fused, "compile": compile_layers, "auto": use_auto}


def get_kernel_choice(name: str) -> KernelChoice:
    try:
        return KERNELS[name]
    except KeyError:
        raise KeyError(f"unknown kernels {name!r}; known: {', '.join(sorted(KERNELS))}") from None


def _is_checkpointed(layer: nn.Module) -> bool:
    """transformers' per-layer checkpointing flag (set by the plan, ``fast/memory.py``)."""
    return bool(getattr(layer, "gradient_checkpointing", False))


def _is_quantized(layer: nn.Module) -> bool:
    return any(is_bitsandbytes_module(m) for m in layer.modules())


def _describe(error: BaseException) -> str:
    """The error and, when torch wraps it (``BackendCompilerFailed``...), the root cause: one line each."""

    def line(e: BaseException) -> str:
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0][:300] if text else ''}"

    root = error
    for _ in range(10):  # torch keeps the original as ``inner_exception`` (dynamo) or ``__cause__``
        inner = getattr(root, "inner_exception", None) or root.__cause__
        if inner is None or inner is root:
            break
        root = inner
    return line(error) if root is error else f"{line(error)} <- {line(root)}"


def _probe(model: Any, layers: list[nn.Module], device: torch.device, options: CompileOptions) -> None:
    """Compile the first layer of each kind on its own and run it forward and backward.

    A layer's *kind* is what dynamo's guards tell apart: checkpointed or not, and whether its input needs a
    gradient (the first layer's input usually does not: the embeddings are frozen). The layers' real inputs
    (hidden states, position embeddings, mask) come from a short synthetic batch through the decoder. The
    compiled code is cached on the layers' shared code, so what the probe compiles is what training then
    runs: probing costs no extra compilation. RNG state, train/eval modes and gradients are restored
    afterwards, so a probed run draws the same dropout masks as an unprobed one.
    """
    modes = [(m, m.training) for m in model.modules()]
    grads_before = {id(p) for p in model.parameters() if p.grad is not None}
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), ExitStack() as stack:
            model.train()
            stack.enter_context(_layout(model, options))
            stack.enter_context(fused_layers(model, enabled=options.fuse_lora, lora_only=True))  # as training runs
            inputs = _capture_layer_inputs(model, layers, device, options)
            first_of_kind: dict[tuple[bool, bool], int] = {}
            for index, layer in enumerate(layers):
                kind = (_is_checkpointed(layer), inputs[index][0][0].requires_grad)
                first_of_kind.setdefault(kind, index)
            for (checkpointed, _), index in sorted(first_of_kind.items(), key=lambda kind_index: kind_index[1]):
                args, kwargs = inputs[index]
                kwargs = _fresh_caches(kwargs, model)
                compiler = options.compiler(checkpointed=checkpointed)
                probe = torch.compile(layers[index], backend=compiler, dynamic=options.dynamic)
                hidden = args[0].detach().requires_grad_(args[0].requires_grad)
                with _autocast(device, options.autocast_dtype):
                    out = probe(hidden, *args[1:], **kwargs)
                first = out[0] if isinstance(out, (tuple, list)) else out
                if first.requires_grad:
                    first.float().sum().backward()
    finally:
        for module, training in modes:
            module.training = training
        for parameter in model.parameters():
            if id(parameter) not in grads_before:
                parameter.grad = None


def _capture_layer_inputs(
    model: Any, layers: list[nn.Module], device: torch.device, options: CompileOptions | None = None
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Every layer's call arguments for a batch laid out like the training batches.

    Padded: a 2 x 16 batch; batch 2, because dynamo specializes sizes 0 and 1; a padded row, because a padding
    mask is what padded batches pass (an all-ones mask becomes no mask, another graph). Packed
    (``options.packing``): one row of two examples with the run's ``max_length`` bound, through the same
    :func:`~tuneloop.train.fast.packing.model_inputs` as training (issue 7 c: a padded probe under ``sdpa``
    compiled graphs that packed training never used, then training compiled its own).
    """
    captured: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def hook_for(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured[index] = (args, dict(kwargs))

        return hook

    handles = [layer.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    entry = inner.get_decoder() if hasattr(inner, "get_decoder") else inner
    ids = (torch.arange(32, device=device) % inner.config.vocab_size).reshape(2, 16)
    try:
        with torch.enable_grad(), _uncheckpointed(layers):  # grad as in training: which inputs need one is the kind
            if options is not None and options.packing:
                entry(**_packed_probe_inputs(inner.config.vocab_size, device, options.max_seq_len))
            else:
                mask = torch.ones_like(ids)
                mask[1, -4:] = 0
                entry(input_ids=ids, attention_mask=mask, use_cache=False)  # as training runs (packing.model_inputs)
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(range(len(layers))) - set(captured))
    if missing:
        raise RuntimeError(f"the probe batch did not reach decoder layers {missing}")
    return [captured[i] for i in range(len(layers))]


@contextmanager
def _uncheckpointed(layers: list[nn.Module]) -> Iterator[None]:
    """The capture runs the layers without checkpointing (flags restored after): an offloaded layer's
    checkpoint compiles the layer itself (``fast/offload.py``), and where transformers (5.17) checkpoints
    around ``Module.__call__`` that would trace the capture's hooks, one graph per layer."""
    flags = [getattr(layer, "gradient_checkpointing", False) for layer in layers]
    for layer in layers:
        layer.gradient_checkpointing = False
    try:
        yield
    finally:
        for layer, flag in zip(layers, flags, strict=True):
            layer.gradient_checkpointing = flag


def _packed_probe_inputs(vocab_size: int, device: torch.device, max_seq_len: int | None) -> dict[str, Any]:
    """A packed row of two examples (10 and 6 tokens) as training passes it to the decoder."""
    from tuneloop.data.types import EncodedExample, RowRef
    from tuneloop.train.fast.packing import model_inputs, pack

    examples = [EncodedExample(tuple(i % vocab_size for i in range(n)), (0,) * n, RowRef("probe", n)) for n in (10, 6)]
    row = pack(examples, max_seq_len if max_seq_len and max_seq_len >= 10 else None)
    keys = ("position_ids", "cu_seq_lens")
    inputs = model_inputs(row["input_ids"].to(device), None, *(row[k].to(device) for k in keys), row["max_length"])
    return inputs


def _layout(model: Any, options: CompileOptions) -> Any:
    """The attention packed training selects (:func:`~tuneloop.train.fast.attention.packed_attention`),
    selected for the probe too; restored after it."""
    if not options.packing:
        return nullcontext()
    from tuneloop.train.fast.attention import packed_attention

    return packed_attention(model)


def _fresh_caches(kwargs: dict[str, Any], model: Any) -> dict[str, Any]:
    """The captured call wrote its keys and values into the KV cache it was given (training forwards build one
    when ``use_cache`` is on); the probe's call gets an empty cache of that type instead, or it would attend
    over twice the keys."""
    from transformers.cache_utils import Cache, DynamicCache

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {k: DynamicCache(config=inner.config) if isinstance(v, Cache) else v for k, v in kwargs.items()}


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device.type, dtype=dtype)
    return torch.autocast(device.type, enabled=False)
