"""Tolerances from float32 arithmetic, so that a comparison holds on any CPU or device.

Two float32 computations of one sum that add its terms in different orders (other BLAS kernels, other
blockings, other thread counts, FMA or not) each lie within `gamma(n) * sum |terms|` of the exact sum
(Higham, Accuracy and Stability of Numerical Algorithms, eq. 3.5), so they differ by at most twice that.
"""

from __future__ import annotations

from torch import nn

UNIT_ROUNDOFF = 2.0**-24
"""float32: half the distance from 1 to the next float32."""


def gamma(terms: int) -> float:
    """Relative bound on float32 accumulation of `terms` terms in any order: n u / (1 - n u)."""
    return terms * UNIT_ROUNDOFF / (1 - terms * UNIT_ROUNDOFF)


CONFIDENCE = 8.0
"""lambda of the probabilistic bound: it fails with probability below 2 exp(-lambda^2 / 2) ~ 3e-14."""


def probable(terms: int) -> float:
    """Relative bound on float32 accumulation of `terms` terms that holds with overwhelming probability
    (Higham and Mary, "A new approach to probabilistic rounding error analysis", SISC 2019, thm 2.4):
    lambda sqrt(n) u. For sums whose terms and order are not known exactly, where `gamma`'s worst case
    is far above any real difference."""
    return CONFIDENCE * terms**0.5 * UNIT_ROUNDOFF


BFLOAT16_ROUNDOFF = 2.0**-8
"""bfloat16 (8 significant bits): the relative error of rounding one value to it."""


def float32_bound(unet: nn.Module, resolution: int) -> float:
    """Normwise bound between two float32 evaluations of one gradient in other summation orders
    (other batch sizes, kernels, threads): through `layers` reductions of at most `terms` (pixels x
    fan-in) terms each, both within `probable(terms)` per reduction of the exact values."""
    layers = sum(1 for m in unet.modules() if any(True for _ in m.parameters(recurse=False)))
    fan_in = max(p[0].numel() for p in unet.parameters() if p.ndim > 1)
    return 2 * layers * probable(resolution * resolution * fan_in)


FLOAT16_ROUNDOFF = 2.0**-11
"""float16 (11 significant bits): the relative error of rounding one value to it, as a store's rows are."""


def cuda_float32_bound(unet: nn.Module, resolution: int) -> float:
    """Normwise bound between a gradient computed on CUDA and on the CPU, both float32 (the engine turns
    TF32 off): the same arithmetic in other summation orders (cuDNN's and cuBLAS's blockings, split
    reductions), so `float32_bound`."""
    return float32_bound(unet, resolution)


def cuda_float16_bound(unet: nn.Module, resolution: int) -> float:
    """Normwise bound between float16 rows stored from CUDA and from the CPU: `cuda_float32_bound` plus
    one rounding to float16 on each side (each within `FLOAT16_ROUNDOFF` of its float32 row's norm)."""
    return cuda_float32_bound(unet, resolution) + 2 * FLOAT16_ROUNDOFF
