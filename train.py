"""Train one stage of the sr3d network on your scans.

  python train.py --data ../shared/data/ixi-t1-2mm --stage hw --scale 2 --model_dir runs/hw_x2
  python train.py --recipe shipped --data DIR --stage hw --scale 2 --model_dir runs/hw_x2   # as the shipped models

Rerun the same command to resume an interrupted run from its last checkpoint.
"""
import sys

from absl import app, flags

from sr3d import files as sr3d_files
from sr3d import scripting, training

_RECIPE = flags.DEFINE_enum("recipe", "paper", list(training.RECIPES),
                            "Defaults of --epochs, --steps_per_epoch, --flat_fraction and --seed (flags given "
                            "explicitly win). paper: 40 epochs of about one pass over the LR voxels, no flat "
                            "patches, seed 0. shipped: experiments/train_shipped.sh, which trained the shipped "
                            "models: flat_fraction 0.1, seed 0; stage hw 40 epochs of 400 steps (250 at x4); "
                            "stage d 20 epochs of 400 steps, and --hw_model required (cascade).")
_DATA = flags.DEFINE_list("data", None, "Training scans: NIfTI/NRRD files, DICOM series directories, "
                          "or directories of NIfTI files.", required=True)
_VAL_DATA = flags.DEFINE_list("val_data", [], "Held-out scans for the per-epoch PSNR vs Lanczos.")
_STAGE = flags.DEFINE_enum("stage", "hw", ["hw", "d"], "hw: height and width; d: depth.")
_SCALE = flags.DEFINE_integer("scale", 2, "Upsampling factor r (>= 2).")
_EPOCHS = flags.DEFINE_integer("epochs", 40, "Epochs.")
_STEPS = flags.DEFINE_integer("steps_per_epoch", None, "Batches per epoch (default: about one pass "
                              "over every LR voxel).")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Patches per batch.")
_LR = flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate before the drop.")
_LR_AFTER = flags.DEFINE_float("learning_rate_after_drop", 1e-4, "Learning rate after the drop.")
_LR_DROP = flags.DEFINE_integer("lr_drop_epoch", None, "Epoch of the drop (default: epochs // 2).")
_PATCH = flags.DEFINE_integer("patch_size", 7, "LR patch side in pixels.")
_FILTERS = flags.DEFINE_integer("filters", 32, "Filters of the hidden conv layers.")
_SECOND_BLOCK = flags.DEFINE_bool("second_block", True, "Conv block after the sub-pixel layer.")
_SHORT_SKIPS = flags.DEFINE_bool("short_skips", True, "Short skips conv1->conv3 and conv7->conv9.")
_LONG_SKIP = flags.DEFINE_bool("long_skip", True, "Long skip conv1->conv5.")
_LAMBDA = flags.DEFINE_float("intermediate_weight", 1.0, "Weight of the intermediate L1 loss "
                             "(0: ablation without it).")
_BLUR = flags.DEFINE_enum("blur", "random", ["random", "fixed", "none"], "LR blur augmentation: random "
                          "sigma in [0, 0.5] (paper), fixed sigma 0.5, or none; p = 0.5.")
_FLIP_ROTATE = flags.DEFINE_bool("flip_rotate", False, "Flip and rotate training patches at random (8 "
                                  "transforms for stage hw, the 4 depth-keeping flips for d; not in the paper).")
_FLAT_FRACTION = flags.DEFINE_float("flat_fraction", 0.0, "Share of each batch made of flat (background) "
                                    "patches, which are otherwise redrawn; 0.1 teaches that flat stays flat.")
_NOISE_P = flags.DEFINE_float("noise_probability", 0.0, "Share of the contrast patches given white noise "
                               "at HR and its degraded copy at LR (noise augmentation, sr3d/data.py).")
_MAX_NOISE = flags.DEFINE_float("max_noise", 0.0, "Noise sigma ~ U(0, max_noise), in normalised units "
                                "(the scan's 0.5-99.5 percentile window is 0..1).")
_INIT_MODEL = flags.DEFINE_string("init_model", None, "Start from this trained model.keras's weights "
                                  "(fine-tuning); a resumed run continues from its own checkpoint.")
_HW_MODEL = flags.DEFINE_string("hw_model", None, "Stage d only: a trained stage-hw model.keras; stage d "
                                "then learns from its outputs on scans degraded in 3D (cascade training) "
                                "instead of from planes degraded along depth only.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for patches and weights.")
_SAVE_EVERY = flags.DEFINE_integer("save_every_steps", 50, "Checkpoint every this many steps.")
_STRATEGY = flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"],
                              "tf.distribute strategy: one device, all local devices (2 logical CPUs "
                              "without a GPU), or the workers of TF_CONFIG (docs/scaling.md).")
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Run directory (checkpoints, logs, model).",
                                 required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        recipe_flags = {"epochs": _EPOCHS, "steps_per_epoch": _STEPS, "flat_fraction": _FLAT_FRACTION,
                        "seed": _SEED, "hw_model": _HW_MODEL}
        settings = training.resolve_recipe(
            _RECIPE.value, _STAGE.value, _SCALE.value, defaults={k: f.value for k, f in recipe_flags.items()},
            explicit={k: f.value for k, f in recipe_flags.items() if flags.FLAGS[f.name].present})
        config = training.TrainConfig(
            data=sr3d_files.expand_scans(_DATA.value), val_data=sr3d_files.expand_scans(_VAL_DATA.value),
            model_dir=_MODEL_DIR.value, stage=_STAGE.value, scale=_SCALE.value, epochs=settings["epochs"],
            steps_per_epoch=settings["steps_per_epoch"], batch_size=_BATCH.value, learning_rate=_LR.value,
            learning_rate_after_drop=_LR_AFTER.value, lr_drop_epoch=_LR_DROP.value,
            patch_size=_PATCH.value, filters=_FILTERS.value, second_block=_SECOND_BLOCK.value,
            short_skips=_SHORT_SKIPS.value, long_skip=_LONG_SKIP.value,
            intermediate_weight=_LAMBDA.value, blur=_BLUR.value, flip_rotate=_FLIP_ROTATE.value, flat_fraction=settings["flat_fraction"],
            noise_probability=_NOISE_P.value, max_noise=_MAX_NOISE.value, init_model=_INIT_MODEL.value,
            hw_model=settings["hw_model"], seed=settings["seed"],
            save_every_steps=_SAVE_EVERY.value, strategy=_STRATEGY.value)
        print(f"saved {training.train(config)}")
    except (ValueError, OSError) as error:
        sys.exit(f"train.py: error: {error}")


if __name__ == "__main__":
    scripting.run(main)  # app.run, but --help exits 0
