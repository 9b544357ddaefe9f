"""The network a run trains and its loss: `build_model`, `compile_model` (Adam and the two-term
loss for `fit`), `two_term_loss` (the same loss per example, for loops outside `fit`)."""
from __future__ import annotations

from sr3d.training.config import TrainConfig


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


def two_term_loss(hr, outputs: dict, intermediate_weight: float):
    """Per-example L1(final, HR) + lambda * L1(intermediate, HR): shape (B,). The same loss
    `compile_model` gives `fit` (mean absolute error of each output, weighted and summed)."""
    import tensorflow as tf

    final = tf.reduce_mean(tf.abs(outputs["final"] - hr), axis=[1, 2, 3])
    intermediate = tf.reduce_mean(tf.abs(outputs["intermediate"] - hr), axis=[1, 2, 3])
    return final + intermediate_weight * intermediate
