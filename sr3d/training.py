"""Training one stage of the network: config, resumable `fit`, validation against Lanczos.

A run lives in `model_dir`:
  config.json              how the run was made (written first; a rerun must match it)
  checkpoint/              latest weights + optimizer state and the (epoch, step) they belong to,
                           one file written every `save_every_steps` steps and at every epoch end
                           (state.json repeats the position for people)
  epochs/epoch_NNN.weights.h5   model weights after each epoch
  history.csv, logs/       per-epoch losses and validation PSNR (CSV and TensorBoard)
  training_curve.png       loss and validation PSNR vs Lanczos per epoch
  model.keras, training.json   the final model and a summary of how it was trained

Stage `d` learns, as in the paper, from HR planes degraded along depth only,
or, given `hw_model` (cascade training), from what it gets in the 3D
pipeline: the scan degraded on all three axes with its slices upscaled by
that stage-hw network, so it also learns to correct stage hw's errors.

Rerunning with the same `model_dir` resumes from the checkpoint: batches are
drawn from generators seeded by (seed, epoch, step), the optimizer state is
restored and ops are deterministic, so a resumed run ends with the weights of
an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Sequence

import numpy as np

from sr3d import baselines, data, degrade, intensity
from sr3d import files as sr3d_files
from sr3d import io as sr3d_io

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_WEIGHTS = "latest.weights.h5"   # weights + optimizer state, and the (epoch, step) they belong to
STRATEGIES = ("default", "mirrored", "multi_worker")
# Fields that may differ when a run is resumed (they do not change what is learned).
_RESUMABLE_CHANGES = frozenset({"epochs", "verbose", "save_every_steps", "val_data", "strategy"})


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


def load_normalised(paths: Sequence[str]) -> list[np.ndarray]:
    """Each scan as a (D, H, W) float32 array in network units (its own intensity window)."""
    volumes = []
    for path in paths:
        volume = sr3d_io.load_volume(path)
        volumes.append(intensity.window(volume.array).normalise(volume.array))
    return volumes


def predict_planes(model, planes: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """The `final` output of a stage model on (N, h, w) planes -> (N, h', w') float32."""
    outs = [np.asarray(model(planes[i:i + batch_size, ..., None], training=False)["final"])[..., 0]
            for i in range(0, planes.shape[0], batch_size)]
    return np.concatenate(outs).astype(np.float32)


def load_hw_model(path: str, scale: int):
    """A stage-hw network for cascade training; ValueError naming the file if it is not one for `scale`."""
    from sr3d import models

    model = models.load(path)
    found = models.stage_scale(model, "hw")
    if found != scale:
        raise ValueError(f"{path}: not a stage-hw network for scale {scale} "
                         + ("(not a stage-hw network at all)" if found is None else f"(it upscales by {found})"))
    return model


def cascade_stacks(volume: np.ndarray, hw_model, scale: int) -> list[data.PlaneStack]:
    """Stage-d planes as the 3D pipeline feeds them: the normalised (D, H, W) volume cropped and
    degraded on all three axes, each slice upscaled by `hw_model` -> (D/r, H, W), cut into (D, W)
    planes per row and (D, H) planes per column, paired with the same planes of the HR volume."""
    hr = degrade.crop_to_multiple(volume, scale, axes=(0, 1, 2)).astype(np.float32)
    in_plane = predict_planes(hw_model, degrade.downscale(hr, scale, axes=(0, 1, 2)).astype(np.float32))
    return [data.PlaneStack(np.ascontiguousarray(in_plane.transpose(order)), np.ascontiguousarray(hr.transpose(order)))
            for order in ((1, 0, 2), (2, 0, 1))]


def stage_stacks(volumes: Sequence[np.ndarray], config: TrainConfig, hw_model=None) -> list[list[data.PlaneStack]]:
    """The (LR, HR) planes of each volume the stage learns from (and is validated on)."""
    if config.hw_model is None:
        return [data.plane_stacks(volume, config.stage, config.scale) for volume in volumes]
    hw_model = hw_model or load_hw_model(config.hw_model, config.scale)
    return [cascade_stacks(volume, hw_model, config.scale) for volume in volumes]


def validation_psnr(model, stacks_per_volume: Sequence[Sequence[data.PlaneStack]], stage: str,
                    scale: int) -> tuple[float, float]:
    """Mean over held-out volumes (each given as its `stage_stacks`) of the volume PSNR
    (normalised units, peak 1) of the stage output and of Lanczos on the same LR planes:
    (network dB, Lanczos dB)."""
    axes = (1, 2) if stage == "hw" else (1,)
    net_db, lanczos_db = [], []
    for stacks in stacks_per_volume:
        net_se = lanczos_se = count = 0.0
        for stack in stacks:
            net = predict_planes(model, stack.lr)
            lanczos = baselines.upscale_axes(stack.lr, scale, "lanczos", axes=axes)
            net_se += float(np.sum((net.astype(np.float64) - stack.hr) ** 2))
            lanczos_se += float(np.sum((lanczos.astype(np.float64) - stack.hr) ** 2))
            count += stack.hr.size
        net_db.append(10 * math.log10(count / max(net_se, 1e-20)))
        lanczos_db.append(10 * math.log10(count / max(lanczos_se, 1e-20)))
    return float(np.mean(net_db)), float(np.mean(lanczos_db))


def _check_same_run(model_dir: pathlib.Path, config: TrainConfig) -> None:
    """Refuse to resume a run that was made with different settings."""
    path = model_dir / "config.json"
    if not path.exists():
        return
    old = json.loads(path.read_text())
    new = json.loads(json.dumps(config.to_json()))
    # A field added to TrainConfig after the run started was, for that run, at its default.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                if f.default is not dataclasses.MISSING}
    changed = sorted(k for k in set(old) | set(new)
                     if k not in _RESUMABLE_CHANGES and old.get(k, defaults.get(k)) != new.get(k))
    if changed:
        raise ValueError(f"{model_dir} holds a run made with other settings ({', '.join(changed)} "
                         "differ): use a new --model_dir or the same settings to resume it")


def _callbacks(config: TrainConfig, model_dir: pathlib.Path, val_stacks, start: tuple[int, int]):
    import keras

    class Checkpoint(keras.callbacks.Callback):
        """Saves weights + optimizer state and the (epoch, step) reached, atomically."""

        def __init__(self):
            super().__init__()
            self.epoch, self.step_offset = start

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def _save(self, epoch: int, step: int) -> None:
            import h5py

            ckpt = model_dir / CHECKPOINT_DIR
            ckpt.mkdir(exist_ok=True)
            # The (epoch, step) go inside the weights file, so one rename commits both: a kill
            # can never leave weights and position from different steps.
            with sr3d_files.atomic_path(ckpt / CHECKPOINT_WEIGHTS) as tmp:
                self.model.save_weights(tmp)
                with h5py.File(tmp, "a") as f:
                    f.attrs["sr3d_epoch"], f.attrs["sr3d_step"] = epoch, step
            sr3d_files.write_json(ckpt / "state.json", {"epoch": epoch, "step": step})  # for people

        def on_train_batch_end(self, batch, logs=None):
            step = self.step_offset + batch + 1
            if step % config.save_every_steps == 0:
                self._save(self.epoch, step)

        def on_epoch_end(self, epoch, logs=None):
            self.step_offset = 0
            self._save(epoch + 1, 0)
            epochs_dir = model_dir / "epochs"
            epochs_dir.mkdir(exist_ok=True)
            weights_only = keras.Model(self.model.inputs, self.model.outputs)
            with sr3d_files.atomic_path(epochs_dir / f"epoch_{epoch + 1:03d}.weights.h5") as tmp:
                weights_only.save_weights(tmp)

    class Validation(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if val_stacks and logs is not None:
                net, lanczos = validation_psnr(self.model, val_stacks, config.stage, config.scale)
                logs["val_psnr"] = net
                logs["val_psnr_lanczos"] = lanczos
                if config.verbose:
                    print(f"epoch {epoch + 1}: validation PSNR {net:.2f} dB "
                          f"(Lanczos {lanczos:.2f} dB, {net - lanczos:+.2f} dB)", flush=True)

    return [
        keras.callbacks.LearningRateScheduler(lambda epoch, lr: config.learning_rate_at(epoch)),
        Validation(),  # before the loggers, so they record its values
        Checkpoint(),
        keras.callbacks.CSVLogger(str(model_dir / "history.csv"), append=True),
        keras.callbacks.TensorBoard(log_dir=str(model_dir / "logs"), write_graph=False,
                                    update_freq="epoch"),
    ]


def compile_model(model, config: TrainConfig) -> None:
    """Adam and the two-term loss L1(final, HR) + lambda * L1(intermediate, HR)."""
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=config.learning_rate),
        loss={"final": keras.losses.MeanAbsoluteError(), "intermediate": keras.losses.MeanAbsoluteError()},
        loss_weights={"final": 1.0, "intermediate": config.intermediate_weight},
    )


def build_model(config: TrainConfig):
    from sr3d import models

    return models.build(config.stage, config.scale, filters=config.filters,
                        second_block=config.second_block, short_skips=config.short_skips,
                        long_skip=config.long_skip)


def start_from(model, path: str) -> None:
    """Copy a trained model's weights into `model` (fine-tuning); ValueError if they do not fit."""
    from sr3d import models

    trained = models.load(path)
    mine = [tuple(w.shape) for w in model.weights]
    theirs = [tuple(w.shape) for w in trained.weights]
    if mine != theirs:
        raise ValueError(f"{path}: its network does not match this run's (stage, scale, filters, "
                         f"blocks): weight shapes {theirs[:2]}... against {mine[:2]}...")
    model.set_weights(trained.get_weights())


