"""Per-sample loss gradients of a diffusion model, projected, with their exact norms.

A "sample" here is a group: one clean image, one timestep and G noise images; its gradient is that
of the mean loss over the G noised copies. Training-side gradients use G = 1 (one replayed or slot
noise); the query side uses G = M draws, which gives `h(q, t)` of method.md directly.

`GradientComputer` computes a batch of them at once, with no Python loop over samples, by one of
two strategies, picked per model:

- layer-wise (every diffusers `UNet2DModel` and DiT): one ordinary batched forward that records each
  layer's input, one backward to the layer outputs only (no parameter gradients), then each layer's
  per-sample parameter gradients from its input and output gradient (`LAYER_RULES`: Linear,
  Conv2d, GroupNorm, LayerNorm, Embedding: a class-conditional UNet's class embedding, a DiT's label
  table; a DiT's patch embedding is a Conv2d, its attention, MLP and adaLN-Zero layers Linear, its
  norms LayerNorms without parameters). A training step, with per-sample weight gradients in place
  of summed ones.
- vmap: `torch.func.vmap(grad(...))` over the unmodified model. Any model, but slower on a CPU
  (figures below; its batching rules run 1x1 convolutions' weight gradients as per-sample loops).
  Used when a module of another kind holds trainable parameters, or when a recorded layer's input
  or output is modified in place during the forward.

Measured with a k=4096 sketch and norms, one thread, batch 32, CPU time, as a fraction of a plain
training step's rate (`bench/gradients.py`): layer-wise 0.57x (tiny UNet), 0.67x (small); vmap
0.51-0.56x, 0.54x; a 1.4M-parameter DiT (`--presets dit`), layer-wise,
0.52x. Where a layer-wise chunk's time goes, as a fraction of the plain step's (tiny;
small): forward 0.41; 0.35, backward to the layer outputs 0.40; 0.37, layer rules 0.72; 0.85 (Conv2d
0.61; 0.78: a per-sample weight gradient is many small matrix products where the plain step runs
one large one, 2.6x (tiny) and 1.6x (small) its time), norms 0.06; 0.03, projection 0.21; 0.18. The
forward and backward alone are 0.81x; 0.72x of the plain step and the norms and projection another
0.26x; 0.21x, so even rules as cheap as the plain step's summed weight gradients would leave the tiny
UNet below 0.8x of its rate. Tried on this CPU and left out: torch.compile of the rules (Conv2d
1.0x, GroupNorm 1.07x, Linear 0.74x, a recompile per shape); the conv weight gradient as one
grouped convolution, a per-sample loop, unfold + bmm, shifted views + bmm or channels-last (0.9-1.1x
at best, up to 3x slower on 16x16 maps); GroupNorm's from its statistics without the normalised
input (5x slower eagerly); the sketch by a transposed index_add_ or a sparse matmul (1.4-1.5x
slower than scatter_add_); a TensorSketch of each layer's per-sample outer products, which never
forms the weight gradient (at k = 4,096 on a 64x64x3x3 layer: inner-product error 0.0172 of the
norms' product against the count sketch's 0.0153, but 28x slower: it costs L FFTs of size k per
sample, where forming the gradient costs L * fan-in * fan-out).

Groups of many copies (a query's M draws, past `GROUP_BACKWARD_WORK`) take neither: each group's
gradient is one ordinary backward of its mean loss, cheaper there than any per-sample trick.

The query side (K groups of M copies) against one plain forward and backward of its K*M copies, tiny
UNet, one thread, CPU time, medians on a 2-core machine at load 4-7 (`bench/query_split.py`, phases
timed by the clock, not the profiler; run-to-run spread about +-0.08): K = 50, M = 4, layer-wise,
forward with the records 0.38, backward to the layer outputs 0.38 (the plain step's forward 0.40 and
backward 0.60, of it the weight gradients 0.2-0.25), rules 0.39 (Conv2d 0.32, Linear 0.04, GroupNorm
0.04), norms 0.007, sketch 0.04: 1.12-1.23x in all; K = 10, M = 16: forward 0.41, backward 0.44, rules
0.38, norms 0.003, sketch 0.012, layer-wise 1.25-1.32x, one backward per group 1.09-1.29x (the path
taken: the threshold holds for tiny at both M). The excess over the plain step is the rules: Conv2d's
3x3 weight gradients by vmap's grouped convolution take 1.35-1.5x (M = 4) and 1.2-1.3x (M = 16) of the
plain step's summed ones over the same copies; the forward and backward to the outputs cost what the
plain step's do less its weight gradients, and the norms and the sketch (one scatter_add_ per parameter
tensor over all K rows) together 0.02-0.05. Kept: a 1x1 convolution's rule as one bmm with each group's
copies and positions on the inner dimension (0.7-0.8x of vmap's time, equal to the summed weight
gradient; 0.56x at G = 1, batch 32); GroupNorm's and LayerNorm's `dy * x_hat` in the normalised input's
buffer (0.8x the GroupNorm rules' time). Tried and left out: a 3x3 weight gradient as K * (kh * kw)
bmm's over each group's copies stacked into one zero-padded tall map (shifted views, no copies; 1.65x
vmap's time: the padding's wasted products and small matmuls), as unfold + bmm or einsum (4.5-5.3x), as
a loop of K ordinary weight gradients of M copies (1.17x at M = 4, 0.97x at M = 16), as one grouped
weight gradient in channels-last (1.1-1.2x) or without oneDNN (1.4-2.4x); the whole query in one chunk
rather than chunks of 32 groups (1.29-1.33x of the plain step against 1.14-1.16x) or smaller chunks (8
or 16 groups: 1.24-1.36x); GroupNorm's weight gradient as a batched dot product (bmm, 2.1-2.7x). Not
tried: norms fused with the sketch, which together cost under 0.05 of the plain step. 1.1x on the tiny
UNet is not reached: it needs per-group 3x3 weight gradients as cheap as summed ones.

Either way the gradient comes out one parameter tensor at a time, and is projected and measured
block by block (`Projector.project_blocks`): the `(B, P)` matrix exists only if asked for
(`flat_gradients`). `loop_gradients` is the plain reference (one autograd call per sample) that
tests compare both strategies with.

A conditional model's per-sample inputs (`retrac.conditions.Conditions`: class labels) go along with
the images through every path, so each sample's gradient is taken under its own condition.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.profiler import record_function

from api_schemas import LossKind, LossWeighting
from retrac.conditions import Conditions
from retrac.exceptions import GradientError
from retrac.losses import noised, per_sample_loss
from retrac.models import DiffusionModel
from retrac.projections import IdentityProjector, Projector

PHASES = ("forward", "backward to layer outputs", "layer rule", "norms")
"""Labels (`torch.profiler.record_function`) of a layer-wise chunk's phases; a rule's label adds its
layer type ("layer rule Conv2d"). What a profile of `compute` leaves outside them is the projection
and bookkeeping; `bench/gradients.py` reports the split."""

DEFAULT_CHUNK = 32
"""Samples per batched call. Memory per sample: the activations, plus the gradient of one parameter
tensor at a time (layer-wise) or of all P parameters (vmap, and one backward per group: 2.8 MB for
the tiny UNet). Smaller chunks ran slower per sample on a CPU (tiny UNet: 0.6x the rate at 4, 0.8x
at 8, 16 about equal)."""


GROUP_BACKWARD_WORK = 10_000_000
"""Groups whose copies times the model's trainable parameters reach this take one ordinary backward
of their mean loss each (a plain training step's kernels at batch G) instead of the per-sample
strategy: the query side needs one gradient per (image, timestep) of M draws, no per-sample trick,
and a backward's fixed costs (one kernel call per op) matter less the more work a group holds. As a
fraction of one plain pass over the same K*M copies (CPU time, one thread, before projection), one
backward per group against the layer-wise path took, on the tiny UNet (0.7 M parameters): 1.84x vs
1.28x at M = 4, 1.35x vs 1.25x at M = 8, 1.12-1.16x vs 1.21x at M = 16, 0.99x vs 1.17x at M = 64;
on the small one (4.4 M): 1.16x vs 1.18x at M = 4, 1.05x vs 1.27x at M = 8, 1.01x vs 1.26x at M = 16.
Never for single copies (the training side), where a per-sample strategy is what saves the loop."""


ChunkCallback = Callable[[int], None]
"""Called with the number of samples (groups) a chunk just computed."""


class NonFiniteGradient(GradientError):
    """Sample `sample` (its index in the batch given to `compute`) has a non-finite gradient; `parameter`
    is the first parameter tensor, in flattening order, where it is, computed in `dtype`; `where` names
    the sample for the user."""

    def __init__(self, parameter: str, sample: int, dtype: torch.dtype, weights_finite: bool, where: str = "") -> None:
        self.parameter, self.sample, self.dtype, self.weights_finite = parameter, sample, dtype, weights_finite
        cause = (
            "its weights are finite, so the forward or backward overflows there"
            if weights_finite
            else "the checkpoint's weights hold NaN or infinite values: index a checkpoint saved before they diverged"
        )
        super().__init__(
            f"non-finite gradient of {parameter} for {where or f'sample {sample}'}, computed in "
            f"{str(dtype).removeprefix('torch.')}; {cause}"
        )

    def at(self, sample: int, where: str = "") -> NonFiniteGradient:
        """The same error for the sample at index `sample`, called `where`."""
        return NonFiniteGradient(self.parameter, sample, self.dtype, self.weights_finite, where)


def whole_groups(callback: Callable[[int], None], group_size: int) -> ChunkCallback:
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
) -> torch.Tensor:
    """Mean loss of each of B groups, `(B,)`.

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
    values = per_sample_loss(prediction, clean, steps, flat_noise, model.scheduler, loss, weighting)
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
) -> torch.Tensor:
    """Mean loss of one image `(C, H, W)` at one timestep `()` under one condition (each tensor
    without the batch axis) over G noises `(G, C, H, W)`."""
    batched = Conditions({k: v[None] for k, v in condition.tensors.items()})
    return group_losses(model, loss, params, image[None], timestep[None], noise[None], weighting, batched)[0]


