"""Independent NumPy references for the masks and for the layers' arithmetic."""

import numpy as np


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def soft_mask(kernel, threshold, temperature):
    return sigmoid((np.abs(kernel) - threshold) * temperature)


def forward(x, kernel, bias, threshold, temperature, hard=False):
    if hard:
        mask = (np.abs(kernel) >= threshold).astype(kernel.dtype)
    else:
        mask = soft_mask(kernel, threshold, temperature)
    y = x @ (kernel * mask)
    return y if bias is None else y + bias


def gradients(x, kernel, threshold, temperature, upstream):
    """Analytic gradients of `sum(forward(x) * upstream)` w.r.t. kernel and threshold."""
    mask = soft_mask(kernel, threshold, temperature)
    d_effective = x.T @ upstream  # dL / d(kernel * mask)
    d_mask_d_logit = mask * (1.0 - mask) * temperature
    d_kernel = d_effective * (mask + np.abs(kernel) * d_mask_d_logit)
    d_threshold = -d_effective * kernel * d_mask_d_logit
    if threshold.ndim == 1:
        d_threshold = d_threshold.sum(axis=0)
    return d_kernel, d_threshold


def central_differences(f, at, eps=1e-6):
    """The gradient of scalar `f` at `at` (float64), one central difference per entry."""
    grad = np.zeros_like(at)
    for index in np.ndindex(at.shape):
        step = np.zeros_like(at)
        step[index] = eps
        grad[index] = (f(at + step) - f(at - step)) / (2 * eps)
    return grad


# ------------------------------------------------------- masks of any rank


def unit_threshold(threshold, kernel_shape, output_axes):
    """A per-unit threshold (shape of the output axes) broadcast to the kernel's rank."""
    shape = [kernel_shape[a] if a in output_axes else 1 for a in range(len(kernel_shape))]
    return np.reshape(threshold, shape)


def mask_of(kernel, threshold, temperature, output_axes, structured=True, hard=False):
    """The weight-granularity mask of a kernel of any rank."""
    if structured:
        threshold = unit_threshold(threshold, kernel.shape, output_axes)
    if hard:
        return (np.abs(kernel) >= threshold).astype(kernel.dtype)
    return soft_mask(kernel, threshold, temperature)


# ------------------------------------------------------------ convolutions


