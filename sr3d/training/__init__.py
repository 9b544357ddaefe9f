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

Rerunning with the same `model_dir` resumes from the checkpoint: batches are
drawn from generators seeded by (seed, epoch, step), the optimizer state is
restored and ops are deterministic, so a resumed run ends with the weights of
an uninterrupted one.

One concern a module, bottom up: `config` (TrainConfig, recipes), `stacks` (the
planes a stage learns from, validation against Lanczos), `network` (model and
loss), `checkpoints` (resume, callbacks, fine-tuning start), `plots` (the
curve), `distribute` (tf.distribute strategies and their loop), `run` (`train`).
"""
from sr3d.training.config import (RECIPES, RESUMABLE_CHANGES, STRATEGIES, TrainConfig,  # noqa: F401
                                  recipe_settings, resolve_recipe)
from sr3d.training.stacks import (cascade_stacks, load_hw_model, load_normalised,  # noqa: F401
                                  predict_planes, stage_stacks, validation_psnr)
from sr3d.training.network import build_model, compile_model, two_term_loss  # noqa: F401
from sr3d.training.checkpoints import CHECKPOINT_DIR, CHECKPOINT_WEIGHTS, start_from  # noqa: F401
from sr3d.training.plots import plot_history  # noqa: F401
from sr3d.training.distribute import make_strategy  # noqa: F401
from sr3d.training.run import train  # noqa: F401