# Layer rules: a layer's per-sample parameter gradients `(B, *shape)` from its inputs and output
# gradients `(B, G, ...)` (G copies per group, whose contributions add up).
LayerRule = Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def _linear(module: nn.Module, inputs: torch.Tensor, out_grads: torch.Tensor) -> dict[str, torch.Tensor]:
    batch = inputs.shape[0]
    x = inputs.reshape(batch, -1, inputs.shape[-1])  # every leading dim but B is summed over
    dy = out_grads.reshape(batch, -1, out_grads.shape[-1])
    return {"weight": torch.bmm(dy.transpose(1, 2), x), "bias": dy.sum(dim=1)}


def _conv2d(module: nn.Module, inputs: torch.Tensor, out_grads: torch.Tensor) -> dict[str, torch.Tensor]:
    """The weight gradient of each group's G copies, batched over groups by vmap (which runs it as
    one grouped convolution). Im2col-and-bmm variants (unfold, or patches cut from channels-last
    inputs) were no faster over the tiny and small UNets. A pointwise convolution is a Linear layer
    over positions: one bmm with each group's copies and positions on the inner dimension, as fast as
    the plain step's summed weight gradient (vmap's grouped convolution took 1.3-1.5x as long)."""
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


def _pointwise(module: nn.Module) -> bool:
    """A 1x1 convolution that reads each input position once: its output is a matmul per position."""
    return (
        module.kernel_size == (1, 1) and module.stride == (1, 1) and module.padding == (0, 0)
        and module.groups == 1
    )


