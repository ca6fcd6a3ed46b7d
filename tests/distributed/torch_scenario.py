"""PyTorch: 2 processes, gloo, `DistributedDataParallel` around the Keras model.

As in Keras's guide "Multi-GPU distributed training with PyTorch": the Keras
model is a `torch.nn.Module`, DDP wraps it, and a plain PyTorch loop trains
it, each process on its half of every batch (a `DistributedSampler`). Run as
a script (tests/test_distribution.py does, in a subprocess); rank 0 prints
one `RESULT {json}` line; any failed check raises in its process.
"""

import gc
import os
import socket
import sys
import time

os.environ["KERAS_BACKEND"] = "torch"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import (  # noqa: E402
    ATOL,
    BATCH_SIZE,
    EPOCHS,
    RTOL,
    assert_same_weights,
    make_data,
    make_model,
    max_gap,
    report,
    scheduler,
    sparse_layers,
    weights_by_path,
)

WORLD_SIZE = 2
PENALTY = 0.05  # the sparsity penalty where no SparsityScheduler sets it


def apply_constraints(model):
    """What Keras's optimizer does after each step (a torch optimizer does not)."""
    for variable in model.trainable_variables:
        if variable.constraint is not None:
            variable.assign(variable.constraint(variable))


def train(module, model, dataset, sampler=None):
    """The guide's loop, plus the layers' `add_loss` terms and the constraints.

    `SparsityScheduler` is a Keras callback; a plain loop calls its hooks
    itself. Every rank runs it: it reads the (equal) weights and writes the
    same penalties and temperatures, so the ranks stay in step.
    """
    callback = scheduler()
    if callback is not None:
        callback.set_model(model)
        callback.on_train_begin()
    step = 0
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=BATCH_SIZE // (WORLD_SIZE if sampler is not None else 1),
        sampler=sampler,
        shuffle=False,
    )
    for epoch in range(EPOCHS):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for inputs, targets in loader:
            if callback is not None:
                callback.on_train_batch_begin(step)
            outputs = module(inputs, training=True)
            # The loader's tensors are on the CPU, Keras's outputs on its device.
            loss = torch.nn.functional.mse_loss(outputs, targets.to(outputs.device))
            loss = loss + sum(model.losses)  # the sparsity penalties
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            apply_constraints(model)
            if callback is not None:
                callback.on_train_batch_end(step, {})
            step += 1
    if callback is not None:
        callback.on_train_end()


def build(seed, initial=None):
    keras.utils.set_random_seed(seed)
    model = make_model()
    if initial is not None:
        model.set_weights(initial)
    for layer in sparse_layers(model):
        layer.sparsity_penalty.assign(PENALTY)
    return model


def run(rank, port):
    torch.set_num_threads(1)
    start = time.perf_counter()
    dist.init_process_group(
        backend="gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        world_size=WORLD_SIZE,
        rank=rank,
    )
    x, y = make_data()
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))

    # The reference, in one process with the whole batch (each rank makes it).
    initial = build(0).get_weights()
    reference = build(0, initial)
    train(reference, reference, dataset)
    expected = weights_by_path(reference)

    # Each rank starts from its own random weights: DDP broadcasts rank 0's.
    model = build(seed=rank)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    assert_same_weights(weights_by_path(model), dict(zip(expected, initial)), "after DDP()", 0, 0)
    sampler = torch.utils.data.distributed.DistributedSampler(
        dataset, num_replicas=WORLD_SIZE, rank=rank, shuffle=False
    )
    # Rank r gets samples r, r + 2, ... of each batch of BATCH_SIZE: the
    # union over ranks of one step's samples is the single-process batch.
    train(ddp, model, dataset, sampler)

    # In step across ranks: every weight, thresholds first, is bitwise equal.
    for variable in model.weights:
        value = variable.value.detach().contiguous()
        gathered = [torch.empty_like(value) for _ in range(WORLD_SIZE)]
        dist.all_gather(gathered, value)
        for other in gathered[1:]:
            assert torch.equal(other, gathered[0]), (rank, variable.path)
    actual = weights_by_path(model)
    gap = max_gap(actual, expected)
    assert_same_weights(actual, expected, f"DDP rank {rank} vs one process", RTOL, ATOL)
    for layer in sparse_layers(model):
        thresholds = np.asarray(keras.ops.convert_to_numpy(layer.threshold))
        if scheduler() is None:  # (the scheduler's freeze resets thresholds to 0)
            assert thresholds.max() > 0.02, (layer.name, "the thresholds did not move")
        assert layer.num_active() == reference.get_layer(layer.name).num_active()
        layer.hard_prune()  # on every rank: a deterministic function of equal weights
    for variable in model.weights:
        value = variable.value.detach().contiguous()
        gathered = [torch.empty_like(value) for _ in range(WORLD_SIZE)]
        dist.all_gather(gathered, value)
        assert torch.equal(gathered[0], gathered[1]), (rank, variable.path, "after hard_prune")
    if rank == 0:
        report(
            backend="torch",
            world_size=WORLD_SIZE,
            callback=scheduler() is not None,
            ddp_max_gap=gap,
            active={layer.name: layer.num_active() for layer in sparse_layers(model)},
            timings={"rank0_s": time.perf_counter() - start},
        )
    # Free DDP (its reducer holds the process group) before the group goes:
    # left to the frame's teardown, after `destroy_process_group`, it can
    # hang the process at exit (seen about one run in three here).
    del ddp
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    torch.multiprocessing.start_processes(
        run, args=(free_port(),), nprocs=WORLD_SIZE, join=True, start_method="spawn"
    )