def _pad(x, kernel_size, strides, padding):
    """TensorFlow's "same" padding: `ceil(size / stride)` outputs, the odd pixel after."""
    if padding == "valid":
        return x
    pads = [(0, 0)]
    for size, k, s in zip(x.shape[1:-1], kernel_size, strides):
        total = max((-(-size // s) - 1) * s + k - size, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(x, pads + [(0, 0)])


def conv(x, kernel, strides=1, padding="valid"):
    """Keras `ops.conv` (channels last, cross-correlation): `x (N, *spatial, C)`,
    `kernel (*k, C, F)`."""
    rank = kernel.ndim - 2
    strides = (strides,) * rank if np.isscalar(strides) else tuple(strides)
    x = _pad(x, kernel.shape[:rank], strides, padding)
    windows = np.lib.stride_tricks.sliding_window_view(
        x, kernel.shape[:rank], axis=range(1, rank + 1)
    )
    windows = windows[(slice(None),) + tuple(slice(None, None, s) for s in strides)]
    # windows: (N, *out, C, *k) -> contract C and k with the kernel (*k, C, F)
    axes_windows = list(range(rank + 1, 2 * rank + 2))
    axes_kernel = [rank] + list(range(rank))
    return np.tensordot(windows, kernel, axes=(axes_windows, axes_kernel))


def depthwise_conv(x, kernel, strides=1, padding="valid"):
    """`kernel (*k, C, M)`: output channel `c * M + m` is channel `c` convolved with
    `kernel[..., c, m]`."""
    rank = kernel.ndim - 2
    channels, multiplier = kernel.shape[-2:]
    outputs = []
    for c in range(channels):
        for m in range(multiplier):
            single = kernel[..., c : c + 1, m : m + 1]
            outputs.append(conv(x[..., c : c + 1], single, strides, padding)[..., 0])
    assert rank >= 1
    return np.stack(outputs, axis=-1)


def conv_transpose(x, kernel):
    """Keras `ops.conv_transpose` with strides 1 and `"valid"` padding: `kernel (*k, F, C)`.

    Each input position adds `x * kernel` into the output window it came from
    (the adjoint of `conv`).
    """
    rank = kernel.ndim - 2
    size = kernel.shape[:rank]
    out_spatial = tuple(x.shape[1 + i] + size[i] - 1 for i in range(rank))
    out = np.zeros((x.shape[0],) + out_spatial + (kernel.shape[-2],))
    for position in np.ndindex(*x.shape[1 : 1 + rank]):
        window = (slice(None),) + tuple(slice(p, p + k) for p, k in zip(position, size))
        contribution = np.tensordot(x[(slice(None),) + position], kernel, axes=([1], [rank + 1]))
        out[window] += contribution
    return out


# ------------------------------------------------------ the scheduler's freeze


def frozen_keep(margins, target, min_density, per_layer=False):
    """What `SparsityScheduler`'s freeze keeps of masks of weight granularity.

    `margins` holds one array per mask, `(|kernel| - threshold) / weight_scale`. Each
    group (all masks, or each mask with `per_layer`) keeps `round((1 - target) * size)`
    weights: first each mask's `ceil(min_density * size)` best margins (its floor), then
    the best margins of the group's other weights, up to that count.
    """
    flats = [np.ravel(m) for m in margins]
    keeps = [np.zeros(f.size, bool) for f in flats]
    groups = [[i] for i in range(len(flats))] if per_layer else [list(range(len(flats)))]
    for group in groups:
        budget = int(round((1.0 - target) * sum(flats[i].size for i in group)))
        for i in group:
            floor = int(np.ceil(min_density * flats[i].size))
            keeps[i][np.argsort(-flats[i])[:floor]] = True
        rest = budget - sum(int(keeps[i].sum()) for i in group)
        if rest > 0:
            pool = np.concatenate([np.where(keeps[i], -np.inf, flats[i]) for i in group])
            owner = np.concatenate([np.full(flats[i].size, i) for i in group])
            index = np.concatenate([np.arange(flats[i].size) for i in group])
            for j in np.argsort(-pool)[:rest]:
                keeps[owner[j]][index[j]] = True
    return [k.reshape(np.shape(m)) for k, m in zip(keeps, margins)]


def frozen_units(margins, unit_sizes, target, min_density, per_layer=False):
    """What `SparsityScheduler`'s freeze keeps of masks of neuron granularity.

    `margins` holds one array per mask, a unit's `(rms(w) - threshold) / weight_scale`;
    `unit_sizes` the weights of one unit of each mask. Each group keeps the units closest
    to `round((1 - target) * size)` weights (fewer on a tie): first each mask's floor,
    `ceil(ceil(min_density * size) / unit)` units of best margin, then the best margins
    of the group's other units, as many as hold closest to the budget.
    """
    keeps = [np.zeros(np.size(m), bool) for m in margins]
    groups = [[i] for i in range(len(margins))] if per_layer else [list(range(len(margins)))]
    for group in groups:
        size = sum(np.size(margins[i]) * unit_sizes[i] for i in group)
        budget = int(round((1.0 - target) * size))
        held = 0
        for i in group:
            unit = unit_sizes[i]
            floor = int(np.ceil(np.ceil(min_density * np.size(margins[i]) * unit) / unit))
            keeps[i][np.argsort(-np.ravel(margins[i]))[:floor]] = True
            held += int(keeps[i].sum()) * unit
        pool = [
            (float(np.ravel(margins[i])[j]), i, j)
            for i in group
            for j in range(np.size(margins[i]))
            if not keeps[i][j]
        ]
        pool.sort(reverse=True)
        totals = np.cumsum([0] + [unit_sizes[i] for _, i, _ in pool])
        count = int(np.argmin(np.abs(totals - (budget - held))))
        for _, i, j in pool[:count]:
            keeps[i][j] = True
    return keeps


def feedback_step(log_penalty, densities, sizes, target, scope="global", **options):
    """One update of `SparsityScheduler`'s penalty for one group of masks, written out.

    `densities` are the members' hard densities, `sizes` their weight counts. Returns the
    group's new `log(penalty strength)` and each member's penalty. The law, from the
    scheduler's documentation: the error is `log(measured / (1 - target))`, clipped to
    `[-1, 1]`; `log(penalty)` moves by `gain / ramp` times it per step (`relax` times that
    when the model is sparser than the target), within `[min_penalty, max_penalty]`; the
    strength pushes only while the model is denser than a positive target, shared in
    proportion to size (`"global"`), and never on a mask at or below `min_density`
    (by default a tenth of `final_target`'s density, at most 0.01).
    """
    gain = options.get("gain", 200.0)
    relax = options.get("relax", 0.1)
    ramp = options.get("ramp", 200)
    update_every = options.get("update_every", 1)
    low = np.log(options.get("min_penalty", 1e-6))
    high = np.log(options.get("max_penalty", 1e3))
    # The default floor: a tenth of the final target's density, at most 1%.
    final = options.get("final_target", target)
    min_density = options.get("min_density", min(0.01, 0.1 * (1.0 - final)))
    densities, sizes = np.asarray(densities, float), np.asarray(sizes, float)
    measured = float(np.sum(densities * sizes) / np.sum(sizes))
    if target <= 0:
        return log_penalty, np.zeros(len(sizes))
    error = float(np.clip(np.log(max(measured, 1e-9) / (1.0 - target)), -1.0, 1.0))
    rate = gain / ramp * (1.0 if error > 0 else relax)
    log_penalty = float(np.clip(log_penalty + rate * error * update_every, low, high))
    strength = np.exp(log_penalty) if error > 0 else 0.0
    shares = sizes / sizes.sum() if scope == "global" else np.ones(len(sizes))
    return log_penalty, np.array(
        [strength * share * (d > min_density) for d, share in zip(densities, shares)]
    )
