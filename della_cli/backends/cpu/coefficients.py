"""The coefficients of slerp, nuslerp, multislerp, karcher and model_stock from their Gram
matrices, in numpy float64: the CPU backend's copy of the reference's formulas
(``methods.spherical_pairs``, ``methods.spherical_means``, ``methods.stock``), so that a merge
on the CPU never imports torch (about 1.4 s of a merge that otherwise takes one or two).

The operations are the reference's, in its order. Where numpy's float64 ``arccos``, ``sin``
or a small matrix product rounds differently from torch's, a coefficient can differ in its
last bit; it is rounded to float32 before use, where that changes nothing unless the value
lies within one float64 unit of a float32 rounding boundary (docs/BACKENDS.md). Callers
silence numpy's warnings: NaN inputs make NaN coefficients, as in torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def arccos(x: np.ndarray) -> np.ndarray:
    """``np.arccos``, a NaN passed on as it came, as the reference's ``block_sums.angle_of``
    passes it: numpy's vectorized float64 arccos on AVX-512 (numpy 2.4) returns a NaN of the
    other sign, as torch's ``acos`` does on some CPUs, which reached the output's NaN bits."""
    return np.where(np.isnan(x), x, np.arccos(x))


# As methods.spherical_pairs.ANTIPARALLEL_COS: nuslerp lerps vectors with cos Ω below its negation.
ANTIPARALLEL_COS = 0.9995


def slerp(stats: np.ndarray, t: float, dot_threshold: float = 0.9995, eps: float = 1e-8):
    """(c_base, c_other) from [Σb², Σo², Σbo] (…, 3), as ``spherical_pairs.slerp_coefficients``."""
    norm_a = np.sqrt(stats[..., 0])
    norm_b = np.sqrt(stats[..., 1])
    norm_a = np.where(norm_a > eps, norm_a, 1.0)
    norm_b = np.where(norm_b > eps, norm_b, 1.0)
    cos = np.clip(stats[..., 2] / (norm_a * norm_b), -1.0, 1.0)
    linear = np.abs(cos) > dot_threshold
    theta = arccos(np.where(linear, 0.0, cos))
    sin_theta = np.where(linear, 1.0, np.sin(theta))
    coef_a = np.where(linear, 1.0 - t, np.sin((1.0 - t) * theta) / sin_theta)
    coef_b = np.where(linear, t, np.sin(t * theta) / sin_theta)
    return coef_a, coef_b


def nuslerp(stats: np.ndarray, t: float):
    """(c₀, c₁) from [Σv₀², Σv₁², Σv₀v₁] (…, 3), as ``spherical_pairs.nuslerp_apply``."""
    norm0 = np.maximum(np.sqrt(stats[..., 0]), 1e-7)
    norm1 = np.maximum(np.sqrt(stats[..., 1]), 1e-7)
    cos = np.clip(stats[..., 2] / (norm0 * norm1), -1.0, 1.0)
    colinear = ((1 - np.square(cos)) <= 1e-16) | (cos < -ANTIPARALLEL_COS)
    theta = arccos(np.where(colinear, 0.0, cos))
    sin_theta = np.where(colinear, 1.0, np.sin(theta))
    coef0 = np.where(colinear, 1.0 - t, np.sin((1.0 - t) * theta) / sin_theta)
    coef1 = np.where(colinear, t, np.sin(t * theta) / sin_theta)
    return coef0, coef1


def multislerp(
    gram: np.ndarray, weights: Sequence[float], normalize_weights: bool = True, eps: float = 1e-8
) -> np.ndarray:
    """Coefficients (n,), as ``spherical_means.multislerp_coefficients``."""
    w = np.array(list(weights), dtype=np.float64)
    if normalize_weights:
        if w.sum() == 0:
            raise ValueError("multislerp weights sum to 0; they cannot be normalized.")
        w = w / w.sum()
    norms = np.sqrt(np.maximum(np.diagonal(gram), 0))
    scaled = w / (norms + eps)
    mean_norm = np.sqrt(max(scaled @ gram @ scaled, 0.0))
    if mean_norm < eps:
        return w
    return scaled / mean_norm * (w * norms).sum()


def karcher(gram: np.ndarray, max_iter: int = 10, tol: float = 1e-5) -> np.ndarray:
    """Coefficients (n,), as ``spherical_means.karcher_coefficients``: the Riemannian gradient
    iteration on coefficients over the unit inputs, their dot products read from ``gram``."""
    n = gram.shape[0]
    norms = np.sqrt(np.maximum(np.diagonal(gram), 0))
    valid = [i for i in range(n) if norms[i] > tol]
    scale = norms.sum() / n
    coefficients = np.zeros(n, dtype=np.float64)
    if not valid:
        return coefficients
    idx = np.array(valid)
    units = gram[idx][:, idx] / np.outer(norms[idx], norms[idx])
    alpha = np.full(len(valid), 1.0 / len(valid))

    def norm(c: np.ndarray) -> float:
        return np.sqrt(max(c @ units @ c, 0.0))

    mean = alpha.copy()
    mean_norm = norm(mean)
    mean = np.eye(len(valid))[0] if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        dots = np.clip(units @ mean, -1.0, 1.0)
        tangent = np.zeros_like(mean)
        for i in range(len(valid)):
            theta = arccos(dots[i])
            if theta < tol:
                continue
            step = -dots[i] * mean
            step[i] += 1.0
            tangent += alpha[i] * theta / np.sin(theta) * step
        tangent_norm = norm(tangent)
        if tangent_norm < tol:
            break
        mean = np.cos(tangent_norm) * mean + np.sin(tangent_norm) * tangent / tangent_norm
        unit_norm = norm(mean)
        if unit_norm > tol:
            mean = mean / unit_norm
    coefficients[idx] = mean / norms[idx] * scale
    return coefficients


def model_stock_t(gram: np.ndarray) -> np.ndarray:
    """t (…) from Gram matrices (…, N, N), as ``stock.model_stock_t``."""
    n = gram.shape[-1]
    if n < 2:
        raise ValueError(f"model_stock needs at least 2 models besides the base, got {n}.")
    norms = np.sqrt(np.maximum(np.diagonal(gram, axis1=-2, axis2=-1), 0))
    cosines = [
        np.clip(gram[..., i, j] / np.maximum(norms[..., i] * norms[..., j], 1e-6), -1.0, 1.0)
        for i in range(n)
        for j in range(i + 1, n)
    ]
    cos = np.mean(np.stack(cosines), axis=0)
    denominator = 1 + (n - 1) * cos
    singular = np.abs(denominator) < 1e-6
    safe = np.where(singular, 1.0, denominator)
    return np.where(singular, 0.0, n * cos / safe)