def _group_norm(module: nn.Module, inputs: torch.Tensor, out_grads: torch.Tensor) -> dict[str, torch.Tensor]:
    """The product `dy * x_hat` is formed in the normalised input's own buffer (a fresh tensor): one
    allocation of the layer's activations fewer, 0.8x the rule's time on the tiny UNet's query."""
    normalised = F.group_norm(inputs.flatten(0, 1), module.num_groups, eps=module.eps).view_as(out_grads)
    summed = [1, *range(3, out_grads.dim())]  # copies and positions; keep B and channels
    return {"weight": normalised.mul_(out_grads).sum(dim=summed), "bias": out_grads.sum(dim=summed)}


def _layer_norm(module: nn.Module, inputs: torch.Tensor, out_grads: torch.Tensor) -> dict[str, torch.Tensor]:
    """`y = x_hat * weight + bias` elementwise over the normalised (last) dims, `x_hat` the input
    normalised without affine: each sample's gradients sum `dy * x_hat` and `dy` over its copies and
    every other position, keeping the normalised dims; the product in `x_hat`'s buffer, as for GroupNorm."""
    normalised = F.layer_norm(inputs, module.normalized_shape, eps=module.eps)
    summed = list(range(1, out_grads.dim() - len(module.normalized_shape)))  # copies and positions
    return {"weight": normalised.mul_(out_grads).sum(dim=summed), "bias": out_grads.sum(dim=summed)}


