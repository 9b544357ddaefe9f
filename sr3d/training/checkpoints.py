"""A run's directory across restarts: the settings check on resume, the checkpoint and the
(epoch, step) it belongs to, the callbacks that write them (with the per-epoch weights, history
and validation), and starting from another run's weights (fine-tuning).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

from sr3d import files as sr3d_files
from sr3d.training.config import RESUMABLE_CHANGES, TrainConfig
from sr3d.training.stacks import validation_psnr

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_WEIGHTS = "latest.weights.h5"   # weights + optimizer state, and the (epoch, step) they belong to


def check_same_run(model_dir: pathlib.Path, config: TrainConfig) -> None:
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
                     if k not in RESUMABLE_CHANGES and old.get(k, defaults.get(k)) != new.get(k))
    if changed:
        raise ValueError(f"{model_dir} holds a run made with other settings ({', '.join(changed)} "
                         "differ): use a new --model_dir or the same settings to resume it")


def run_callbacks(config: TrainConfig, model_dir: pathlib.Path, val_stacks, start: tuple[int, int]):
    """The callbacks of a run: learning-rate schedule, validation, checkpoint, history.csv, TensorBoard."""
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


def read_state(model_dir: pathlib.Path) -> tuple[int, int] | None:
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
