# Source on the GPU machine, from the repository root, before bench/train_throughput.py or bench/end_to_end.py:
#   source bench/gpu_setup.sh
# Needs the carried `.whl` (tuneloop's missing wheels: pydantic stack, gguf, bitsandbytes) and, for the peer
# stacks, `.peers` (bench/pack_peers.sh). Installs .whl into /tmp/site (on PYTHONPATH for every process) and
# unpacks the peers to /tmp/peers/{unsloth,liger}: NOT on PYTHONPATH here; the orchestrator puts a stack's
# folder on the path of that stack's process only (Unsloth patches transformers on import).
# `source bench/gpu_setup.sh --without-bitsandbytes`: tuneloop's default install (no `gpu` extra), as workload (c)
# is measured; with bitsandbytes installed PEFT imports it, and with it torch.compile's modules, at every start.
wheels=$(ls .whl/*.whl)
[ "${1:-}" = "--without-bitsandbytes" ] && wheels=$(ls .whl/*.whl | grep -v bitsandbytes)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
  || return 1 2>/dev/null || exit 1
export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -f .peers/peers.tar.xz ] && [ ! -d /tmp/peers/unsloth ]; then
  mkdir -p /tmp/peers && tar -C /tmp/peers -xJf .peers/peers.tar.xz
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Inductor's CPU vector-ISA probe builds a test library and loads it in a `python -c "import torch; ..."` child with
# no timeout; that child can hang under load (pytorch/pytorch#183515, fixed upstream 2026-05). On 2026-11-25 two
# GPU tests that compile layers hung there on fresh H200 machines. This skips the probe: only Inductor's CPU code
# loses its vector instructions, and the GPU kernels are not affected. With it, on 2026-11-25 the whole GPU suite
# (21 tests) passed on fresh machines; the two that compile most take about 2 minutes each.
export TORCHINDUCTOR_VEC_ISA_OK=0
python3 -c "import torch, transformers, peft; print('setup:', torch.__version__, transformers.__version__, peft.__version__, torch.cuda.get_device_name())"