def _read_state(model_dir: pathlib.Path) -> tuple[int, int] | None:
    """The (epoch, step) the checkpoint's weights belong to, read from the weights file itself."""
    import h5py

    path = model_dir / CHECKPOINT_DIR / CHECKPOINT_WEIGHTS
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r") as f:
            if "sr3d_epoch" in f.attrs:
                return int(f.attrs["sr3d_epoch"]), int(f.attrs["sr3d_step"])
        # A checkpoint of sr3d before 2026-12-01 kept the position in state.json only.
        state = json.loads((path.parent / "state.json").read_text())
        return int(state["epoch"]), int(state["step"])
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"{path}: unreadable checkpoint ({error}); delete {path.parent} to "
                         "start the run over") from error


def plot_history(history_csv: pathlib.Path, png: pathlib.Path, title: str) -> None:
    """Training curve: loss per epoch and validation PSNR against Lanczos."""
    import csv

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(history_csv.open()))
    if not rows:
        return
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].plot(epochs, [float(r["loss"]) for r in rows], "o-", label="total loss")
    if "final_loss" in rows[0]:
        axes[0].plot(epochs, [float(r["final_loss"]) for r in rows], ".--", label="L1 final")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("loss (normalised units)")
    axes[0].legend()
    if rows[0].get("val_psnr"):
        axes[1].plot(epochs, [float(r["val_psnr"]) for r in rows], "o-", label="CNN")
        axes[1].plot(epochs, [float(r["val_psnr_lanczos"]) for r in rows], "k--", label="Lanczos")
        axes[1].set_ylabel("validation PSNR (dB, peak 1)")
        axes[1].legend()
    axes[1].set_xlabel("epoch")
    fig.suptitle(title)
    fig.tight_layout()
    with sr3d_files.atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def make_strategy(name: str, logical_cpus: int = 2):
    """The tf.distribute strategy for `name`.

    default: one device. mirrored: every local GPU, or, on a machine without
    GPUs, `logical_cpus` logical CPU devices (the CPU is split so that the
    replicated path can be used and tested anywhere). multi_worker: one
    replica per worker process, cluster taken from the TF_CONFIG environment
    variable (see docs/scaling.md).
    """
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if tf.config.list_physical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(logical_cpus)])
        except RuntimeError as error:  # the runtime is up: fine if it already has the devices
            if len(tf.config.list_logical_devices("CPU")) < logical_cpus:
                raise RuntimeError("the mirrored strategy must be set up before TensorFlow runs any "
                                   "operation in this process") from error
        return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("strategy multi_worker needs the TF_CONFIG environment variable "
                             "(cluster and task of this worker): see docs/scaling.md")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")


