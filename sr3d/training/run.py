"""`train`: one stage's run, from its config to `model_dir/model.keras`, resumed from the checkpoint
of an interrupted run (the layout of `model_dir`: `sr3d.training`)."""
from __future__ import annotations

import pathlib
from typing import Sequence

from sr3d import data, intensity
from sr3d import files as sr3d_files
from sr3d.training import checkpoints, distribute, network, plots, stacks
from sr3d.training.config import TrainConfig


def train(config: TrainConfig, callbacks: Sequence = ()) -> pathlib.Path:
    """Trains (or resumes) one stage; returns the path of the final `model.keras`."""
    import keras
    import tensorflow as tf

    strategy = distribute.make_strategy(config.strategy)  # first: logical devices must precede any TF op
    chief = distribute.is_chief(strategy)
    model_dir = pathlib.Path(config.model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    checkpoints.check_same_run(model_dir, config)
    # Only the chief writes the run; other workers write their (identical) state aside.
    out_dir = model_dir if chief else model_dir / f".worker-{strategy.cluster_resolver.task_id}"
    out_dir.mkdir(exist_ok=True)
    if chief:
        sr3d_files.write_json(model_dir / "config.json", config.to_json())

    hw_model = stacks.load_hw_model(config.hw_model, config.scale) if config.hw_model else None
    train_stacks = stacks.stage_stacks(stacks.load_normalised(config.data), config, hw_model)
    try:
        sampler = data.PatchSampler([], config.patch_config(), stacks=[s for group in train_stacks for s in group])
    except ValueError as error:  # the sampler sees planes, not files: name the scans
        raise ValueError(f"{', '.join(config.data)}: {error}") from error
    del train_stacks  # the sampler keeps its own (padded) copies of the LR planes
    val_stacks = stacks.stage_stacks(stacks.load_normalised(config.val_data), config, hw_model) if chief else []
    steps = config.steps_per_epoch or sampler.steps_per_epoch()

    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    with strategy.scope():
        model = network.build_model(config)
        network.compile_model(model, config)

    state = checkpoints.read_state(model_dir)
    start = (0, 0)
    if state is None and config.init_model is not None:
        checkpoints.start_from(model, config.init_model)
    if state is not None:
        with strategy.scope():  # the optimizer's slots are replicated variables under mirrored
            model.optimizer.build(model.trainable_variables)
            model.load_weights(model_dir / checkpoints.CHECKPOINT_DIR / checkpoints.CHECKPOINT_WEIGHTS)
        start = state
        if config.verbose:
            print(f"resuming {model_dir} at epoch {state[0] + 1}, step {state[1]}", flush=True)
    if start[1] >= steps:
        start = (start[0] + 1, 0)

    cbs = checkpoints.run_callbacks(config, out_dir, val_stacks, start) + list(callbacks)
    epoch, step = start
    if config.strategy != "default":
        distribute.fit_custom_loop(model, config, sampler, steps, strategy, start, cbs)
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
        net, lanczos = stacks.validation_psnr(model, val_stacks, config.stage, config.scale)
        summary["validation"] = {"psnr_db": net, "lanczos_psnr_db": lanczos,
                                 "note": "volume PSNR in normalised units (peak 1), stage output vs HR"}
    sr3d_files.write_json(model_dir / "training.json", summary)
    if (model_dir / "history.csv").exists():
        plots.plot_history(model_dir / "history.csv", model_dir / "training_curve.png",
                     f"stage {config.stage}, x{config.scale}")
    return final
