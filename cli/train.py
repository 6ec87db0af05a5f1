"""`retrac train`: train a DDPM that records its replay, with a progress bar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias

import typer
from tqdm import tqdm

from api_schemas import BetaSchedule, LossKind, LossWeighting, PredictionType, TrainSpec
from cli.common import Channels, DataSeed, Limit, Resolution, data_option, shown, typed_flags
from cli.specs import TRAIN_FLAGS, train_spec
from retrac.datasets import load_dataset
from retrac.exceptions import SpecError
from retrac.models import PRESETS
from retrac.training import RECIPES, train

if TYPE_CHECKING:  # the choices are known at run time only
    PresetName: TypeAlias = str
    RecipeName: TypeAlias = str
else:
    PresetName = Literal[tuple(sorted(PRESETS))]
    """The UNet presets of `retrac.models.PRESETS`, as the flag's choices."""
    RecipeName = Literal[tuple(sorted(RECIPES))]
    """The named settings of `retrac.training.RECIPES`, as the flag's choices."""


def register(app: typer.Typer) -> None:
    app.command(
        "train",
        help="Train a diffusers UNet2DModel + DDPMScheduler; save diffusers checkpoints and a replay record "
        "(every step's timestep and noise seed). Defaults are those of TrainSpec; --config gives a TrainSpec "
        "JSON that typed flags override.",
        short_help="train a DDPM and record every step's timestep and noise seed",
    )(run)


def _config(config: Path | None) -> dict[str, Any]:
    """The fields of a --config file (none without one)."""
    if config is None:
        return {}
    try:
        return dict(json.loads(config.read_text()))
    except (OSError, ValueError) as error:
        raise SpecError(f"--config: cannot read {config} as JSON ({error})") from error


def _flag(field: str, says: str | None = None) -> Any:
    """A flag for TrainSpec `field`: unset unless typed (it overrides --config); TrainSpec's default shown."""
    return typer.Option(help=says, show_default=shown(TrainSpec, field))


def run(
    context: typer.Context,
    out: Annotated[Path, typer.Argument(help="run folder to write (manifest, record, checkpoints)")],
    config: Annotated[Path | None, typer.Option(help="a TrainSpec JSON file")] = None,
    data: Annotated[str | None, data_option("builtin:digits")] = None,
    resolution: Resolution = None,
    channels: Channels = None,
    limit: Limit = None,
    data_seed: DataSeed = None,
    recipe: Annotated[
        RecipeName | None,
        typer.Option(
            help="a named setting under --config and the typed flags: paper = L1 loss, cosine betas clipped "
            "to [1e-4, 0.02], T = 1000 (query it with --timesteps 100 --draws 16)",
            show_default="none: TrainSpec's defaults",
        ),
    ] = None,
    preset: Annotated[PresetName | None, _flag("preset", "UNet size")] = None,
    loss: Annotated[LossKind | None, _flag("loss", "noise-prediction loss")] = None,
    epochs: Annotated[int | None, _flag("epochs", "training epochs")] = None,
    batch_size: Annotated[int | None, _flag("batch_size", "samples per optimiser step")] = None,
    lr: Annotated[float | None, _flag("lr", "learning rate")] = None,
    save_every: Annotated[
        int | None, _flag("save_every", "save a checkpoint every E epochs and after the last")
    ] = None,
    seed: Annotated[int | None, _flag("seed", "seed of the run")] = None,
    timesteps: Annotated[int | None, _flag("num_timesteps", "T of the DDPM schedule")] = None,
    beta_schedule: Annotated[BetaSchedule | None, _flag("beta_schedule", "diffusers' beta schedule")] = None,
    prediction_type: Annotated[
        PredictionType | None, _flag("prediction_type", "what the UNet predicts")
    ] = None,
    loss_weighting: Annotated[
        LossWeighting | None,
        _flag("loss_weighting", "per-sample loss weight: none, or snr = alpha_bar_t / (1 - alpha_bar_t)"),
    ] = None,
    class_conditional: Annotated[
        bool | None,
        typer.Option(
            "--class-conditional/--unconditional",
            help="train a class-conditional UNet on the dataset's class labels (class subfolders, .npz "
            "labels, the digit of builtin:digits)",
            show_default=shown(TrainSpec, "class_conditional"),
        ),
    ] = None,
) -> int:
    setting = RECIPES[recipe] if recipe is not None else None
    base = {**(setting.train if setting else {}), **_config(config)}
    spec = train_spec(typed_flags(context, TRAIN_FLAGS), base)
    loaded = load_dataset(spec.dataset)
    with tqdm(total=spec.epochs, unit="epoch", desc="train") as bar:
        def on_epoch(epoch: int, loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update(1)

        trained = train(spec, loaded, out, on_epoch=on_epoch)
    print(f"{len(trained.checkpoints())} checkpoints and the replay record of {len(loaded)} samples in {out}")
    if setting is not None:
        print(f"query it as the {recipe} recipe does: --timesteps {setting.query.timesteps} "
              f"--draws {setting.query.draws}")
    return 0
