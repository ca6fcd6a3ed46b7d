"""What one pruning decision covers: a weight, a whole output unit, or a weight in an N:M group.

Every sparse layer takes `granularity=...`:

* `"weight"`: each weight is compared with its threshold (one per output
  unit or one per weight, as `structured` says): unstructured sparsity.
* `"neuron"`: each output unit (a Dense neuron, a conv filter, an
  EinsumDense output unit, an Embedding row) is kept or pruned as a whole,
  on its weights' root mean square (RMS) against its threshold. Pruned
  units are all-zero slices of the kernel, which `keras_sparse.shrink()`
  removes.
* `"n:m"`: in every group of `m` consecutive weights along the kernel's
  reduction axis (a Dense kernel's inputs, a conv kernel's input channels),
  at most `n` stay (2:4 is the pattern of the sparse tensor cores of NVIDIA
  Ampere and later GPUs).

This module holds that arithmetic in `keras.ops`, for kernels of any rank:
the caller says which axes are reduced (`reduce_axes`) and along which axis
N:M groups run (`axis`).
"""

from __future__ import annotations

import numpy as np
from keras import ops

from keras_sparse.host import to_numpy

GRANULARITIES = ("weight", "neuron", "n:m")
DEFAULT_N_M = (2, 4)

# Floor under a unit's mean square before its square root: the gradient of
# sqrt at 0 is infinite (0 * inf = NaN for an all-zero unit).
_MIN_MEAN_SQUARE = 1e-12


def check_n_m(n_m):
    """`(n, m)` as a tuple of ints, or a `ValueError` that names the value."""
    ok = (
        isinstance(n_m, (tuple, list))
        and len(n_m) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in n_m)
    )
    if not ok or not 0 < n_m[0] < n_m[1]:
        raise ValueError(
            "Received an invalid value for `n_m`, expected a pair of integers "
            "(n, m) with 0 < n < m: at most n weights kept in every group of m. "
            f"Received: n_m={n_m!r}"
        )
    return int(n_m[0]), int(n_m[1])


# ------------------------------------------------------------------ neuron


def neuron_scores(kernel, prune_mask, reduce_axes, differentiable=False):
    """Each output unit's score, the RMS of its (unpruned) weights, kept broadcastable.

    The mean runs over `reduce_axes` with `keepdims=True`, so the result has
    the kernel's rank with size 1 on those axes. `||w_j||_2 / sqrt(size)` is
    on the scale of one weight (for weights drawn with standard deviation
    `s` it is about `s`), so a unit's threshold is in weight units, like a
    weight's, and the scheduler's temperature `relative / std(kernel)` is
    equally sharp in both granularities.
    """
    mean_square = ops.mean(ops.square(kernel * prune_mask), axis=reduce_axes, keepdims=True)
    if differentiable:
        mean_square = ops.maximum(mean_square, _MIN_MEAN_SQUARE)
    return ops.sqrt(mean_square)


# --------------------------------------------------------------------- n:m
#
# Groups run along `axis`: entries `[g * m, (g + 1) * m)` of that axis, for
# every position of the other axes. When `m` does not divide the axis, the
# kernel is padded with zeros to a multiple of `m`: the last group holds
# `size % m` real weights, of which at most `n` stay (all of them when there
# are `n` or fewer). The padded kernel is then exactly N:M, which is what a
# 2:4 kernel run on inputs padded with zeros needs. Within a group, weights
# are ranked by magnitude, ties going to the lower index: the top `n` form
# the pattern.


def _grouped(values, m, axis):
    """Any rank -> `(groups, m, rest)`, the grouped axis first, zero-padded."""
    moved = ops.moveaxis(values, axis, 0)
    size = moved.shape[0]
    flat = ops.reshape(moved, (size, -1))
    pad = -size % m
    if pad:
        flat = ops.pad(flat, [[0, pad], [0, 0]])
    return ops.reshape(flat, (-1, m, flat.shape[-1])), moved.shape


def _ungrouped(grouped, moved_shape, axis):
    flat = ops.reshape(grouped, (-1, grouped.shape[-1]))[: moved_shape[0]]
    return ops.moveaxis(ops.reshape(flat, moved_shape), 0, axis)


def n_m_keep(magnitude, n, m, axis=0):
    """Boolean, `magnitude`'s shape: the top `n` magnitudes of each group of `m` along `axis`."""
    grouped, moved_shape = _grouped(magnitude, m, axis)
    this = ops.expand_dims(grouped, 2)  # (groups, m, 1, rest): weight i
    other = ops.expand_dims(grouped, 1)  # (groups, 1, m, rest): weight j
    rows = np.arange(m)
    earlier = (rows[None, :] < rows[:, None])[None, :, :, None]  # j comes before i
    beats = ops.logical_or(
        ops.greater(other, this), ops.logical_and(ops.equal(other, this), earlier)
    )
    rank = ops.sum(ops.cast(beats, "int32"), axis=2)
    return _ungrouped(ops.less(rank, n), moved_shape, axis)


def n_m_boundary(magnitude, n, m, axis=0):
    """The midpoint between the n-th and (n+1)-th magnitude of each weight's group.

    The soft mask of granularity `"n:m"` is
    `sigmoid((|w| - max(boundary, threshold)) * temperature)`: above one half
    for the pattern's weights, below for the others, and differentiable in
    `|w|` (the boundary itself carries no gradient).
    """
    grouped, moved_shape = _grouped(magnitude, m, axis)
    ordered = ops.sort(grouped, axis=1)  # ascending
    boundary = 0.5 * (ordered[:, m - n] + ordered[:, m - n - 1])  # (groups, rest)
    boundary = ops.repeat(ops.expand_dims(boundary, 1), m, axis=1)
    return ops.stop_gradient(_ungrouped(boundary, moved_shape, axis))


def is_n_m_sparse(kernel, n=2, m=4, axis=0):
    """Whether every group of `m` consecutive entries along `axis` has at most `n` nonzeros.

    Args:
        kernel: An array or tensor of any rank: a Keras Dense kernel
            `(in_features, units)` with `axis=0` (default); a conv kernel
            `(*kernel_size, in_channels, filters)` with `axis=-2` (groups
            along input channels); a PyTorch weight `(out, in)` with `axis=1`
            (the layout of `torch.sparse.to_sparse_semi_structured`).
        n: The most nonzeros a group may hold. Defaults to `2`.
        m: The group size. Defaults to `4` (the 2:4 pattern).
        axis: The reduction axis, along which groups run.

    A last group shorter than `m` (when `m` does not divide the axis) is
    checked as if padded with zeros: at most `n` of its entries nonzero.

    >>> is_n_m_sparse(np.array([[1.0], [0.0], [2.0], [0.0], [3.0]]), 2, 4)
    True
    """
    n, m = check_n_m((n, m))
    values = to_numpy(kernel)
    if values.ndim < 1 or not -values.ndim <= axis < values.ndim:
        raise ValueError(
            f"Received an invalid value for `axis`: {axis!r} is not an axis of a kernel "
            f"of shape {values.shape}."
        )
    values = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
    pad = -values.shape[0] % m
    nonzero = np.pad(values != 0, [(0, pad), (0, 0)]).reshape(-1, m, values.shape[1])
    return bool(np.all(nonzero.sum(axis=1) <= n))
