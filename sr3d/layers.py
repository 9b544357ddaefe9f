"""Sub-pixel (pixel-shuffle) upsampling layers of the paper's Figures 3 and 4.

Keras 3 refuses raw TensorFlow ops on symbolic KerasTensors, so the
rearrangements live in two small serializable layers. Both use the channel
order of `tf.nn.depth_to_space` (NHWC): for an upscale factor r and C output
channels, input channel `(di * r + dj) * C + c` at LR position (i, j) becomes
output channel c at HR position (i * r + di, j * r + dj). The one-axis layer
is that order restricted to one axis: input channel `k * C + c` at LR position
i goes to HR position `i * r + k` along the upsampled axis.
"""
from __future__ import annotations

import numbers

import keras
import tensorflow as tf


def _check_scale(scale: int, layer: str) -> int:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Integral) or scale < 2:
        raise ValueError(f"sr3d/layers.py: {layer} scale must be an integer >= 2, got {scale!r}")
    return int(scale)


def _check_channels(channels: int | None, factor: int, layer: str) -> None:
    if channels is not None and channels % factor:
        raise ValueError(f"sr3d/layers.py: {layer} needs a channel count divisible by {factor}, "
                         f"got {channels} channels")


def _times(size: int | None, scale: int) -> int | None:
    return None if size is None else size * scale


@keras.saving.register_keras_serializable(package="sr3d")
class SubPixel2D(keras.layers.Layer):
    """Upsample height and width by `scale`: (B, h, w, r*r*C) -> (B, r*h, r*w, C).

    Pixel order is exactly `tf.nn.depth_to_space(x, scale)` (paper Figure 3).
    Works with any (None) batch and spatial size.
    """

    def __init__(self, scale: int, **kwargs):
        super().__init__(**kwargs)
        self.scale = _check_scale(scale, "SubPixel2D")

    def build(self, input_shape):
        _check_channels(input_shape[-1], self.scale * self.scale, "SubPixel2D")
        super().build(input_shape)

    def call(self, inputs):
        return tf.nn.depth_to_space(inputs, self.scale, data_format="NHWC")

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        r = self.scale
        out_channels = None if channels is None else channels // (r * r)
        return (batch, _times(height, r), _times(width, r), out_channels)

    def get_config(self):
        config = super().get_config()
        config.update({"scale": self.scale})
        return config


@keras.saving.register_keras_serializable(package="sr3d")
class SubPixel1D(keras.layers.Layer):
    """Upsample one spatial axis by `scale` (paper Figure 4).

    axis=1: (B, h, w, r*C) -> (B, r*h, w, C); axis=2: (B, h, w, r*C) -> (B, h, r*w, C).
    Input channel `k * C + c` (k in 0..r-1) at position i goes to channel c at
    position `i * r + k` along `axis`: depth_to_space's order on one axis.
    Works with any (None) batch and spatial size.
    """

    def __init__(self, scale: int, axis: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.scale = _check_scale(scale, "SubPixel1D")
        if isinstance(axis, bool) or axis not in (1, 2):
            raise ValueError(f"sr3d/layers.py: SubPixel1D axis must be 1 (rows) or 2 (columns) "
                             f"of an NHWC tensor, got {axis!r}")
        self.axis = int(axis)

    def build(self, input_shape):
        _check_channels(input_shape[-1], self.scale, "SubPixel1D")
        super().build(input_shape)

    def call(self, inputs):
        r = self.scale
        shape = tf.shape(inputs)
        batch, height, width = shape[0], shape[1], shape[2]
        # A static channel count stays a Python int so the output's channel
        # dimension stays static too.
        static_channels = inputs.shape[-1]
        channels = shape[3] // r if static_channels is None else static_channels // r
        # Split channels into (k, c): depth_to_space puts the sub-pixel
        # offset k before the output channel c.
        x = tf.reshape(inputs, tf.stack([batch, height, width, r, channels]))
        if self.axis == 1:
            # (B, h, w, r, C) -> (B, h, r, w, C): k moves next to the row index.
            x = tf.transpose(x, [0, 1, 3, 2, 4])
            return tf.reshape(x, tf.stack([batch, height * r, width, channels]))
        # axis 2: k already follows the column index, so merging is enough.
        return tf.reshape(x, tf.stack([batch, height, width * r, channels]))

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        r = self.scale
        out_channels = None if channels is None else channels // r
        if self.axis == 1:
            return (batch, _times(height, r), width, out_channels)
        return (batch, height, _times(width, r), out_channels)

    def get_config(self):
        config = super().get_config()
        config.update({"scale": self.scale, "axis": self.axis})
        return config
