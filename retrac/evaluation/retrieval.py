"""Does an attribution find what it should? Retrieval and stability metrics, and near-duplicates.

Shapes as in `retrac.evaluation.metrics`: a score matrix is `(Q, N)`, higher more supportive.

- `full_scores`: every (query, training sample) score of one estimator and any methods, from rows and
  query vectors (trak and dtrak preconditioned by the kernel of the rows given).
- `hit_rate`: share of queries whose own training sample ranks in the top k (`metrics.self_ranks`).
- `top_k_overlap`, `mean_spearman`: how far two score matrices of the same queries agree (two
  indexes built with other seeds, or two query seeds).
- `shifted`, `jpeg_reencoded`, `noised`: near-duplicates of images in [-1, 1], the queries of a
  near-duplicate retrieval test.
- `nearest_training`: each image's nearest training image in pixel space, to call a generated image
  a copy of it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from scipy import stats

from api_schemas import KernelSpec, Method
from retrac.evaluation.metrics import _matrix, self_ranks, top_k
from retrac.exceptions import EvaluationError
from retrac.kernels import build_kernel
from retrac.methods import needs_kernel
from retrac.query_side import QueryVectors
from retrac.scoring import METHODS, RowChunk, contributions


def full_scores(
    chunks: Sequence[RowChunk],
    queries: Sequence[QueryVectors],
    weights: Sequence[float],
    matched: slice | None = None,
    methods: Sequence[Method] = METHODS,
    kernel: KernelSpec | None = None,
) -> dict[Method, np.ndarray]:
    """Score matrices `(Q, N)` per method of every training row of `chunks` (one per checkpoint), by
    the paper's estimator (`matched` None) or the matched one over grid slots `matched`.

    trak and dtrak precondition the queries by the kernel (of spec `kernel`) of the rows given, so an
    evaluation that scores a subset of the stored slots gets the kernel of that subset, as an index of
    those slots alone would build it."""
    if needs_kernel(methods):
        if kernel is None:
            raise EvaluationError(f"methods {list(methods)} need a kernel spec")
        queries = [
            q.preconditioned_by(build_kernel([c], c.projected.shape[-1], kernel))
            for q, c in zip(queries, chunks, strict=True)
        ]
    table = contributions(chunks, queries, weights, methods, matched)
    return {method: table[method].sum(dim=-1).T.numpy() for method in methods}


def hit_rate(scores: np.ndarray, own: Sequence[int], k: int) -> float:
    """Share of queries whose training sample `own[q]` ranks in the top `k` of its scores (a tie
    with a higher-placed sample does not count against it: `metrics.self_ranks`)."""
    if k < 1:
        raise EvaluationError(f"k must be at least 1, got {k}")
    return float((self_ranks(scores, own) <= k).mean())


def top_k_overlap(first: np.ndarray, second: np.ndarray, k: int) -> float:
    """Mean over queries of |top-k of `first` & top-k of `second`| / k: 1 when the same k come back."""
    a, b = _pair(first, second)
    tops = zip(top_k(a, k).tolist(), top_k(b, k).tolist(), strict=True)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in tops]))


def mean_spearman(first: np.ndarray, second: np.ndarray) -> float:
    """Mean over queries of the Spearman correlation of their scores over all training samples."""
    a, b = _pair(first, second)
    if a.shape[1] < 2:
        raise EvaluationError("Spearman correlation needs at least two training samples")
    return float(np.mean([stats.spearmanr(x, y).statistic for x, y in zip(a, b, strict=True)]))


def shifted(images: torch.Tensor, pixels: int = 1) -> torch.Tensor:
    """`images` `(B, C, H, W)` moved `pixels` to the right, the left edge column repeated."""
    if not 0 < pixels < images.shape[-1]:
        raise EvaluationError(f"a shift must lie in 1..{images.shape[-1] - 1} pixels, got {pixels}")
    edge = images[..., :1].expand(*images.shape[:-1], pixels)
    return torch.cat([edge, images[..., :-pixels]], dim=-1)


def jpeg_reencoded(images: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """`images` `(B, C, H, W)` in [-1, 1] saved as 8-bit JPEG files at `quality` and decoded again."""
    out = []
    for image in images:
        pixels = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(
            buffer, "JPEG", quality=quality
        )
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())), dtype=np.float32).reshape(
            pixels.shape
        )
        out.append(torch.from_numpy(decoded).permute(2, 0, 1) / 127.5 - 1)
    return torch.stack(out)


def noised(images: torch.Tensor, std: float = 0.02, seed: int = 0) -> torch.Tensor:
    """`images` in [-1, 1] plus Gaussian noise of `std` on the [0, 1] pixel scale (2 std in [-1, 1]),
    clipped back to [-1, 1]; the noise from a CPU generator seeded with `seed`."""
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator, dtype=torch.float32)
    return (images + 2 * std * noise).clamp(-1, 1)


def nearest_training(images: torch.Tensor, training: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(position `(B,)`, RMS distance `(B,)` on the [0, 1] pixel scale) of each image's nearest
    training image; images and training images `(*, C, H, W)` in [-1, 1]."""
    if images.shape[1:] != training.shape[1:] or not len(training):
        raise EvaluationError(
            f"images {tuple(images.shape)} and training images {tuple(training.shape)} differ in shape"
        )
    distances = torch.cdist(images.flatten(1).double(), training.flatten(1).double())  # L2 in [-1, 1]
    best = distances.min(dim=1)
    rms = best.values / 2 / images[0].numel() ** 0.5
    return best.indices.numpy(), rms.numpy()


def _pair(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = _matrix(first, "first scores"), _matrix(second, "second scores")
    if a.shape != b.shape:
        raise EvaluationError(
            f"score matrices of the same queries and samples differ in shape: {a.shape}, {b.shape}"
        )
    return a, b
