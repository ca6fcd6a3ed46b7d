"""Independent NumPy references for the SparseLinear formulas."""

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