def _embedding(module: nn.Module, inputs: torch.Tensor, out_grads: torch.Tensor) -> dict[str, torch.Tensor]:
    """Row i of the weight gradient is the sum of the output gradients at the positions that looked up
    index i (a class embedding: the rows of the groups' labels), as a one-hot matmul per sample."""
    batch = inputs.shape[0]
    picked = F.one_hot(inputs.reshape(batch, -1), module.num_embeddings).to(out_grads.dtype)
    weight = torch.bmm(picked.transpose(1, 2), out_grads.reshape(batch, -1, out_grads.shape[-1]))
    if module.padding_idx is not None:
        weight[:, module.padding_idx] = 0  # the padding row is never trained
    return {"weight": weight}


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
            module.max_norm is not None or module.scale_grad_by_freq  # renormed rows, frequency-scaled gradients
        )
        if type(module) not in LAYER_RULES or odd_padding or odd_lookup:
            return None
        layers.append((prefix, module))
        covered += own
    return layers if sorted(covered) == sorted(params) else None  # a shared (tied) tensor: vmap


class GradientComputer:
    """Batched per-sample gradients of one model and loss, projected by one projector.

    Shapes: images `(B, C, H, W)`, timesteps `(B,)` int, noise `(B, G, C, H, W)`.
    """

    def __init__(
        self,
        model: DiffusionModel,
        loss: LossKind,
        projector: Projector | None = None,
        chunk: int = DEFAULT_CHUNK,
        *,
        weighting: LossWeighting = "none",
    ) -> None:
        self.model, self.loss, self.weighting, self.chunk = model, loss, weighting, chunk
        self.params = trainable_parameters(model)
        self.num_params = sum(p.numel() for p in self.params.values())
        self.projector = projector or IdentityProjector(self.num_params)
        self.device = next(iter(self.params.values())).device
        starts = torch.tensor([0] + [p.numel() for p in self.params.values()]).cumsum(0).tolist()
        self._starts = dict(zip(self.params, starts))
        self._layers = _rule_layers(model.unet, self.params)

        def one(params: dict[str, torch.Tensor], image, timestep, noise, condition) -> torch.Tensor:
            return group_loss(model, loss, params, image, timestep, noise, weighting, Conditions(condition))

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
        for start in range(0, images.shape[0], self.chunk):
            part = slice(start, start + self.chunk)
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
                    self.model, self.loss, named, images[b], timesteps[b], noise[b], self.weighting, condition
                )
                for block, gradient in zip(blocks.values(), torch.autograd.grad(value, wanted)):
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
                    self.model, self.loss, params, images, timesteps, noise, self.weighting, conditions
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
        for (module, x, _, _), dy in zip(calls, out_grads):
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
) -> torch.Tensor:
    """Reference: unprojected per-sample gradients `(B, P)`, one ordinary autograd call per sample."""
    params = [p for p in model.unet.parameters() if p.requires_grad]
    named = dict(model.unet.named_parameters())
    rows = []
    for b in range(images.shape[0]):
        condition = Conditions({k: v[b] for k, v in conditions.tensors.items()})
        value = group_loss(model, loss, named, images[b], timesteps[b], noise[b], weighting, condition)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)]))
    return torch.stack(rows)


def inverse_norms(norms: torch.Tensor) -> torch.Tensor:
    """`1 / ||g||` as float32, and 0 where `||g|| = 0`: a zero gradient has no direction, so its
    normalised (ReTrac) vector is zero rather than NaN. The one home of this rule."""
    norms = norms.float()
    return torch.where(norms > 0, 1.0 / norms, torch.zeros((), dtype=torch.float32, device=norms.device))