def _is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    return resolver.task_type in ("chief", None) or (resolver.task_type == "worker" and resolver.task_id == 0
                                                    and "chief" not in resolver.cluster_spec().as_dict())


def two_term_loss(hr, outputs: dict, intermediate_weight: float):
    """Per-example L1(final, HR) + lambda * L1(intermediate, HR): shape (B,). The same loss
    `compile_model` gives `fit` (mean absolute error of each output, weighted and summed)."""
    import tensorflow as tf

    final = tf.reduce_mean(tf.abs(outputs["final"] - hr), axis=[1, 2, 3])
    intermediate = tf.reduce_mean(tf.abs(outputs["intermediate"] - hr), axis=[1, 2, 3])
    return final + intermediate_weight * intermediate


def _fit_custom_loop(model, config: TrainConfig, sampler, steps: int, strategy, start: tuple[int, int],
                     callbacks: list) -> None:
    """Training with `strategy.run` for the replicated strategies (mirrored, multi_worker).

    Keras 3 `fit` fails under MultiWorkerMirroredStrategy in TF 2.21 ("unsupported type
    PerReplica"); under MirroredStrategy on two logical CPUs it runs, but its results vary from
    run to run and drift from the single-device run after a few steps. This loop reproduces the
    single-device losses and weights to float round-off with either strategy. Same model, loss,
    data and callbacks as `fit`.

    Every worker draws the same seeded global batch and keeps its own slice of it, so the global
    batch (and what is learned) is the same as on one device.
    """
    import keras
    import tensorflow as tf

    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ValueError(f"batch_size {config.batch_size} must divide by the {replicas} replicas")
    p = config.patch_size
    hy, hx = config.patch_config().hr_patch_shape

    def make_dataset(epoch: int, first: int):
        def dataset_fn(context):
            per_worker = config.batch_size // context.num_input_pipelines
            begin = context.input_pipeline_id * per_worker

            def generate():
                for lr, hr in sampler.batches(epoch, first, steps):
                    yield lr[begin:begin + per_worker], hr[begin:begin + per_worker]

            signature = (tf.TensorSpec((None, p, p, 1), tf.float32), tf.TensorSpec((None, hy, hx, 1), tf.float32))
            ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
            return ds.unbatch().batch(context.get_per_replica_batch_size(config.batch_size)).prefetch(2)

        return strategy.distribute_datasets_from_function(dataset_fn)

    # Optimizer slots are made here, in cross-replica context: creating them lazily inside
    # strategy.run fails with two local replicas.
    if not model.optimizer.built:
        with strategy.scope():
            model.optimizer.build(model.trainable_variables)

    def replica_step(lr, hr):
        with tf.GradientTape() as tape:
            outputs = model(lr, training=True)
            per_example = two_term_loss(hr, outputs, config.intermediate_weight)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=config.batch_size)
        grads = tape.gradient(loss, model.trainable_variables)
        model.optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def train_step(iterator):
        lr, hr = next(iterator)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(replica_step, args=(lr, hr)), axis=None)

    callback_list = keras.callbacks.CallbackList(callbacks, add_history=True, add_progbar=config.verbose > 0,
                                                 model=model, verbose=config.verbose, epochs=config.epochs,
                                                 steps=steps)
    callback_list.on_train_begin()
    for epoch in range(start[0], config.epochs):
        first = start[1] if epoch == start[0] else 0
        callback_list.on_epoch_begin(epoch)
        iterator = iter(make_dataset(epoch, first))
        total = 0.0
        logs = {}
        for step in range(first, steps):
            callback_list.on_train_batch_begin(step - first)
            total += float(train_step(iterator))
            logs = {"loss": total / (step - first + 1)}
            callback_list.on_train_batch_end(step - first, logs)
        callback_list.on_epoch_end(epoch, dict(logs))
    callback_list.on_train_end()


