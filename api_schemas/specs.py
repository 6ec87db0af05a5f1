"""Specs shared by the engine, the store, the worker, the service and the CLI.

Every spec is a frozen pydantic model that round-trips through JSON, so a spec saved in a store's
attributes or sent over HTTP rebuilds the same object. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from api_schemas.errors import FieldError

LossKind = Literal["mse", "l1"]
"""Per-pixel distance of the noise-prediction loss: squared error (DDPM "simple") or absolute error."""

LossWeighting = Literal["none", "snr"]
"""Per-sample weight of the loss: none, or the signal-to-noise ratio `alpha_bar_t / (1 - alpha_bar_t)` of
its timestep, as diffusers' `train_unconditional.py` weighs the MSE of sample-prediction models."""

PredictionType = Literal["epsilon", "v_prediction", "sample"]
"""What the UNet predicts (diffusers' `prediction_type`): the noise, the velocity, or the clean image."""

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2", "cosine_clipped"]
"""diffusers' named beta schedules, for runs of `retrac train`; `cosine_clipped` is the paper's: cosine
betas clipped to [1e-4, 0.02], saved as the scheduler's trained betas."""

ProjectorKind = Literal["identity", "sketch", "dense"]
"""Random projection applied to every gradient: exact, sparse sign sketch, or dense Gaussian."""

StoreDType = Literal["float16", "bfloat16", "float32"]
"""Precision of the stored projected gradients. float16 (the default): half the bytes of float32, scores
converted exactly to float32 products. bfloat16: the same bytes with float32's range, scanned by the CPU's
bf16 matmul (its scores are rounded to bfloat16, ~3e-3 of the largest score: docs/architecture.md).
float32: the reference, twice the bytes."""
Method = Literal["tracin", "retrac", "trak", "dtrak"]
"""Scores a query ranks by (docs/methods.md): Diffusion-TracIn and -ReTrac (method.md section 4), TRAK
over loss rows and D-TRAK over output-norm rows (method.md section 6b: preconditioned by the kernel)."""

OutputFunction = Literal["loss", "output-norm"]
"""The function whose gradients an index holds: the training loss (TracIn, ReTrac, TRAK), or D-TRAK's
`mean_pixels ||f_theta(x_t, t)||^2` of the model output f (the predicted noise of an epsilon model, the
predicted velocity or clean image of a v- or sample-prediction one), unweighted."""
Search = Literal["exact", "approximate"]
"""How a query finds its top-k: a scan of every stored row (the reference), or the candidates of the
store's approximate maximum-inner-product index, rescored exactly (`storage.ann`)."""

SlotNoise = Literal["independent", "shared"]
"""Noise of grid slots: one seed of its own per slot (the paper's), or the query's own draws (common
random numbers: grid slot t gets the M noise images a query with the slot seed draws at t)."""

Estimator = Literal["paper", "matched"]
"""How training slots meet the query: the paper's (mean over slots . mean over timesteps), or matched
(each shared-noise grid slot . the query's vector at its own timestep, averaged over timesteps)."""


DEFAULT_TOP_K = 10
"""Proponents and opponents per method a query returns unless told: the CLI, the API and the page."""
DEFAULT_TIMESTEPS = 50
"""K, the query's timestep grid, unless told (the paper's query-side setting)."""
DEFAULT_DRAWS = 4
"""M, noise draws per query timestep, unless told."""
MAX_PROMPT_LENGTH = 2000
"""Longest prompt a query may give, in characters (a tokenizer cuts it to its padded length anyway)."""
MAX_LABEL_LENGTH = 255
"""Longest class name a query's label may give (a folder name's limit on common file systems)."""


MAX_PATH_LENGTH = 4096
"""Longest path (or URL) a spec may give, in characters: Linux's PATH_MAX."""
MAX_NAME_LENGTH = 255
"""Longest part of a path between '/'s: the file-name limit of common file systems."""


def _path_parts(value: str) -> str:
    """A path whose parts each fit a file name: a longer one cannot name a file, and must be refused
    here rather than fail deep in the file system."""
    if any(len(part) > MAX_NAME_LENGTH for part in value.split("/")):
        raise ValueError(f"a part of a path has at most {MAX_NAME_LENGTH} characters (between '/'s)")
    return value


PathText = Annotated[str, StringConstraints(max_length=MAX_PATH_LENGTH), AfterValidator(_path_parts)]
"""A file, folder or URL a spec names: at most `MAX_PATH_LENGTH` characters, `MAX_NAME_LENGTH` a part."""


