#!/usr/bin/env bash
# GPU check: the test suite and the speed benchmark on a GPU machine, for the
# two backends that must run SparseLinear on a GPU with no code change (JAX and
# PyTorch; the project's TensorFlow is the CPU build).
#
#   bash benchmarks/gpu_check.sh            # from the repository root, any cwd
#   PYTHON=/path/to/venv/bin/python bash benchmarks/gpu_check.sh
#   BACKENDS="torch" QUICK="" bash benchmarks/gpu_check.sh   # full benchmark grid
#
# Needs: a CUDA build of jax (jax[cuda12]) and of torch, keras, pytest, and the
# package importable (pip install -e .[test]). Writes
# benchmarks/results/speed_gpu.{json,md}. Every step runs even if one before it
# failed (the benchmark is wanted either way); the exit status is non-zero if
# any failed. SPEED_ARGS replaces the benchmark's grid options.
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
BACKENDS=${BACKENDS:-"jax torch"}
QUICK=${QUICK-"--quick"}
SPEED_ARGS=${SPEED_ARGS:-$QUICK}
export TF_CPP_MIN_LOG_LEVEL=3 PYTHONWARNINGS=ignore
failed=()

echo "== GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# The correctness checks compare with float64 NumPy references: JAX's default
# float32 matmul on recent NVIDIA GPUs is TF32 (10-bit mantissa), which is a
# speed choice, not the layer's formula. The benchmark keeps the default.
for backend in $BACKENDS; do
    echo "== $backend: the layer on the GPU (placement, host syncs, mixed precision)"
    JAX_DEFAULT_MATMUL_PRECISION=highest KERAS_BACKEND=$backend "$PYTHON" - <<'EOF' ||
import os

import keras
import numpy as np
from keras import ops

from keras_sparse import SparseLinear

backend = keras.backend.backend()
# EXPECT_DEVICE=cpu runs this check on a machine without a GPU (a dry run).
on_device = ("cpu",) if os.environ.get("EXPECT_DEVICE") == "cpu" else ("gpu", "cuda")
rng = np.random.default_rng(0)
x_host = rng.normal(size=(64, 256)).astype("float32")


def device_of(tensor):
    if backend == "jax":
        return next(iter(tensor.devices())).platform
    return tensor.device.type


def check(policy):
    keras.config.set_dtype_policy(policy)
    layer = SparseLinear.new(256, 128)
    layer.reset_threshold(0.02)
    x = ops.convert_to_tensor(x_host)
    assert device_of(layer.kernel.value) in on_device, device_of(layer.kernel.value)
    if backend == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss(trainable, training):
            out, _, losses = layer.stateless_call(
                trainable, non_trainable, x, training=training, return_losses=True
            )
            return ops.sum(ops.cast(out, "float32")) + sum(losses)

        step = jax.jit(jax.grad(lambda t: loss(t, True)))
        infer = jax.jit(lambda t: loss(t, False))
        step(trainable), infer(trainable)  # compile outside the guard
        with jax.transfer_guard("disallow"):  # no host <-> device copies per step
            grads = jax.block_until_ready(step(trainable))
            jax.block_until_ready(infer(trainable))
        assert all(device_of(g) in on_device for g in grads)
    else:
        import torch

        cuda = torch.cuda.is_available()
        layer(x, training=True)  # first call: lazy initialisation
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")  # any host sync raises
        try:
            out = layer(x, training=True)
            loss = ops.sum(ops.cast(out, "float32")) + sum(layer.losses)
            loss.backward()
            with torch.no_grad():
                layer(x, training=False)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
        assert all(device_of(v.value.grad) in on_device for v in layer.trainable_variables)
    fresh = SparseLinear.new(256, 128)
    fresh.reset_threshold(0.02)
    fresh.hard_prune()  # never trained: the plain inference path
    out = fresh(ops.convert_to_tensor(x_host))
    assert device_of(out) in on_device
    want = x_host @ ops.convert_to_numpy(fresh.effective_weight()) + ops.convert_to_numpy(
        fresh.bias
    )
    tol = 1e-4 if policy == "float32" else 5e-2
    np.testing.assert_allclose(
        ops.convert_to_numpy(ops.cast(out, "float32")), want, rtol=tol, atol=tol
    )
    print(f"   {policy}: ok")


for policy in ("float32", "mixed_float16", "mixed_bfloat16"):
    check(policy)
EOF
        failed+=("$backend layer check")
done

echo "== speed benchmark ($BACKENDS)"
# shellcheck disable=SC2086  # SPEED_ARGS is a list of options
"$PYTHON" benchmarks/speed.py --backend "$(echo "$BACKENDS" | tr ' ' ',')" $SPEED_ARGS \
    --json benchmarks/results/speed_gpu.json --markdown benchmarks/results/speed_gpu.md ||
    failed+=("speed benchmark")

for backend in $BACKENDS; do
    echo "== $backend: test suite"
    JAX_DEFAULT_MATMUL_PRECISION=highest KERAS_BACKEND=$backend \
        "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests || failed+=("$backend tests")
done

if ((${#failed[@]})); then
    printf '== FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "== all GPU checks passed"