def train(config: TrainConfig, callbacks: Sequence = ()) -> pathlib.Path:
    """Trains (or resumes) one stage; returns the path of the final `model.keras`."""
    import keras
    import tensorflow as tf

    strategy = make_strategy(config.strategy)  # first: logical devices must precede any TF op
    chief = _is_chief(strategy)
    model_dir = pathlib.Path(config.model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    _check_same_run(model_dir, config)
    # Only the chief writes the run; other workers write their (identical) state aside.
    out_dir = model_dir if chief else model_dir / f".worker-{strategy.cluster_resolver.task_id}"
    out_dir.mkdir(exist_ok=True)
    if chief:
        sr3d_files.write_json(model_dir / "config.json", config.to_json())

    hw_model = load_hw_model(config.hw_model, config.scale) if config.hw_model else None
    train_stacks = stage_stacks(load_normalised(config.data), config, hw_model)
    try:
        sampler = data.PatchSampler([], config.patch_config(), stacks=[s for group in train_stacks for s in group])
    except ValueError as error:  # the sampler sees planes, not files: name the scans
        raise ValueError(f"{', '.join(config.data)}: {error}") from error
    del train_stacks  # the sampler keeps its own (padded) copies of the LR planes
    val_stacks = stage_stacks(load_normalised(config.val_data), config, hw_model) if chief else []
    steps = config.steps_per_epoch or sampler.steps_per_epoch()

    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    with strategy.scope():
        model = build_model(config)
        compile_model(model, config)

    state = _read_state(model_dir)
    start = (0, 0)
    if state is None and config.init_model is not None:
        start_from(model, config.init_model)
    if state is not None:
        with strategy.scope():  # the optimizer's slots are replicated variables under mirrored
            model.optimizer.build(model.trainable_variables)
            model.load_weights(model_dir / CHECKPOINT_DIR / CHECKPOINT_WEIGHTS)
        start = state
        if config.verbose:
            print(f"resuming {model_dir} at epoch {state[0] + 1}, step {state[1]}", flush=True)
    if start[1] >= steps:
        start = (start[0] + 1, 0)

    cbs = _callbacks(config, out_dir, val_stacks, start) + list(callbacks)
    epoch, step = start
    if config.strategy != "default":
        _fit_custom_loop(model, config, sampler, steps, strategy, start, cbs)
        epoch = config.epochs
    if epoch < config.epochs and step > 0:
        # Finish the interrupted epoch from the step it reached, then go on.
        model.fit(data.dataset(sampler, [(epoch, step, steps)]), initial_epoch=epoch, epochs=epoch + 1,
                  steps_per_epoch=steps - step, callbacks=cbs, verbose=config.verbose)
        epoch += 1
    if epoch < config.epochs:
        plan = [(e, 0, steps) for e in range(epoch, config.epochs)]
        model.fit(data.dataset(sampler, plan), initial_epoch=epoch, epochs=config.epochs,
                  steps_per_epoch=steps, callbacks=cbs, verbose=config.verbose)

    final = model_dir / "model.keras"
    if not chief:
        return final
    with sr3d_files.atomic_path(final) as tmp:
        model.save(tmp)
    summary = {"config": config.to_json(), "steps_per_epoch": steps,
               "patches_per_epoch": steps * config.batch_size,
               "intensity_window": {"low_percentile": intensity.LOW_PERCENTILE,
                                    "high_percentile": intensity.HIGH_PERCENTILE},
               "parameters": int(model.count_params())}
    if val_stacks:
        net, lanczos = validation_psnr(model, val_stacks, config.stage, config.scale)
        summary["validation"] = {"psnr_db": net, "lanczos_psnr_db": lanczos,
                                 "note": "volume PSNR in normalised units (peak 1), stage output vs HR"}
    sr3d_files.write_json(model_dir / "training.json", summary)
    if (model_dir / "history.csv").exists():
        plot_history(model_dir / "history.csv", model_dir / "training_curve.png",
                     f"stage {config.stage}, x{config.scale}")
    return final