class Spec(BaseModel):
    """Base of all specs: immutable, no unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class DatasetSpec(Spec):
    """Where the training images come from and the shape they are brought to.

    `source` is a built-in name (`builtin:digits`, `builtin:faces`, `builtin:patches`,
    `builtin:outliers`), an image folder, or a `.npy`/`.npz` file.
    """

    source: PathText = Field(description="built-in name, image folder, or .npy/.npz file")
    resolution: int = Field(16, ge=4, le=1024, description="side of the square images, in pixels")
    channels: Literal[1, 3] = Field(1, description="1 (grey) or 3 (RGB)")
    limit: int | None = Field(None, ge=1, description="keep only the first `limit` samples")
    seed: int = Field(0, description="seed of any random choice the source makes (patches, mixtures)")
    caption_column: str = Field(
        "text", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
        description="the column of an image folder's metadata.jsonl that holds each image's caption "
        "(text-conditional models; Hugging Face imagefolder's default is text)",
    )


class ProjectorSpec(Spec):
    """A random projection, fully determined by (kind, dim, seed)."""

    kind: ProjectorKind = "sketch"
    dim: int = Field(4096, ge=1, le=1 << 20, description="projected dimension k (ignored by identity)")
    seed: int = Field(0, ge=0, description="seed of the projection; checkpoint c uses a seed derived from it")


class SlotSpec(Spec):
    """Which (timestep, noise seed) slots each training sample gets at each checkpoint.

    `replay` adds one slot replaying the sample's recorded training step; `grid` adds
    `floor(linspace(1, T-1, grid))`; `random` adds that many timesteps drawn from `seed`.
    Grid and random slots get noise seeds drawn from `seed` too, unless `noise` is `shared`: then
    grid slot t is the mean gradient over the `draws` noise images that a query with K = grid,
    M = draws and seed `seed` draws at t, which the `matched` estimator needs.
    """

    replay: bool = True
    grid: int = Field(0, ge=0, le=1000)
    random: int = Field(0, ge=0, le=1000)
    seed: int = 0
    noise: SlotNoise = Field(
        "independent", description="grid slots' noise: their own seeds, or the query's draws"
    )
    draws: int = Field(
        1, ge=1, le=256, description="M of shared-noise grid slots (noise images averaged per slot)"
    )

    @model_validator(mode="after")
    def _at_least_one(self) -> SlotSpec:
        if not self.replay and self.grid == 0 and self.random == 0:
            raise FieldError("a slot spec needs replay, grid > 0 or random > 0", "replay", "grid", "random")
        if self.noise == "shared" and self.grid == 0:
            raise FieldError("shared slot noise applies to grid slots; give grid > 0", "noise", "grid")
        if self.noise == "independent" and self.draws != 1:
            raise FieldError(
                "draws > 1 needs shared slot noise (independent slots use one noise image each)",
                "draws",
                "noise",
            )
        return self

    @property
    def kinds(self) -> list[str]:
        """What each slot is, in slot order: the replayed step first, then grid, then random slots."""
        return ["replay"] * int(self.replay) + ["grid"] * self.grid + ["random"] * self.random


class KernelSpec(Spec):
    """The TRAK kernel of each checkpoint, `F = Phi^T Phi + lambda I` over the stored rows' slot means,
    with `lambda = ridge * trace(Phi^T Phi) / k` (a fraction of the mean eigenvalue of `Phi^T Phi`)."""

    ridge: float = Field(0.1, gt=0, le=1e6, description="lambda as a fraction of trace(Phi^T Phi) / k")


DEFAULT_SLOTS = SlotSpec(replay=True, grid=8, noise="shared", draws=1, seed=0)
"""The slots `retrac index create` builds unless told: the replayed step plus K = 8 shared-noise grid
slots of one draw each, which every method's matched estimator needs. Chosen by the quality-per-byte
curve (docs/experiment.md: LDS and self-retrieval level off at K = 8 for every method and estimator).
The paper's own slots (the replayed step alone) are `SlotSpec()`, `retrac index create --preset paper`."""
PAPER_SLOTS = SlotSpec()
"""The paper's training side: the replayed step alone."""
DEFAULT_KERNEL = KernelSpec()
"""The kernel `retrac index create` builds unless told (`--no-kernel`, `--preset paper`): trak, which it
serves, ranked best on the standard preset (docs/experiment.md: LDS 0.184 validation, 0.131 generated,
against 0.142 and 0.035 for retrac). It costs k x k float64 per checkpoint (134 MB at k = 4,096),
whatever N: a tenth of the rows' bytes from N = 20,000 at the default slots."""
DEFAULT_ESTIMATOR: Estimator = "matched"
"""The estimator `retrac attribute` uses unless told, where the store can serve it (`default_estimator`;
docs/experiment.md: above the paper's for every method at every K >= 4 on the LDS curve);
`--estimator paper` is Diffusion-TracIn and -ReTrac as the paper defines them, exactly."""


