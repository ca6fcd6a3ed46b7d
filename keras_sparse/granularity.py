"""What one pruning decision covers: a weight, a whole neuron, or a weight in an N:M group.

`SparseLinear(granularity=...)` picks one:

* `"weight"`: each weight is compared with its threshold (one per neuron
  or one per weight, as `structured` says): unstructured sparsity.
* `"neuron"`: each output neuron is kept or pruned as a whole, on its
  weights' root mean square (RMS) against its threshold. Pruned neurons
  are all-zero kernel columns, which `keras_sparse.shrink()` slices out.
* `"n:m"`: in every group of `m` consecutive weights along the input
  dimension of each neuron, at most `n` stay (2:4 is the pattern of the
  sparse tensor cores of NVIDIA Ampere and later GPUs).

This module holds the masks' arithmetic, in `keras.ops` (for the layer's
forward pass) and in NumPy (for counting and pruning), written so that
both give the same keep set.
"""

from __future__ import annotations

import numpy as np
from keras import ops

GRANULARITIES = ("weight", "neuron", "n:m")
DEFAULT_N_M = (2, 4)

# Floor under a neuron's mean square before its square root: the gradient of
# sqrt at 0 is infinite (0 * inf = NaN for an all-zero column).
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


def neuron_scores(kernel, prune_mask, differentiable=False):
    """Each output neuron's score: the RMS of its (unpruned) weights, shape `(units,)`.

    `||w_j||_2 / sqrt(in_features)` is on the scale of one weight (for
    weights drawn with standard deviation `s` it is about `s`), so a
    neuron's threshold is in weight units, like a weight's, and the
    scheduler's temperature `relative / std(kernel)` is equally sharp in
    both granularities.
    """
    mean_square = ops.mean(ops.square(kernel * prune_mask), axis=0)
    if differentiable:
        mean_square = ops.maximum(mean_square, _MIN_MEAN_SQUARE)
    return ops.sqrt(mean_square)


def neuron_scores_numpy(kernel, prune_mask):
    return np.sqrt(np.mean(np.square(kernel * prune_mask), axis=0))


# --------------------------------------------------------------------- n:m
#
# Groups run along the input dimension (axis 0 of the `(in, units)` kernel):
# rows `[g * m, (g + 1) * m)` of each column. When `m` does not divide
# `in_features`, the kernel is padded with zero rows to a multiple of `m`:
# the last group holds `in_features % m` real weights, of which at most `n`
# stay (all of them when there are `n` or fewer). The padded kernel is then
# exactly N:M, which is what a 2:4 kernel run on inputs padded with zeros
# needs. Within a group, weights are ranked by magnitude, ties going to the
# lower row: the top `n` form the pattern.


def _grouped(values, m):
    """`(in, units)` -> `(groups, m, units)`, zero-padded along `in`."""
    in_features = values.shape[0]
    pad = -in_features % m
    if pad:
        values = ops.pad(values, [[0, pad], [0, 0]])
    return ops.reshape(values, (-1, m, values.shape[-1]))


def _ungrouped(values, in_features):
    return ops.reshape(values, (-1, values.shape[-1]))[:in_features]


def n_m_keep(magnitude, n, m):
    """Boolean `(in, units)`: the top `n` magnitudes of each group of `m` rows."""
    grouped = _grouped(magnitude, m)
    this = ops.expand_dims(grouped, 2)  # (groups, m, 1, units): weight i
    other = ops.expand_dims(grouped, 1)  # (groups, 1, m, units): weight j
    rows = np.arange(m)
    earlier = (rows[None, :] < rows[:, None])[None, :, :, None]  # j comes before i
    beats = ops.logical_or(
        ops.greater(other, this), ops.logical_and(ops.equal(other, this), earlier)
    )
    rank = ops.sum(ops.cast(beats, "int32"), axis=2)
    return _ungrouped(ops.less(rank, n), magnitude.shape[0])


def n_m_boundary(magnitude, n, m):
    """`(in, units)`: the midpoint between the n-th and (n+1)-th magnitude of each weight's group.

    The soft mask of granularity `"n:m"` is
    `sigmoid((|w| - max(boundary, threshold)) * temperature)`: above one half
    for the pattern's weights, below for the others, and differentiable in
    `|w|` (the boundary itself carries no gradient).
    """
    grouped = _grouped(magnitude, m)
    ordered = ops.sort(grouped, axis=1)  # ascending
    boundary = 0.5 * (ordered[:, m - n] + ordered[:, m - n - 1])  # (groups, units)
    boundary = ops.repeat(ops.expand_dims(boundary, 1), m, axis=1)
    return ops.stop_gradient(_ungrouped(boundary, magnitude.shape[0]))


def n_m_keep_numpy(magnitude, n, m):
    magnitude = np.asarray(magnitude)
    in_features, units = magnitude.shape
    pad = -in_features % m
    grouped = np.pad(magnitude, [(0, pad), (0, 0)]).reshape(-1, m, units)
    # A stable sort of `-magnitude` puts ties in row order, as `n_m_keep` does.
    order = np.argsort(-grouped, axis=1, kind="stable")
    keep = np.zeros(grouped.shape, bool)
    np.put_along_axis(keep, order[:, :n], True, axis=1)
    return keep.reshape(-1, units)[:in_features]


def is_n_m_sparse(kernel, n=2, m=4, axis=0):
    """Whether every group of `m` consecutive entries along `axis` has at most `n` nonzeros.

    Args:
        kernel: A 2-D array or tensor: a Keras kernel `(in_features, units)`
            with `axis=0` (default), or a PyTorch weight `(out, in)` with
            `axis=1` (the layout of `torch.sparse.to_sparse_semi_structured`).
        n, m: The pattern, 2:4 by default.
        axis: The input dimension, along which groups run.

    A last group shorter than `m` (when `m` does not divide the dimension)
    is checked as if padded with zeros: at most `n` of its entries nonzero.

    >>> is_n_m_sparse(np.array([[1.0], [0.0], [2.0], [0.0], [3.0]]), 2, 4)
    True
    """
    n, m = check_n_m((n, m))
    values = np.asarray(ops.convert_to_numpy(kernel))
    if values.ndim != 2:
        raise ValueError(f"`is_n_m_sparse()` expects a 2-D kernel. Received: shape={values.shape}")
    values = np.moveaxis(values, axis, 0)
    pad = -values.shape[0] % m
    nonzero = np.pad(values != 0, [(0, pad), (0, 0)]).reshape(-1, m, values.shape[1])
    return bool(np.all(nonzero.sum(axis=1) <= n))
