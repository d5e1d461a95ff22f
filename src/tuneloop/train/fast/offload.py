"""Checkpointed decoder layers whose inputs wait in host memory, with the layers' code still compiled.

Why not ``save_on_cpu`` around torch's checkpoint (what the planner used before): its saved-tensor hooks
are not traced by dynamo, so an offloaded run gave up its compiled layers (Llama-3.1-8B shape on the H200:
6,959 tokens/s eager+offload vs 10,877 compiled, every layer checkpointed); and its copies run on the compute
stream, so the GPU waits for each one, device to host in the forward pass and back in the backward pass.

Here each checkpointed layer call is one :class:`_OffloadedLayer` (a ``torch.autograd.Function``):

* **forward**: runs the layer without saving anything for backward, and copies the layer's input hidden
  state to pinned host memory on a side stream, overlapping the next layers' compute
  (``record_stream`` keeps the caching allocator from reusing the GPU buffer before the copy has read it);
* **backward**: takes the input back (its copy was started by the backward of the layer after it), starts
  the copy of the input the *next* backward needs (the layer before), recomputes the layer with gradients
  under the forward's autocast and RNG state, and returns the gradients of the input and of the layer's
  trainable parameters. The parameters are inputs of the Function, so their gradients reach ``.grad``
  through autograd's graph as with torch's non-reentrant checkpoint (hooks, accumulation and
  ``torch.autograd.grad`` alike), and the first layer's adapters are trained although its input (the frozen
  embeddings' output) needs no gradient.

Where compiled code runs: the Function and its copies are hidden from dynamo (``torch.compiler.disable``),
and the layer's computation runs through :class:`CompiledLayerCall`, ``torch.compile`` of a two-line
trampoline that calls what transformers hands the checkpoint function. transformers 5.17 calls
``_gradient_checkpointing_func`` from ``GradientCheckpointingLayer.__call__`` (outside any compiled code) with
``partial(nn.Module.__call__, **kwargs)``; 5.24 calls it from a wrapper of ``forward``, i.e. inside the layer's
``Module.compile()`` region, with ``partial(forward, self, **kwargs)``: there dynamo breaks the graph at the
disabled function. Either way the trampoline traces the layer's code; its graphs are shared by every layer
(dynamo guards on the modules' structure, as for ``Module.compile()``) and number a handful: forward
without gradients, the recompute with them, and the first layer's input needing none.

On the CPU, or with ``offload=False``, the input simply stays where it is: plain checkpointing.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import checkpoint


def _call(function: Callable[..., Any], *args: Any) -> Any:
    """What the compiled trampoline traces: the layer call transformers prepared (its kwargs bound)."""
    return function(*args)


class CompiledLayerCall:
    """Runs a layer call through one ``torch.compile``-d trampoline (one per run: its options, dynamo's cache
    on :func:`_call`'s code, shared by the layers). ``backend=None``: run eagerly."""

    def __init__(self, backend: str | Callable[..., Any] | None = None, *, dynamic: bool = True) -> None:
        self.compiled = backend is not None
        self._run = torch.compile(_call, backend=backend, dynamic=dynamic) if backend is not None else _call

    def __call__(self, function: Callable[..., Any], *args: Any) -> Any:
        return self._run(function, *args)


class HostStash:
    """The parked inputs of one model's checkpointed layers, and the side stream their copies run on.

    One per model (made by :func:`offloaded_checkpoint_functions`): it remembers the input parked last, so
    that each parked input knows the one parked before it, the one whose backward comes next.
    """

    def __init__(self, *, offload: bool, pin_memory: bool) -> None:
        self.offload = offload
        self.pin_memory = pin_memory
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._last: weakref.ref[_ParkedInput] | None = None

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def park(self, tensor: torch.Tensor) -> _ParkedInput:
        parked = _ParkedInput(tensor, self, self._last)
        self._last = weakref.ref(parked)
        return parked


class _ParkedInput:
    """One layer's input between its forward and its backward: in pinned host memory on CUDA (copied on the
    stash's side stream), the tensor itself elsewhere."""

    def __init__(self, tensor: torch.Tensor, stash: HostStash, previous: weakref.ref[_ParkedInput] | None) -> None:
        self.stash = stash
        self.previous = previous
        self.device = tensor.device
        self.host: torch.Tensor | None = None
        self.on_device: torch.Tensor | None = tensor
        self.ready: torch.cuda.Event | None = None
        if tensor.is_cuda and stash.offload:
            side = stash.stream(tensor.device)
            side.wait_stream(torch.cuda.current_stream(tensor.device))  # the input is written on the compute stream
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=stash.pin_memory)
            with torch.cuda.stream(side):
                self.host.copy_(tensor, non_blocking=True)
            tensor.record_stream(side)  # freed on the compute stream: not reused before the copy has read it
            self.on_device = None

    def prefetch(self) -> None:
        """Start copying the input back to the GPU (no-op where it is there already or was taken)."""
        if self.host is None or self.on_device is not None:
            return
        compute = torch.cuda.current_stream(self.device)
        side = self.stash.stream(self.device)
        buffer = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)  # on the compute stream
        side.wait_stream(compute)  # the buffer's memory may still be read by compute work already queued
        with torch.cuda.stream(side):
            buffer.copy_(self.host, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(side)
        buffer.record_stream(side)  # should it be dropped untaken (no backward), not reused before the copy ends
        self.on_device = buffer

    def take(self) -> torch.Tensor:
        """The input on its device, ready for the compute stream; then start the previous layer's copy."""
        self.prefetch()
        tensor = self.on_device
        if self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
        self.host = self.on_device = self.ready = None
        previous = self.previous() if self.previous is not None else None
        if previous is not None:
            previous.prefetch()
        assert tensor is not None, "a checkpointed layer's input was taken twice (a second backward through it?)"
        return tensor


@dataclass
class _LayerCall:
    """Everything the recompute needs besides the parked input: the call, the other positional arguments,
    the autocast and RNG state of the forward pass, and how the outputs nest."""

    function: Callable[..., Any]
    run: CompiledLayerCall
    other_args: tuple[Any, ...]
    parked: _ParkedInput | None = None
    input_requires_grad: bool = False
    autocast: dict[str, dict[str, Any]] = field(default_factory=dict)
    rng: tuple[torch.Tensor, torch.Tensor | None] | None = None
    output_spec: Any = None
    output_leaves: list[Any] = field(default_factory=list)  # non-tensor leaves; tensors come from the Function


def _autocast_state(device_type: str) -> dict[str, dict[str, Any]]:
    """Autocast as the forward ran it, for the recompute (the backward pass runs outside autocast)."""
    kinds = {device_type, "cpu"}
    return {
        kind: {"enabled": torch.is_autocast_enabled(kind), "dtype": torch.get_autocast_dtype(kind),
               "cache_enabled": torch.is_autocast_cache_enabled()}
        for kind in kinds
    }  # fmt: skip


class _OffloadedLayer(torch.autograd.Function):
    """Forward without saved activations, input parked; backward: input back, recompute, gradients."""

    @staticmethod
    def forward(ctx: Any, call: _LayerCall, stash: HostStash, hidden: torch.Tensor, *params: torch.Tensor) -> Any:
        ctx.call, ctx.params = call, params
        ctx.set_materialize_grads(False)
        call.input_requires_grad = hidden.requires_grad
        call.autocast = _autocast_state(hidden.device.type)
        cuda_state = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        call.rng = (torch.get_rng_state(), cuda_state)
        with torch.no_grad():
            outputs = call.run(call.function, hidden, *call.other_args)
        leaves, call.output_spec = pytree.tree_flatten(outputs)
        call.output_leaves = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        tensors = tuple(leaf for leaf in leaves if isinstance(leaf, torch.Tensor))
        ctx.mark_non_differentiable(*(t for t in tensors if not t.is_floating_point()))
        call.parked = stash.park(hidden)
        return tensors

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor | None) -> Any:
        call: _LayerCall = ctx.call
        params: tuple[torch.Tensor, ...] = ctx.params
        hidden = call.parked.take().detach().requires_grad_(call.input_requires_grad)
        cpu_state, cuda_state = call.rng
        devices = [hidden.device] if cuda_state is not None else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, hidden.device)
            with torch.enable_grad(), _autocast_from(call.autocast):
                outputs = call.run(call.function, hidden, *call.other_args)
        tensors = [leaf for leaf in pytree.tree_leaves(outputs) if isinstance(leaf, torch.Tensor)]
        pairs = [(t, g) for t, g in zip(tensors, grad_outputs, strict=True) if g is not None and t.requires_grad]
        wanted = ([hidden] if call.input_requires_grad else []) + list(params)
        none = (None, None, None, *(None for _ in params))
        if not pairs or not wanted:
            return none
        grads = torch.autograd.grad([t for t, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
        grad_hidden = grads[0] if call.input_requires_grad else None
        return (None, None, grad_hidden, *grads[len(wanted) - len(params) :])


def _autocast_from(state: dict[str, dict[str, Any]]) -> ExitStack:
    stack = ExitStack()
    for kind, kwargs in state.items():
        stack.enter_context(torch.autocast(kind, **kwargs))
    return stack


class OffloadedCheckpoint:
    """A layer's ``_gradient_checkpointing_func``: checkpoint with the input parked (see the module docstring).

    Per layer (it passes that layer's trainable parameters to the Function), sharing the model's
    :class:`HostStash` and :class:`CompiledLayerCall`. Falls back to torch's non-reentrant checkpoint for a
    call this cannot take exactly: a first argument that is not a tensor, or other tensors that need a
    gradient (the Function recomputes from the parked input alone and returns gradients only to it and to
    the parameters).
    """

    def __init__(self, layer: torch.nn.Module, stash: HostStash, run: CompiledLayerCall) -> None:
        self.layer = layer
        self.stash = stash
        self.run = run

    @property
    def compiles_layer(self) -> bool:
        """Read by the ``compile`` kernels: this layer's code is compiled here, not by ``Module.compile()``."""
        return self.run.compiled

    @torch.compiler.disable
    def __call__(self, function: Callable[..., Any], *args: Any) -> Any:
        params = tuple(p for p in self.layer.parameters() if p.requires_grad)
        hidden = args[0] if args else None
        if not isinstance(hidden, torch.Tensor) or _other_tensors_need_grad(function, args[1:]):
            return checkpoint(partial(self.run, function), *args, use_reentrant=False)
        if not (hidden.requires_grad or params):
            return self.run(function, *args)
        call = _LayerCall(function=function, run=self.run, other_args=args[1:])
        tensors = _OffloadedLayer.apply(call, self.stash, hidden, *params)
        leaves = iter(tensors)
        flat = [next(leaves) if leaf is None else leaf for leaf in call.output_leaves]
        return pytree.tree_unflatten(flat, call.output_spec)


def _other_tensors_need_grad(function: Callable[..., Any], args: tuple[Any, ...]) -> bool:
    bound = (function.args, function.keywords) if isinstance(function, partial) else ()
    leaves = pytree.tree_leaves((args, bound))
    return any(isinstance(leaf, torch.Tensor) and leaf.requires_grad for leaf in leaves)


def offloaded_checkpoint_functions(
    layers: list[torch.nn.Module], *, offload: bool, pin_memory: bool, run: CompiledLayerCall
) -> list[OffloadedCheckpoint]:
    """One checkpoint function per layer, sharing one stash (so each backward prefetches the next input)."""
    stash = HostStash(offload=offload, pin_memory=pin_memory)
    return [OffloadedCheckpoint(layer, stash, run) for layer in layers]
