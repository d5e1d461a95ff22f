"""Diagnostic microbenchmarks behind three fast-path choices (issue 7), on one GPU; prints a line per variant.

* attention over 2 x 2,048 causal tokens, 32 query / 8 key-value heads of 128: the packed varlen kernel
  (FA2) against SDPA over equal rows (cuDNN on Hopper), forward and backward;
* a 4,096 x 4,096 -> 14,336 LoRA linear compiled by Inductor: PEFT's sum, the fused linear's ``addmm_``
  traced as is (copied first), and as a mutating operator (kept in place);
* rebuilding an NF4 weight of that size: bitsandbytes' kernels against the traced tensor ops under Inductor.

    source bench/gpu_setup.sh && python3 bench/kernel_micro.py
"""

import collections
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "src")]
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from tuneloop.compat.varlen_attn import causal_varlen_attention, installed_varlen_api

dev = "cuda"


def timeit(fn, iters=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    s = torch.cuda.Event(enable_timing=True)
    e = torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / iters


def kernels(fn):
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        fn()
        torch.cuda.synchronize()
    c = collections.Counter()
    for ev in p.key_averages():
        if ev.self_device_time_total > 0:
            c[ev.key[:60]] = round(ev.self_device_time_total / 1e3, 3)
    return dict(c.most_common(6))


torch.manual_seed(0)
B, L, H, HKV, D = 2, 2048, 32, 8, 128
T = B * L
q = torch.randn(T, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(T, HKV, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(T, HKV, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
g = torch.randn(T, H, D, device=dev, dtype=torch.bfloat16)
cu = torch.tensor([0, L, 2 * L], device=dev, dtype=torch.int32)
api = installed_varlen_api()


def flash():
    return causal_varlen_attention(api, q, k, v, cu, L, scale=None)


def dense(gqa=True, expand=False):
    qd = q.view(B, L, H, D).transpose(1, 2)
    kd = k.view(B, L, HKV, D).transpose(1, 2)
    vd = v.view(B, L, HKV, D).transpose(1, 2)
    if expand:
        kd = kd[:, :, None].expand(B, HKV, H // HKV, L, D).reshape(B, H, L, D)
        vd = vd[:, :, None].expand(B, HKV, H // HKV, L, D).reshape(B, H, L, D)
        gqa = False
    o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=gqa)
    return o.transpose(1, 2).reshape(T, H, D)


variants = {
    "flash_varlen": flash,
    "sdpa_gqa": lambda: dense(True),
    "sdpa_expanded_kv": lambda: dense(expand=True),
}
ref = None
for name, fn in variants.items():

    def fb(fn=fn):
        q.grad = k.grad = v.grad = None
        o = fn()
        o.backward(g)
        return o

    o = fb()
    grads = (q.grad.clone(), k.grad.clone(), v.grad.clone())
    if ref is None:
        ref = (o.detach(), grads)
    diff = [
        round((a.float() - b.float()).abs().max().item(), 4)
        for a, b in zip((o.detach(), *grads), (ref[0], *ref[1]))
    ]
    fwd_ms = timeit(fn)
    print(
        name,
        "fwd+bwd ms",
        round(timeit(fb), 3),
        "fwd ms",
        round(fwd_ms, 3),
        "max diff vs flash",
        diff,
        kernels(fb),
        flush=True,
    )

# LoRA linear epilogue under Inductor
from tuneloop.train.fast.lora_matmuls import add_product_

x = torch.randn(T, 4096, device=dev, dtype=torch.bfloat16)
W = torch.randn(14336, 4096, device=dev, dtype=torch.bfloat16) * 0.02
A = torch.randn(16, 4096, device=dev, dtype=torch.bfloat16) * 0.02
Bm = torch.randn(14336, 16, device=dev, dtype=torch.bfloat16) * 0.02


def traced_addmm(x):  # Tensor.addmm_ as traced: functional addmm, the output copied first
    out = F.linear(x, W)
    out.addmm_(x @ A.t(), Bm.t(), alpha=2.0)
    return out


def viaop(x):  # tuneloop's mutating operator, which Inductor keeps in place
    return add_product_(F.linear(x, W), x @ A.t(), Bm.t(), 2.0)


def plain(x):
    return F.linear(x, W)


def peft(x):
    return F.linear(x, W) + (x @ A.t()) @ Bm.t() * 2.0


want = traced_addmm(x)
for name, f in {
    "plain_mm": plain,
    "addmm_inplace_traced": traced_addmm,
    "custom_op_inplace": viaop,
    "peft_add": peft,
}.items():
    c = torch.compile(f)
    o = c(x)
    print(
        name,
        "ms",
        round(timeit(lambda c=c: c(x)), 3),
        "diff",
        round((o.float() - want.float()).abs().max().item(), 4) if name != "plain_mm" else "-",
        kernels(lambda c=c: c(x)),
        flush=True,
    )

# dequant kernel
import bitsandbytes as bnb

from tuneloop.train.fast.four_bit import dequantize_4bit, four_bit_parts, traced_dequantize_4bit

lin = bnb.nn.Linear4bit(
    4096, 14336, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True
)
lin.weight = bnb.nn.Params4bit(
    torch.randn(14336, 4096, dtype=torch.bfloat16) * 0.02,
    requires_grad=False,
    quant_type="nf4",
    compress_statistics=True,
)
lin = lin.cuda()
t, layout = four_bit_parts(lin)
ct = torch.compile(traced_dequantize_4bit)
for name, f in {
    "bnb": lambda: dequantize_4bit(*t, layout),
    "traced_inductor": lambda: ct(*t, layout),
}.items():
    print(name, "ms", round(timeit(f), 4), kernels(f), flush=True)