def default_estimator(slots: SlotSpec, search: Search, knobs_given: bool) -> Estimator:
    """`DEFAULT_ESTIMATOR` for a store with shared-noise grid slots, an exact search and no K, M or seed
    of the user's (the matched estimator takes the store's); else the paper's, which any store serves.
    The answer names the estimator that ran."""
    if slots.noise == "shared" and search == "exact" and not knobs_given:
        return DEFAULT_ESTIMATOR
    return "paper"


class CheckpointSpec(Spec):
    """One checkpoint: a diffusers UNet folder (or, with an index's `base`, a LoRA adapter folder), the
    epoch it was saved after, and its TracIn weight."""

    path: PathText
    epoch: int | None = Field(None, ge=0, description="epoch after which it was saved (needed for replay)")
    weight: float | None = Field(None, description="explicit w_c; default lr*B*(e_c - e_{c-1})/N")
    lr: float | None = Field(
        None, gt=0, description="learning rate of the epochs before it; default: the run's"
    )


class QuerySpec(Spec):
    """Query-side estimator of method.md section 3: K timesteps, M noise draws each, one seed, and
    how the query meets the training slots (`estimator`, method.md section 4)."""

    timesteps: int = Field(DEFAULT_TIMESTEPS, ge=1, le=1000, description="K, the size of the timestep grid")
    draws: int = Field(DEFAULT_DRAWS, ge=1, le=256, description="M, noise draws per timestep")
    seed: int = Field(0, ge=0, description="seed of the query's noise draws")
    estimator: Estimator = Field(
        "paper",
        description="paper: mean over slots . mean over timesteps; matched: per timestep against the "
        "index's shared-noise grid slots (K, M and seed then default to the index's)",
    )
    search: Search = Field(
        "exact", description="exact: scan every row; approximate: rescore the ANN index's candidates"
    )
    label: int | str | None = Field(
        None,
        description="the class the query images are attributed under, for a class-conditional index (its "
        "class name, or the class's integer): required there, refused by an unconditional index",
    )

    prompt: str | None = Field(
        None, max_length=MAX_PROMPT_LENGTH,
        description="the text the query images are attributed under, for a text-conditional index: required "
        "there (give \"\" for the empty prompt, classifier-free guidance's unconditional one), refused by "
        "an index of another model",
    )

    @field_validator("label")
    @classmethod
    def _short_label(cls, value: int | str | None) -> int | str | None:
        return check_label(value)


def check_label(value: int | str | None) -> int | str | None:
    """A query's label as given, if it can name a class: a short name or an integer >= 0."""
    if isinstance(value, str) and not 1 <= len(value) <= MAX_LABEL_LENGTH:
        raise ValueError(f"a label is 1 to {MAX_LABEL_LENGTH} characters")
    if isinstance(value, int) and value < 0:
        raise ValueError("a label's integer is at least 0")
    return value


class TrainSpec(Spec):
    """A DDPM training run that records what attribution needs (timestep and noise seed per step)."""

    dataset: DatasetSpec
    preset: str = Field("tiny", max_length=64, description="UNet size preset: micro, tiny or small")
    loss: LossKind = "mse"
    epochs: int = Field(10, ge=1, le=100_000)
    batch_size: int = Field(32, ge=1, le=65_536)
    lr: float = Field(1e-3, gt=0)
    save_every: int = Field(5, ge=1, description="save a checkpoint every this many epochs (and the last)")
    seed: int = Field(0, ge=0)
    num_timesteps: int = Field(1000, ge=2, le=100_000, description="T of the DDPM schedule")
    beta_schedule: BetaSchedule = Field("linear", description="diffusers' beta schedule of the DDPMScheduler")
    prediction_type: PredictionType = Field("epsilon", description="what the UNet learns to predict")
    loss_weighting: LossWeighting = Field("none", description="per-sample weight of the loss: none or snr")
    class_conditional: bool = Field(
        False,
        description="train a class-conditional UNet (num_class_embeds = largest class label + 1) on the "
        "dataset's class labels (class subfolders, .npz labels, the digit of builtin:digits)",
    )


