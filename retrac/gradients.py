"""Per-sample loss gradients of a diffusion model, projected, with their exact norms.

A "sample" here is a group: one clean image, one timestep and G noise images; its gradient is that
of the mean loss over the G noised copies. Training-side gradients use G = 1 (one replayed or slot
noise); the query side uses G = M draws, which gives `h(q, t)` of method.md directly.

`GradientComputer` computes a batch of them at once, with no Python loop over samples, by one of
three strategies, picked per model and group size:

- layer-wise (every diffusers `UNet2DModel` and DiT): one batched forward that records each layer's
  input, one backward to the layer outputs only, then each layer's per-sample parameter gradients
  from its input and output gradient (`LAYER_RULES`: Linear, Conv2d, GroupNorm, LayerNorm, Embedding).
- vmap: `torch.func.vmap(grad(...))` over the unmodified model: any model, slower on a CPU. Used when
  a module without a rule holds trainable parameters, or a recorded layer is modified in place.
- one backward per group: groups of many copies (past `GROUP_BACKWARD_WORK`) take an ordinary
  backward of their mean loss each, cheaper there than any per-sample trick.

Either way the gradient comes out one parameter tensor at a time and is projected and measured block
by block (`Projector.project_blocks`): the `(B, P)` matrix exists only if asked for
(`flat_gradients`). `loop_gradients` is the plain reference (one autograd call per sample) that tests
compare every strategy with. A conditional model's per-sample inputs (`retrac.conditions.Conditions`)
go along with the images through every path, so each sample's gradient is under its own condition.

Rates against a plain training step, and what was tried and left out: see
docs/performance.md#per-sample-gradients-training-side and docs/performance.md#query-side-gradients.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.nn.grad
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.profiler import record_function

from api_schemas import LossKind, LossWeighting, OutputFunction
from retrac.budget import (
    ACTIVATION_MARGIN,
    GROUP_TEMPORARIES,
    LAYER_TEMPORARIES,
    RUNTIME_BYTES,
    Footprint,
    activation_bytes,
)
from retrac.conditions import Conditions
from retrac.exceptions import GradientError
from retrac.losses import noised, per_sample_output
from retrac.models import DiffusionModel
from retrac.projections import IdentityProjector, Projector

PHASES = ("forward", "backward to layer outputs", "layer rule", "norms")
"""Labels (`torch.profiler.record_function`) of a layer-wise chunk's phases; a rule's label adds its
layer type ("layer rule Conv2d"). What a profile of `compute` leaves outside them is the projection
and bookkeeping; `bench/gradients.py` reports the split."""

DEFAULT_CHUNK = 32
"""Samples per batched call. Memory per sample: the activations, plus the gradient of one parameter
tensor at a time (layer-wise) or of all P parameters (vmap, and one backward per group: 2.8 MB for
the tiny UNet). Smaller chunks run slower per sample on a CPU (see
docs/performance.md#per-sample-gradients-training-side)."""


GROUP_BACKWARD_WORK = 10_000_000
"""Groups whose copies times the model's trainable parameters reach this take one ordinary backward
of their mean loss each (a plain training step's kernels at batch G) instead of the per-sample
strategy: the query side needs one gradient per (image, timestep) of M draws, no per-sample trick,
and a backward's fixed costs (one kernel call per op) matter less the more work a group holds; the
threshold sits where it overtook the layer-wise path on the tiny and small UNets (see
docs/performance.md#query-side-gradients). Never for single copies (the training side), where a
per-sample strategy is what saves the loop."""


ChunkCallback = Callable[[int], None]
"""Called with the number of samples (groups) a chunk just computed."""


class NonFiniteGradient(GradientError):
    """Sample `sample` (its index in the batch given to `compute`) has a non-finite gradient; `parameter`
    is the first parameter tensor, in flattening order, where it is, computed in `dtype`; `where` names
    the sample for the user."""

    def __init__(
        self, parameter: str, sample: int, dtype: torch.dtype, weights_finite: bool, where: str = ""
    ) -> None:
        self.parameter, self.sample = parameter, sample
        self.dtype, self.weights_finite = dtype, weights_finite
        cause = (
            "its weights are finite, so the forward or backward overflows there"
            if weights_finite
            else "the checkpoint's weights hold NaN or infinite values: "
            "index a checkpoint saved before they diverged"
        )
        super().__init__(
            f"non-finite gradient of {parameter} for {where or f'sample {sample}'}, computed in "
            f"{str(dtype).removeprefix('torch.')}; {cause}"
        )

    def at(self, sample: int, where: str = "") -> NonFiniteGradient:
        """The same error for the sample at index `sample`, called `where`."""
        return NonFiniteGradient(self.parameter, sample, self.dtype, self.weights_finite, where)


def whole_groups(callback: Callable[[int], object], group_size: int) -> ChunkCallback:
    """A chunk callback that calls `callback(n)` with the n groups of `group_size` samples just completed.

    A batch is often laid out as groups of consecutive samples (a row's S slots, a query image's K
    timesteps); progress counts whole groups, so the counts add up to the number of groups.
    """
    done = 0

    def on_chunk(samples: int) -> None:
        nonlocal done
        before, done = done // group_size, done + samples
        if done // group_size > before:
            callback(done // group_size - before)

    return on_chunk


@dataclass(frozen=True)
class GradientBatch:
    """Projected gradients `(B, k)` and exact L2 norms `(B,)` of the unprojected ones, float32."""

    projected: torch.Tensor
    norms: torch.Tensor


def trainable_parameters(model: DiffusionModel) -> dict[str, torch.Tensor]:
    """The parameters gradients are taken over, in a fixed order (the flattening order)."""
    return {name: p.detach() for name, p in model.unet.named_parameters() if p.requires_grad}


def num_parameters(model: DiffusionModel) -> int:
    return sum(p.numel() for p in trainable_parameters(model).values())


def group_losses(
    model: DiffusionModel,
    loss: LossKind,
    params: dict[str, torch.Tensor],
    images: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    weighting: LossWeighting = "none",
    conditions: Conditions = Conditions(),
    output: OutputFunction = "loss",
) -> torch.Tensor:
    """Mean loss (or output norm: `output`, `retrac.losses.per_sample_output`) of each of B groups, `(B,)`.

    Images `(B, C, H, W)`, timesteps `(B,)`, noise `(B, G, C, H, W)`, conditions `(B, ...)` each: group b
    is image b at timestep b under condition b, noised by each of its G noises. One batched forward of
    the B * G noised copies.
    """
    groups, draws = noise.shape[:2]
    steps = timesteps.unsqueeze(1).expand(groups, draws).flatten()
    flat_noise = noise.flatten(0, 1)
    clean = images.unsqueeze(1).expand_as(noise).flatten(0, 1)
    x_t = noised(clean, steps, flat_noise, model.scheduler)
    buffers = dict(model.unet.named_buffers())
    inputs = conditions.repeat_interleave(draws).tensors
    arguments = {"timestep": steps, **inputs}  # by keyword: a Transformer2DModel's second argument is text
    prediction = functional_call(model.unet, (params, buffers), (x_t,), arguments).sample
    values = per_sample_output(prediction, clean, steps, flat_noise, model.scheduler, loss, weighting, output)
    return values.reshape(groups, draws).mean(dim=1)


def group_loss(
    model: DiffusionModel,
    loss: LossKind,
    params: dict[str, torch.Tensor],
    image: torch.Tensor,
    timestep: torch.Tensor,
    noise: torch.Tensor,
    weighting: LossWeighting = "none",
    condition: Conditions = Conditions(),
    output: OutputFunction = "loss",
) -> torch.Tensor:
    """Mean loss (or output norm) of one image `(C, H, W)` at one timestep `()` under one condition (each
    tensor without the batch axis) over G noises `(G, C, H, W)`."""
    batched = Conditions({k: v[None] for k, v in condition.tensors.items()})
    return group_losses(
        model, loss, params, image[None], timestep[None], noise[None], weighting, batched, output
    )[0]


# Layer rules: a layer's per-sample parameter gradients `(B, *shape)` from its inputs and output
# gradients `(B, G, ...)` (G copies per group, whose contributions add up). Each takes the layer type
# it is keyed by in `LAYER_RULES`, hence `Any`.
LayerRule = Callable[[Any, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def _linear(module: nn.Linear, inputs: torch.Tensor, out_grads: torch.Tensor) -> dict[str, torch.Tensor]:
    batch = inputs.shape[0]
    x = inputs.reshape(batch, -1, inputs.shape[-1])  # every leading dim but B is summed over
    dy = out_grads.reshape(batch, -1, out_grads.shape[-1])
    return {"weight": torch.bmm(dy.transpose(1, 2), x), "bias": dy.sum(dim=1)}


def _conv2d(module: nn.Conv2d, inputs: torch.Tensor, out_grads: torch.Tensor) -> dict[str, torch.Tensor]:
    """The weight gradient of each group's G copies, batched over groups by vmap (which runs it as
    one grouped convolution; im2col-and-bmm variants were no faster). A pointwise convolution is a
    Linear layer over positions: one bmm with each group's copies and positions on the inner
    dimension, as fast as the plain step's summed weight gradient (see
    docs/performance.md#query-side-gradients)."""
    if _pointwise(module):
        batch = inputs.shape[0]
        x = inputs.transpose(1, 2).reshape(batch, inputs.shape[2], -1)  # (B, C_in, G * positions)
        dy = out_grads.transpose(1, 2).reshape(batch, out_grads.shape[2], -1)
        weight = torch.bmm(dy, x.transpose(1, 2)).view(batch, *module.weight.shape)
        return {"weight": weight, "bias": dy.sum(dim=2)}

    def weight_gradient(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        return torch.nn.grad.conv2d_weight(
            x, module.weight.shape, dy, module.stride, module.padding, module.dilation, module.groups
        )

    return {"weight": vmap(weight_gradient)(inputs, out_grads), "bias": out_grads.sum(dim=(1, 3, 4))}


def _pointwise(module: nn.Conv2d) -> bool:
    """A 1x1 convolution that reads each input position once: its output is a matmul per position."""
    return (
        module.kernel_size == (1, 1) and module.stride == (1, 1) and module.padding == (0, 0)
        and module.groups == 1
    )


def _group_norm(
    module: nn.GroupNorm, inputs: torch.Tensor, out_grads: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The product `dy * x_hat` is formed in the normalised input's own buffer (a fresh tensor): one
    allocation of the layer's activations fewer (see docs/performance.md#query-side-gradients)."""
    normalised = F.group_norm(inputs.flatten(0, 1), module.num_groups, eps=module.eps).view_as(out_grads)
    summed = [1, *range(3, out_grads.dim())]  # copies and positions; keep B and channels
    return {"weight": normalised.mul_(out_grads).sum(dim=summed), "bias": out_grads.sum(dim=summed)}


def _layer_norm(
    module: nn.LayerNorm, inputs: torch.Tensor, out_grads: torch.Tensor
) -> dict[str, torch.Tensor]:
    """`y = x_hat * weight + bias` elementwise over the normalised (last) dims, `x_hat` the input
    normalised without affine: each sample's gradients sum `dy * x_hat` and `dy` over its copies and
    every other position, keeping the normalised dims; the product in `x_hat`'s buffer, as for GroupNorm."""
    normalised = F.layer_norm(inputs, module.normalized_shape, eps=module.eps)
    summed = list(range(1, out_grads.dim() - len(module.normalized_shape)))  # copies and positions
    return {"weight": normalised.mul_(out_grads).sum(dim=summed), "bias": out_grads.sum(dim=summed)}


def _embedding(
    module: nn.Embedding, inputs: torch.Tensor, out_grads: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Row i of the weight gradient is the sum of the output gradients at the positions that looked up
    index i (a class embedding: the rows of the groups' labels), as a one-hot matmul per sample."""
    batch = inputs.shape[0]
    picked = F.one_hot(inputs.reshape(batch, -1), module.num_embeddings).to(out_grads.dtype)
    weight = torch.bmm(picked.transpose(1, 2), out_grads.reshape(batch, -1, out_grads.shape[-1]))
    if module.padding_idx is not None:
        weight[:, module.padding_idx] = 0  # the padding row is never trained
    return {"weight": weight}


# These five cover every parameterised module of a diffusers UNet2DModel and DiT: a class-conditional
# UNet's class embedding and a DiT's label table are Embeddings, a DiT's patch embedding a Conv2d, its
# attention, MLP and adaLN-Zero layers Linear. A layer-wise pass is a training step with per-sample
# weight gradients in place of summed ones.
LAYER_RULES: dict[type[nn.Module], LayerRule] = {
    nn.Linear: _linear,
    nn.Conv2d: _conv2d,
    nn.GroupNorm: _group_norm,
    nn.LayerNorm: _layer_norm,
    nn.Embedding: _embedding,
}
Layers = list[tuple[str, nn.Module]]
"""(name, module) of each module holding trainable parameters, in `named_modules` order."""
Records = dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]
"""Per layer, (inputs, output gradients) `(B, G, ...)` of each call in one forward."""


def _rule_layers(unet: nn.Module, params: dict[str, torch.Tensor]) -> Layers | None:
    """The modules holding `params`, with their names, if layer rules cover exactly `params`; else None."""
    layers, covered = [], []
    for prefix, module in unet.named_modules():
        own = [f"{prefix}.{name}" for name, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        odd_padding = isinstance(module, nn.Conv2d) and (
            module.padding_mode != "zeros" or isinstance(module.padding, str)
        )
        odd_lookup = isinstance(module, nn.Embedding) and (
            module.max_norm is not None
            or module.scale_grad_by_freq  # renormed rows, frequency-scaled gradients
        )
        if type(module) not in LAYER_RULES or odd_padding or odd_lookup:
            return None
        layers.append((prefix, module))
        covered += own
    return layers if sorted(covered) == sorted(params) else None  # a shared (tied) tensor: vmap


class GradientComputer:
    """Batched per-sample gradients of one model and loss, projected by one projector.

    Shapes: images `(B, C, H, W)`, timesteps `(B,)` int, noise `(B, G, C, H, W)`. With a memory
    `budget` (bytes, `retrac.budget`), each call's batch is the largest that fits it, at most `chunk`.
    """

    def __init__(
        self,
        model: DiffusionModel,
        loss: LossKind,
        projector: Projector | None = None,
        chunk: int = DEFAULT_CHUNK,
        *,
        weighting: LossWeighting = "none",
        output: OutputFunction = "loss",
        budget: int | None = None,
    ) -> None:
        self.model, self.loss, self.weighting, self.chunk = model, loss, weighting, chunk
        self.output, self.budget = output, budget
        self._per_copy: int | None = None
        self.params = trainable_parameters(model)
        self.num_params = sum(p.numel() for p in self.params.values())
        self.projector = projector or IdentityProjector(self.num_params)
        self.device = next(iter(self.params.values())).device
        if self.device.type == "cuda":  # float32 products: TF32's 10-bit ones would err ~1e-3 from the CPU's
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        starts = torch.tensor([0] + [p.numel() for p in self.params.values()]).cumsum(0).tolist()
        self._starts = dict(zip(self.params, starts, strict=False))  # the last start is the end
        self._layers = _rule_layers(model.unet, self.params)

        def one(params: dict[str, torch.Tensor], image, timestep, noise, condition) -> torch.Tensor:
            given = Conditions(condition)
            return group_loss(model, loss, params, image, timestep, noise, weighting, given, output)

        self._batched_grad = vmap(grad(one), in_dims=(None, 0, 0, 0, 0))

    @property
    def strategy(self) -> str:
        """`"layerwise"` or `"vmap"`: how this computer gets per-sample gradients (module docstring)."""
        return "vmap" if self._layers is None else "layerwise"

    def flat_gradients(
        self,
        images: torch.Tensor,
        timesteps: torch.Tensor,
        noise: torch.Tensor,
        conditions: Conditions = Conditions(),
    ) -> torch.Tensor:
        """Unprojected per-sample gradients `(B, P)` for one chunk."""
        blocks = dict(self._gradient_blocks(images, timesteps, noise, conditions))
        return torch.cat([blocks[name].reshape(images.shape[0], -1) for name in self.params], dim=1)

    def compute(
        self,
        images: torch.Tensor,
        timesteps: torch.Tensor,
        noise: torch.Tensor,
        on_chunk: ChunkCallback | None = None,
        conditions: Conditions = Conditions(),
    ) -> GradientBatch:
        """Projected gradients and exact norms for any B, in chunks of `self.chunk`; sample b is
        computed under its condition b (`conditions`, one row per sample; none for an unconditional model).

        `on_chunk(n)` is called after each chunk with its size n, so a long batch can show progress.
        """
        conditions.check(images.shape[0])
        projected, norms = [], []
        chunk = self.batch_size(images, timesteps, noise, conditions)
        for start in range(0, images.shape[0], chunk):
            part = slice(start, start + chunk)
            try:
                chunk_projected, chunk_norms = self._project_chunk(
                    images[part], timesteps[part], noise[part], conditions.select(part)
                )
            except NonFiniteGradient as error:
                raise error.at(start + error.sample) from None
            projected.append(chunk_projected)
            norms.append(chunk_norms)
            if on_chunk is not None:
                on_chunk(chunk_norms.shape[0])
        return GradientBatch(torch.cat(projected).float().detach(), torch.cat(norms).float().detach())

    def batch_size(
        self, images: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor, conditions: Conditions
    ) -> int:
        """Groups per batch `compute` takes for these inputs: `chunk`, or less where the memory budget
        says so; a `MemoryBudgetError` if one group does not fit, before any gradient is computed.

        The weights, projector and per-sample gradients are counted first, so a model whose gradients
        alone exceed the budget is refused without running; then one forward of the first sample's
        first copy counts the activations (once per computer)."""
        if self.budget is None:
            return self.chunk
        draws = noise.shape[1]
        what = f"per-sample gradients of {self.num_params:,} parameters over groups of {draws} copies"
        if self._per_copy is None:
            unmeasured = self.footprint(draws)
            if unmeasured.groups(self.budget, draws) == 0:
                raise unmeasured.refusal(self.budget, draws, what)
            first = conditions.select(slice(0, 1))
            self._per_copy = self._activations(images[:1], timesteps[:1], noise[:1, :1], first)
        footprint = self.footprint(draws)
        groups = footprint.groups(self.budget, draws)
        if groups == 0:
            raise footprint.refusal(self.budget, draws, what)
        return min(self.chunk, groups)

    def footprint(self, draws: int) -> Footprint:
        """The memory footprint (`retrac.budget.Footprint`) of groups of `draws` copies: the gradient as
        the strategy holds it, and the activations the first `batch_size` counted (none before)."""
        per_copy, unet = self._per_copy or 0, self.model.unet
        weights = sum(t.nbytes for t in (*unet.parameters(), *unet.buffers()))
        runtime = RUNTIME_BYTES["cpu" if self.device.type == "cpu" else "cuda"]
        fixed = runtime + weights + self.projector.table_bytes
        row, whole = 4 * self.projector.dim, 4 * self.num_params
        if draws > 1 and draws * self.num_params >= GROUP_BACKWARD_WORK:  # one group's backward at a time
            return Footprint(fixed + whole, whole + row, per_copy, whole_batch_copies=False)
        if self._layers is not None:
            largest = max(p.numel() for p in self.params.values())
            return Footprint(fixed, LAYER_TEMPORARIES * 4 * largest + row, per_copy)
        return Footprint(fixed, GROUP_TEMPORARIES * whole + row, per_copy)

    def _activations(
        self, image: torch.Tensor, timestep: torch.Tensor, noise: torch.Tensor, condition: Conditions
    ) -> int:
        """Bytes one copy's forward keeps for its backward (`retrac.budget.activation_bytes`), with
        the margin."""
        args = (image.to(self.device), timestep.to(self.device), noise.to(self.device))
        params = dict(self.model.unet.named_parameters())

        def forward() -> torch.Tensor:
            return group_losses(
                self.model, self.loss, params, *args, self.weighting, condition.to(self.device), self.output
            )

        layers = [module for _, module in self._layers or []]
        return int(ACTIVATION_MARGIN * activation_bytes(forward, params.values(), layers))

    def _project_chunk(
        self, images: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor, conditions: Conditions
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected gradients and norms of one chunk, one parameter tensor at a time."""
        squares = torch.zeros(images.shape[0], device=self.device)
        block_squares: list[tuple[str, torch.Tensor]] = []

        def measured_blocks() -> Iterator[tuple[int, torch.Tensor]]:
            for name, block in self._gradient_blocks(images, timesteps, noise, conditions):
                flat = block.reshape(block.shape[0], -1)
                with record_function(PHASES[3]):
                    square = torch.linalg.vector_norm(flat, dim=1).square()
                    squares.add_(square)
                    block_squares.append((name, square))
                yield self._starts[name], flat

        projected = self.projector.project_blocks(measured_blocks(), images.shape[0], self.device)
        if not bool(torch.isfinite(squares).all()):  # one check per chunk; the culprit is looked up only then
            raise self._non_finite(block_squares)
        return projected, squares.sqrt()

    def _non_finite(self, block_squares: list[tuple[str, torch.Tensor]]) -> NonFiniteGradient:
        """The error naming the first parameter tensor and sample of a chunk whose gradient is not finite."""
        name, square = next((n, sq) for n, sq in block_squares if not bool(torch.isfinite(sq).all()))
        sample = int(torch.nonzero(~torch.isfinite(square))[0, 0])
        weights_finite = all(bool(torch.isfinite(p).all()) for p in self.model.unet.parameters())
        return NonFiniteGradient(name, sample, self.params[name].dtype, weights_finite)

    def _gradient_blocks(
        self, images: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor, conditions: Conditions
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, per-sample gradient `(B, *shape)`) of each trainable parameter tensor."""
        images, timesteps, noise = images.to(self.device), timesteps.to(self.device), noise.to(self.device)
        conditions = conditions.to(self.device)
        draws = noise.shape[1]
        if draws > 1 and draws * self.num_params >= GROUP_BACKWARD_WORK:
            yield from self._group_backward_blocks(images, timesteps, noise, conditions)
            return
        if self._layers is not None:
            records = self._layer_records(self._layers, images, timesteps, noise, conditions)
            if records is not None:
                yield from _layer_gradients(self._layers, records, images.shape[0])
                return
            self._layers = None  # the model modifies a layer's input or output in place: vmap from now on
        yield from self._batched_grad(self.params, images, timesteps, noise, dict(conditions.tensors)).items()

    def _group_backward_blocks(
        self, images: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor, conditions: Conditions
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, gradient `(B, *shape)`) of each trainable tensor, by one backward per group of its
        mean loss (`GROUP_BACKWARD_WORK`)."""
        named = dict(self.model.unet.named_parameters())
        wanted = [named[name] for name in self.params]
        blocks = {name: p.new_empty(images.shape[0], *p.shape) for name, p in self.params.items()}
        with torch.enable_grad():
            for b in range(images.shape[0]):
                condition = Conditions({k: v[b] for k, v in conditions.tensors.items()})
                value = group_loss(
                    self.model, self.loss, named, images[b], timesteps[b], noise[b], self.weighting,
                    condition, self.output,
                )
                for block, gradient in zip(blocks.values(), torch.autograd.grad(value, wanted), strict=True):
                    block[b] = gradient
        yield from blocks.items()

    def _layer_records(
        self,
        layers: Layers,
        images: torch.Tensor,
        timesteps: torch.Tensor,
        noise: torch.Tensor,
        conditions: Conditions,
    ) -> Records | None:
        """One forward and a backward to the layer outputs; None if a layer's tensors changed in place."""
        calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor, tuple[int, int]]] = []

        def record(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            calls.append((module, args[0], output, (args[0]._version, output._version)))

        handles = [module.register_forward_hook(record) for _, module in layers]
        try:
            with torch.enable_grad(), record_function(PHASES[0]):
                params = dict(self.model.unet.named_parameters())
                total = group_losses(
                    self.model, self.loss, params, images, timesteps, noise, self.weighting, conditions,
                    self.output,
                ).sum()
        finally:
            for handle in handles:
                handle.remove()
        if any((x._version, y._version) != versions for _, x, y, versions in calls):
            return None
        # d total / d (layer output): its rows are per-sample, as groups do not interact in the UNet.
        with record_function(PHASES[1]):
            out_grads = torch.autograd.grad(total, [y for _, _, y, _ in calls], allow_unused=True)
        records: Records = defaultdict(list)
        split = noise.shape[:2]
        for (module, x, _, _), dy in zip(calls, out_grads, strict=True):
            if dy is not None:
                records[module].append((x.detach().unflatten(0, split), dy.unflatten(0, split)))
        return records


def _layer_gradients(layers: Layers, records: Records, batch: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, per-sample gradient `(B, *shape)`) of each trainable tensor, freeing records as it goes."""
    for prefix, module in layers:
        with record_function(f"{PHASES[2]} {type(module).__name__}"):
            results = [LAYER_RULES[type(module)](module, x, dy) for x, dy in records.pop(module, [])]
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                calls = [result[name] for result in results]  # more than one if the layer is reused
                total = sum(calls[1:], calls[0]) if calls else param.new_zeros(batch, *param.shape)
                yield f"{prefix}.{name}", total


def loop_gradients(
    model: DiffusionModel,
    loss: LossKind,
    images: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    weighting: LossWeighting = "none",
    conditions: Conditions = Conditions(),
    output: OutputFunction = "loss",
) -> torch.Tensor:
    """Reference: unprojected per-sample gradients `(B, P)`, one ordinary autograd call per sample."""
    params = [p for p in model.unet.parameters() if p.requires_grad]
    named = dict(model.unet.named_parameters())
    rows = []
    for b in range(images.shape[0]):
        condition = Conditions({k: v[b] for k, v in conditions.tensors.items()})
        value = group_loss(
            model, loss, named, images[b], timesteps[b], noise[b], weighting, condition, output
        )
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)]))
    return torch.stack(rows)


def inverse_norms(norms: torch.Tensor) -> torch.Tensor:
    """`1 / ||g||` as float32, and 0 where `||g|| = 0`: a zero gradient has no direction, so its
    normalised (ReTrac) vector is zero rather than NaN. The one home of this rule."""
    norms = norms.float()
    return torch.where(norms > 0, 1.0 / norms, torch.zeros((), dtype=torch.float32, device=norms.device))
