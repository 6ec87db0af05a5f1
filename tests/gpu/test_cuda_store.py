"""The same store built on CUDA and on the CPU agrees within the derived float32 and float16 bounds,
and a query answered on CUDA ranks as on the CPU. Skipped without a CUDA device."""

from __future__ import annotations

import pytest
import torch
import zarr

from api_schemas import QuerySpec
from retrac.computers import GradientComputerCache
from retrac.query_side import query_vectors
from retrac.replay import TrainingRun
from storage import GradientStore, attribute, run_pending
from tests.storage.helpers import tiny_index_spec
from tests.tolerances import cuda_float16_bound, cuda_float32_bound, float32_bound, gamma

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

QUERY = QuerySpec(timesteps=6, draws=2, seed=4)
BOUNDS = {"float32": cuda_float32_bound, "float16": cuda_float16_bound}


@pytest.fixture(scope="module")
def stores(
    tiny_run: TrainingRun, tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str], GradientStore]:
    """`tiny_index_spec` in float32 and float16, each filled on the CPU and on CUDA."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("devices")
    out = {}
    for device in ("cpu", "cuda"):
        models = GradientComputerCache(device, threads=1)
        for dtype in BOUNDS:
            path = folder / f"{device}-{dtype}.zarr"
            out[device, dtype] = GradientStore.create(path, tiny_index_spec(tiny_run, dtype=dtype))
            run_pending(out[device, dtype], models)
    return out


def stored(store: GradientStore, checkpoint: int, name: str) -> torch.Tensor:
    group = zarr.open_group(store.path, mode="r")
    return torch.from_numpy(group[f"checkpoints/{checkpoint}/{name}"][:]).float()


def bound_args(store: GradientStore) -> tuple[torch.nn.Module, int]:
    return store.plan.load_model(0).unet, store.plan.inputs.shape[-1]


@pytest.mark.parametrize("dtype", list(BOUNDS))
def test_cuda_rows_agree_with_cpu_rows(stores: dict[tuple[str, str], GradientStore], dtype: str) -> None:
    cpu, cuda = stores["cpu", dtype], stores["cuda", dtype]
    bound = BOUNDS[dtype](*bound_args(cpu))
    for c in range(cpu.num_checkpoints):
        want, got = stored(cpu, c, "projected"), stored(cuda, c, "projected")
        assert not torch.equal(want, torch.zeros_like(want))
        error = (got - want).norm(dim=-1) / want.norm(dim=-1)
        assert float(error.max()) <= bound, (dtype, c)
        cpu_norms, cuda_norms = torch.from_numpy(cpu.norms(c)), torch.from_numpy(cuda.norms(c))
        norm_error = (cuda_norms - cpu_norms).abs() / cpu_norms
        assert float(norm_error.max()) <= float32_bound(*bound_args(cpu)), (dtype, c)


def test_a_query_on_cuda_ranks_as_on_the_cpu(stores: dict[tuple[str, str], GradientStore]) -> None:
    """Every CUDA proponent's CPU score is within the score bound of it, and is among the CPU's top k
    unless k rows beat it by more than twice the bound (|Delta s| <= bound |q| |g| per pair)."""
    cpu_store, cuda_store = stores["cpu", "float32"], stores["cuda", "float32"]
    images = cpu_store.plan.dataset.images[[3, 17]]
    cpu_models = GradientComputerCache("cpu", threads=1)
    everything = attribute(cpu_store, images, QUERY, top_k=cpu_store.num_rows, models=cpu_models)
    on_cuda = attribute(cuda_store, images, QUERY, top_k=5, models=GradientComputerCache("cuda", threads=1))
    k = cpu_store.spec.projector.dim
    scale = 0.0
    for c, weight in enumerate(cpu_store.weights):
        vectors = query_vectors(cpu_models.computer(cpu_store.plan, c), images, QUERY).tracin
        rows = stored(cpu_store, c, "projected")
        scale += abs(weight) * float(vectors.norm(dim=1).max()) * float(rows.norm(dim=-1).max())
    tolerance = (2 * cuda_float32_bound(*bound_args(cpu_store)) + 2 * gamma(k)) * scale
    for got, want in zip(on_cuda.results, everything.results, strict=True):
        cpu_scores = {i.sample_id: i.score for i in want.methods["tracin"].proponents}
        kth = sorted(cpu_scores.values(), reverse=True)[4]
        for item in got.methods["tracin"].proponents:
            assert abs(item.score - cpu_scores[item.sample_id]) <= tolerance
            assert cpu_scores[item.sample_id] >= kth - 2 * tolerance