ParameterPattern = Annotated[str, Field(min_length=1, max_length=300)]
"""An fnmatch pattern over parameter names (`IndexSpec.parameters`)."""


class IndexSpec(Spec):
    """Everything that determines the contents of a gradient index (and so of its store).

    Either `run` names a training run of `retrac train` (its checkpoints, replay record, schedule
    and loss are used unless given here), or `checkpoints` and `loss` are given explicitly for a
    model trained elsewhere (then `slots.replay` must be off).
    """

    dataset: DatasetSpec
    run: PathText | None = Field(
        None, description="training run folder (manifest, replay record, checkpoints)"
    )
    checkpoints: tuple[CheckpointSpec, ...] = ()
    base: PathText | None = Field(
        None,
        description="the base model (a diffusers pipeline folder, or its unet/ or transformer/) the "
        "checkpoints' LoRA adapters apply to: each checkpoint is then an adapter folder in peft's or "
        "diffusers' format, and gradients are over the adapter's parameters alone, the base frozen; "
        "none: the checkpoints are full models",
    )
    parameters: tuple[ParameterPattern, ...] = Field(
        (),
        max_length=64,
        description="fnmatch patterns over the model's named_parameters() names (e.g. *attn2*): gradients "
        "over the matching parameters only; none: every trainable parameter",
    )
    scheduler: PathText | None = Field(
        None,
        description="folder with scheduler_config.json; default: the run's, or the one beside the checkpoint",
    )
    vae: PathText | None = Field(
        None,
        description="folder of the AutoencoderKL of a latent model; default: the vae/ of the checkpoint's "
        "pipeline folder, none for a pixel-space model",
    )
    loss: LossKind | None = Field(None, description="the loss the model was trained with; default: the run's")
    loss_weighting: LossWeighting | None = Field(
        None,
        description="the loss weighting the model was trained with (none or snr); default: the run's, or "
        "none (a sample-prediction model without a run must declare it)",
    )
    train_batch_size: int | None = Field(
        None, ge=1, description="training batch size B, for weights from epoch and lr without a run"
    )
    slots: SlotSpec = SlotSpec()
    projector: ProjectorSpec = ProjectorSpec()
    output_function: OutputFunction = Field(
        "loss", description="the function differentiated on both sides: loss, or output-norm (D-TRAK's)"
    )
    kernel: KernelSpec | None = Field(
        None, description="build the TRAK kernel of each checkpoint (methods trak and dtrak); none: no kernel"
    )
    dtype: StoreDType = "float16"
    batch_size: int = Field(32, ge=1, le=4096, description="samples per gradient batch")
    shard_size: int = Field(256, ge=1, le=1 << 20, description="rows per task, chunk and done mark")

    def map_paths(self, model_path: Callable[[str], str], data_path: Callable[[str], str]) -> IndexSpec:
        """This spec with `model_path` applied to the run, scheduler, VAE and checkpoint paths and
        `data_path` to a file or folder dataset source (built-in names are not paths)."""
        source = self.dataset.source
        return self.model_copy(
            update={
                "dataset": self.dataset.model_copy(
                    update={"source": source if source.startswith("builtin:") else data_path(source)}
                ),
                "run": self.run and model_path(self.run),
                "base": self.base and model_path(self.base),
                "scheduler": self.scheduler and model_path(self.scheduler),
                "vae": self.vae and model_path(self.vae),
                "checkpoints": tuple(
                    c.model_copy(update={"path": model_path(c.path)}) for c in self.checkpoints
                ),
            }
        )

    @model_validator(mode="after")
    def _has_checkpoints(self) -> IndexSpec:
        if self.run is None and not self.checkpoints:
            raise FieldError("an index needs a training run or at least one checkpoint", "run", "checkpoints")
        if self.run is None and self.loss is None:
            raise FieldError("without a training run, give the loss the model was trained with", "loss")
        if self.run is None and self.slots.replay:
            raise FieldError(
                "replay slots need a training run with a replay record; use grid or random slots",
                "slots.replay",
            )
        return self
