"""What defines a training run of one stage: `TrainConfig`, and the recipes that fill it in.

A config is written to `model_dir/config.json` before anything else; a rerun resumes only with
the same settings but for `RESUMABLE_CHANGES` (`sr3d.training.checkpoints.check_same_run`).
"""
from __future__ import annotations

import dataclasses
import pathlib

from sr3d import data

STRATEGIES = ("default", "mirrored", "multi_worker")
# Fields that may differ when a run is resumed (they do not change what is learned).
RESUMABLE_CHANGES = frozenset({"epochs", "verbose", "save_every_steps", "val_data", "strategy"})

RECIPES = ("paper", "shipped")


def recipe_settings(recipe: str, stage: str, scale: int) -> dict:
    """The TrainConfig fields a recipe sets for one stage (explicit flags override them).

    paper: TrainConfig's defaults (40 epochs, about one pass over the LR voxels per epoch, no
    flat patches). shipped: experiments/train_shipped.sh, which trained the bundles in
    sr3d/data_files/models: 10% flat patches, seed 0, stage hw 40 epochs of 400 steps (250 at
    x4 and above), stage d 20 epochs of 400 steps on a stage-hw model's outputs (--hw_model).
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    if recipe == "paper":
        return {}
    if stage == "hw":
        return {"epochs": 40, "steps_per_epoch": 400 if scale == 2 else 250, "flat_fraction": 0.1, "seed": 0}
    return {"epochs": 20, "steps_per_epoch": 400, "flat_fraction": 0.1, "seed": 0}


def resolve_recipe(recipe: str, stage: str, scale: int, defaults: dict, explicit: dict) -> dict:
    """Settings of a run: the defaults, then the recipe's, then the explicitly given ones."""
    settings = {**defaults, **recipe_settings(recipe, stage, scale), **explicit}
    if recipe == "shipped" and stage == "d" and not settings.get("hw_model"):
        raise ValueError("the shipped recipe trains stage d on a stage-hw model's outputs: pass "
                         "--hw_model=<stage-hw run>/model.keras")
    return settings


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run of one stage."""

    data: tuple[str, ...]
    model_dir: str
    stage: str = "hw"
    scale: int = 2
    val_data: tuple[str, ...] = ()
    epochs: int = 40
    steps_per_epoch: int | None = None     # None: about one pass over every LR voxel per epoch
    batch_size: int = 128
    learning_rate: float = 1e-3
    lr_drop_epoch: int | None = None       # None: epochs // 2 (the paper: 1e-3, then 1e-4 after 20 of 40)
    learning_rate_after_drop: float = 1e-4
    patch_size: int = 7
    filters: int = 32
    second_block: bool = True
    short_skips: bool = True
    long_skip: bool = True
    intermediate_weight: float = 1.0       # lambda of the two-term loss; 0 is the Table 2 ablation
    blur: str = "random"
    min_contrast: float = 0.02
    flat_fraction: float = 0.0             # share of each batch that is flat (background) patches
    flip_rotate: bool = False              # random flips/rotations of the patches (not in the paper)
    noise_probability: float = 0.0         # share of the contrast patches given noise (sr3d.data)
    max_noise: float = 0.0                 # their noise sigma ~ U(0, max_noise), normalised units
    init_model: str | None = None          # start from this trained model.keras's weights (fine-tuning)
    hw_model: str | None = None            # stage d only: cascade training on this stage-hw model's outputs
    seed: int = 0
    save_every_steps: int = 50
    strategy: str = "default"              # default | mirrored | multi_worker (see make_strategy)
    verbose: int = 1

    def __post_init__(self):
        object.__setattr__(self, "data", tuple(str(p) for p in self.data))
        object.__setattr__(self, "val_data", tuple(str(p) for p in self.val_data))
        if not self.data:
            raise ValueError("no training scans given")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
        if self.intermediate_weight < 0:
            raise ValueError(f"intermediate_weight must be >= 0, got {self.intermediate_weight}")
        if self.save_every_steps < 1:
            raise ValueError(f"save_every_steps must be >= 1, got {self.save_every_steps}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.hw_model is not None:
            object.__setattr__(self, "hw_model", str(self.hw_model))
            if self.stage != "d":
                raise ValueError(f"hw_model (cascade training) is for stage 'd', not {self.stage!r}")
            if not pathlib.Path(self.hw_model).is_file():
                raise FileNotFoundError(f"{self.hw_model}: stage-hw model not found (hw_model)")
        if self.init_model is not None:
            object.__setattr__(self, "init_model", str(self.init_model))
            if not pathlib.Path(self.init_model).is_file():
                raise FileNotFoundError(f"{self.init_model}: model to start from not found (init_model)")
        self.patch_config()  # validates stage, scale, sizes, blur, noise

    def patch_config(self) -> data.PatchConfig:
        return data.PatchConfig(stage=self.stage, scale=self.scale, patch_size=self.patch_size,
                                batch_size=self.batch_size, blur=self.blur,
                                min_contrast=self.min_contrast, flat_fraction=self.flat_fraction,
                                flip_rotate=self.flip_rotate, noise_probability=self.noise_probability,
                                max_noise=self.max_noise, seed=self.seed)

    def learning_rate_at(self, epoch: int) -> float:
        drop = self.epochs // 2 if self.lr_drop_epoch is None else self.lr_drop_epoch
        return self.learning_rate if epoch < drop else self.learning_rate_after_drop

    def to_json(self) -> dict:
        return dataclasses.asdict(self)
