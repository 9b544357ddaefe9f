"""Inference precision: float32, or bfloat16 convolutions where the CPU multiplies bf16 natively.

`stage_precisions("auto", scale, mode)` picks "bfloat16" only on CPUs whose `/proc/cpuinfo` flags
include `avx512_bf16` (AVX-512 BF16, e.g. AMD Zen 4/5, Intel Cooper Lake) or
`amx_bf16` (Intel AMX, Sapphire Rapids and later): there oneDNN, which
TensorFlow uses for its CPU convolutions, runs bf16 convolutions at about
twice the float32 rate (docs/benchmarks.md). Elsewhere bf16 would be emulated
and slower, so "auto" is float32. "auto" would also keep a whole stage in float32 where bf16 failed
the quality guard on the test scans (`AUTO_FLOAT32_STAGES`, empty since the thin layers stay float32,
below); "bfloat16" is bf16 everywhere else.

`network(model, "bfloat16")` is a copy of a stage network whose layers run
under the Keras dtype policy "mixed_bfloat16" (float32 weights, cast to bf16
when used; bf16 activations). Its input and its "final" / "intermediate"
outputs stay float32, so callers (normalisation, clipping, the self-check,
exported graphs) see float32 only; oneDNN accumulates the convolutions in
float32 either way. Layers named in `FLOAT32_LAYERS` keep float32.

Which layers stay float32: conv1, which reads the input image, and conv10, which writes the
output. bf16 keeps 8 significant bits, so an image stored in bf16 carries a relative error of up to
2^-9 of the intensity itself, which a network without a global residual passes to its output; the
32-channel feature maps in between tolerate it. With every conv in bf16, stage d at 3D x2 lost
0.063 dB on the chest CT test slab; with these two in float32, 0.016 dB, at 2.1x the float32 speed
instead of 2.9x (Intel AMX; docs/benchmarks/precision_layers.md). The two layers around the
sub-pixel image, conv6 and conv7, stay bf16: float32 there gained 0.004-0.009 dB more for 10-20%
of the speed.
"""
from __future__ import annotations

import pathlib
import weakref

PRECISIONS = ("auto", "float32", "bfloat16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = pathlib.Path("/proc/cpuinfo")
MIXED_POLICY = "mixed_bfloat16"
# The layers that read the input image or write the output (see the module docstring) and the
# outputs, which go back to scanner units; every other layer runs in bf16.
FLOAT32_LAYERS = ("conv1", "conv10", "intermediate", "final")

# Where "auto" keeps a whole stage in float32 although the CPU has bf16: (scale, mode) -> stages
# that failed the quality guard of benchmarks/precision_quality.py (0.05 dB PSNR, 0.001 SSIM on any
# test scan) with the shipped models. Empty: with the thin layers in float32 every stage passes on
# all 14 test scans at x2 and x4, 2D and 3D (docs/benchmarks/precision_quality.md). Before that,
# stage d at 3D x2 lost 0.063 dB on the chest CT and was kept in float32 here.
AUTO_FLOAT32_STAGES: dict[tuple[int, str], tuple[str, ...]] = {}

# One bf16 copy per model, kept as long as the model lives (building one costs a model clone).
_COPIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def cpu_flags(cpuinfo: str | pathlib.Path = CPUINFO) -> frozenset[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (empty where there is no such file)."""
    try:
        text = pathlib.Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def native_bf16(flags: frozenset[str] | None = None) -> list[str]:
    """The native-bf16 flags present in `flags` (default: this machine's `cpu_flags()`)."""
    flags = cpu_flags() if flags is None else flags
    return [flag for flag in NATIVE_BF16_FLAGS if flag in flags]


def check(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def resolve(precision: str, flags: frozenset[str] | None = None) -> str:
    """"auto" -> "bfloat16" where the CPU has native bf16 (see `native_bf16`), else "float32";
    "float32" and "bfloat16" are returned as they are. flags: simulated CPU flags (tests)."""
    if check(precision) != "auto":
        return precision
    return "bfloat16" if native_bf16(flags) else "float32"


def stage_precisions(precision: str, scale: int, mode: str = "3d",
                     flags: frozenset[str] | None = None) -> tuple[str, str]:
    """The (stage hw, stage d) precisions for `precision`: as `resolve`, except that "auto" keeps
    the stages of `AUTO_FLOAT32_STAGES[(scale, mode)]` in float32 (they failed the quality guard)."""
    resolved = resolve(precision, flags)
    kept = AUTO_FLOAT32_STAGES.get((int(scale), mode), ()) if precision == "auto" else ()
    return tuple("float32" if stage in kept else resolved for stage in ("hw", "d"))


def bf16_copy(model, float32_layers=FLOAT32_LAYERS):
    """A copy of `model` (same weights) whose layers run under "mixed_bfloat16", except the input
    and the layers named in `float32_layers` (benchmarks/precision_layers.py tries other sets)."""
    import keras

    def clone_layer(layer):
        config = layer.get_config()
        if layer.name not in float32_layers and not isinstance(layer, keras.layers.InputLayer):
            config["dtype"] = MIXED_POLICY
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone_layer)
    copy.set_weights(model.get_weights())
    return copy


def network(model, precision: str):
    """The stage network to run at `precision` ("float32" or "bfloat16", not "auto"): the model
    itself for float32, its cached bf16 copy (float32 in and out) for bfloat16."""
    if check(precision) == "auto":
        raise ValueError("network() needs a resolved precision: call resolve('auto') first")
    if precision == "float32":
        return model
    copy = _COPIES.get(model)
    if copy is None:
        copy = _COPIES[model] = bf16_copy(model)
    return copy
