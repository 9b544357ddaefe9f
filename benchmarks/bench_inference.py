"""Speed and memory of sr3d inference on this machine, against numpy's matmul throughput.

    python benchmarks/bench_inference.py --out docs/benchmarks          # full run: ~15 min on 2 free cores
    python benchmarks/bench_inference.py --out /tmp/bench --quick       # smoke run, < 1 min

Writes `inference.json` (every number, plus machine, environment and load)
and `inference.md` (tables) into --out. Measures, in one run:

- numpy float32 `a @ b` (n x n, best of repeats) in GFLOP/s = 2 n^3 / s, with
  the environment as is and, in a subprocess, with OPENBLAS_CORETYPE and
  OPENBLAS_L2_SIZE unset;
- `sr3d.inference.upscale_normalised` on a real MRI resampled to
  (D, H, W) = (176, 256, 256), 2x 3D: wall time, output voxels/s, conv GFLOP/s
  (`conv_flops` / time) and its ratio to matmul; per-stage and per-layer
  profiles; batch sizes and other ways of calling the model; self-ensemble and
  4x on a smaller volume; Lanczos on the same volume;
- float32 against bfloat16 (`precision=`): a raw stack of 3x3 32 -> 32 convolutions, each stage
  network, and `sr3d upscale`'s work end to end on the same volume (load the .nii.gz, upscale,
  write .nii.gz) with load / compute / write timed apart, plus other ways of writing the output;
  the CPU features found (avx512_bf16, amx_bf16, ...);
- peak memory of a CT-like (300, 512, 512) volume at 2x, tiled and untiled,
  each in its own subprocess (peak RSS during upscaling, from VmHWM), and of
  one stage-d batch per batch size (TensorFlow's activations).

Speed does not depend on weight values: without a shipped model the networks
are randomly initialised with the shipped architecture (filters 32).
Every timed block also records the CPU time of this process and of the rest of
the machine (from /proc/stat), because the 2 cores are shared.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import glob
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
ENV_KEYS = BLAS_ENV + ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                       "TF_ENABLE_ONEDNN_OPTS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")
MR_FILE = REPO / "sr3d" / "data_files" / "studyforrest_t1_2mm.nii.gz"
CT_FILE = REPO.parent / "shared" / "data" / "totalseg-ct" / "example_ct.nii.gz"
FILTERS = 32
TARGET_MATMUL_RATIO = 0.7
TARGET_SECONDS = 60.0
MIB = 2**20
SMALL_2X = "2x 3D, smaller volume"
SMALL_ENSEMBLE = "2x 3D, smaller volume, self-ensemble"
SMALL_4X = "4x 3D, smaller volume"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Problem sizes of one benchmark run; shapes are (D, H, W) of the LR input."""

    matmul_n: int = 2048
    matmul_repeats: int = 7
    volume: tuple = (176, 256, 256)
    small_volume: tuple = (88, 128, 128)  # ensemble and 4x (4x gives the 2x run's output size)
    sweep_planes: int = 16
    batch_sizes: tuple = (1, 4, 8, 16)
    sweep_rounds: int = 3
    layer_batch: int = 8
    big_volume: tuple = (300, 512, 512)
    tile_mb: float = 256
    rss_limit_gb: float = 18.0
    conv_batch: int = 8
    conv_plane: tuple = (256, 256)
    conv_layers: int = 4
    pipeline_rounds: int = 2


QUICK = Sizes(matmul_n=1024, matmul_repeats=3, volume=(16, 48, 48), small_volume=(8, 24, 24),
              sweep_planes=4, batch_sizes=(1, 4), sweep_rounds=1, layer_batch=2,
              big_volume=(16, 64, 64), tile_mb=0.25, conv_batch=2, conv_plane=(64, 64), conv_layers=2,
              pipeline_rounds=1)


# ---------------------------------------------------------------------------- machine and load

def _cpu_model() -> str:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _machine_busy_seconds() -> float:
    """CPU-seconds spent by all processes (all cores) since boot, from /proc/stat."""
    fields = [int(v) for v in pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _top_processes(count: int = 5) -> list[str]:
    """The busiest processes (pid, %cpu, rss MB, command name) as `ps` lines."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,rss,comm", "--sort=-pcpu"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [" ".join(line.split()) for line in out.splitlines()[1:count + 1]]


def load_snapshot() -> dict:
    return {"time": datetime.datetime.now().isoformat(timespec="seconds"),
            "loadavg_1_5_15": list(os.getloadavg()), "top_processes": _top_processes()}


class Meter:
    """Wall time, this process's CPU time and the other processes' CPU use of one block."""

    def __enter__(self) -> "Meter":
        self._own = _own_cpu_seconds()
        self._busy = _machine_busy_seconds()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0
        own = _own_cpu_seconds() - self._own
        busy = _machine_busy_seconds() - self._busy
        self.record = {"seconds": self.seconds, "cpu_seconds": own,
                       "own_cores": own / self.seconds,
                       "other_cores": max(0.0, busy - own) / self.seconds}


def _openblas_function(name: str):
    """A function of the OpenBLAS bundled with numpy (wheel builds), or None."""
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "*openblas*"))
    for lib_path in libs:
        try:
            lib = ctypes.CDLL(lib_path)
        except OSError:
            continue
        for symbol in (f"scipy_openblas_{name}64_", f"scipy_openblas_{name}", f"openblas_{name}"):
            function = getattr(lib, symbol, None)
            if function is not None:
                return function
    return None


def blas_info() -> dict:
    """Which BLAS numpy uses: build config, and the core type and threads OpenBLAS uses at run time."""
    info: dict = {}
    try:
        info["build"] = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except (TypeError, KeyError):
        info["build"] = "unavailable"
    corename, threads = _openblas_function("get_corename"), _openblas_function("get_num_threads")
    if corename is not None:
        corename.restype = ctypes.c_char_p
        info["runtime_corename"] = corename().decode()
    if threads is not None:
        info["runtime_threads"] = int(threads())
    return info


def machine_info() -> dict:
    import keras
    import tensorflow as tf

    return {"nproc": os.cpu_count(), "cpu_model": _cpu_model(),
            "memory_total_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
            "python": platform.python_version(), "numpy": np.__version__,
            "tensorflow": tf.__version__, "keras": keras.__version__,
            "onednn_env": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset (oneDNN on by default)"),
            "env": {key: os.environ.get(key) for key in ENV_KEYS}, "numpy_blas": blas_info()}


# ---------------------------------------------------------------------------- matmul

def _matmul_timing(a: np.ndarray, b: np.ndarray, repeats: int) -> dict:
    a @ b
    walls, cpus = [], []
    with Meter() as meter:
        for _ in range(repeats):
            c0, t0 = _own_cpu_seconds(), time.perf_counter()
            a @ b
            walls.append(time.perf_counter() - t0)
            cpus.append(_own_cpu_seconds() - c0)
    flops = 2.0 * a.shape[0] ** 3
    return {"best_seconds": min(walls), "gflops": flops / min(walls) / 1e9,
            "median_gflops": flops / float(np.median(walls)) / 1e9,
            "gflop_per_cpu_s": flops / max(min(cpus), 1e-9) / 1e9, "load": meter.record}


def matmul_gflops(n: int, repeats: int) -> dict:
    """numpy float32 a @ b on n x n, best of `repeats` after a warm-up, 2 n^3 FLOPs.

    Also single-threaded (OpenBLAS set to 1 thread through its C API, environment untouched):
    its best wall rate is the per-core rate (OpenBLAS worker threads spin while idle, so
    CPU-seconds overstate its work and are only recorded).
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    result = {"n": n, "repeats": repeats, "env": {key: os.environ.get(key) for key in BLAS_ENV},
              **blas_info(), **_matmul_timing(a, b, repeats)}
    set_threads = _openblas_function("set_num_threads")
    if set_threads is not None and result.get("runtime_threads"):
        set_threads(1)
        result["one_thread"] = _matmul_timing(a, b, repeats)
        set_threads(result["runtime_threads"])
    return result


def matmul_in_subprocess(n: int, repeats: int, unset: tuple[str, ...]) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in unset}
    out = subprocess.run([sys.executable, __file__, "--matmul-child", str(n), str(repeats)],
                         env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def matmul_both(sizes: Sizes) -> dict:
    return {"env_as_is": matmul_gflops(sizes.matmul_n, sizes.matmul_repeats),
            "openblas_env_unset": matmul_in_subprocess(sizes.matmul_n, sizes.matmul_repeats, BLAS_ENV)}


# ---------------------------------------------------------------------------- inputs and models

def _resample(array: np.ndarray, shape: tuple) -> np.ndarray:
    from scipy import ndimage

    zoom = [t / s for t, s in zip(shape, array.shape)]
    out = ndimage.zoom(array.astype(np.float32), zoom, order=1, grid_mode=True, mode="grid-constant")
    return np.ascontiguousarray(out[:shape[0], :shape[1], :shape[2]], np.float32)


def mr_volume(shape: tuple) -> tuple[np.ndarray, str]:
    """Normalised float32 (D, H, W): the bundled real T1 MRI resampled (linear) to `shape`."""
    from sr3d import intensity
    from sr3d import io as sr3d_io

    if MR_FILE.exists():
        array = sr3d_io.load_volume(MR_FILE).array
        source = f"{MR_FILE.name} (real T1 MRI, {array.shape}) resampled linearly to {tuple(shape)}"
    else:
        array = np.random.default_rng(0).random(shape, dtype=np.float32)
        source = f"uniform random values {tuple(shape)} ({MR_FILE.name} not found)"
    array = _resample(array, shape)
    return intensity.window(array).normalise(array), source


def ct_volume(shape: tuple) -> tuple[np.ndarray, str]:
    """Normalised float32 (D, H, W) CT-like volume: a real CT in HU resampled, else random HU."""
    from sr3d import intensity
    from sr3d import io as sr3d_io

    if CT_FILE.exists():
        array = _resample(sr3d_io.load_volume(CT_FILE).array, shape)
        source = f"{CT_FILE.name} (real CT, HU) resampled linearly to {tuple(shape)}"
    else:
        array = np.random.default_rng(0).uniform(-1000, 2000, shape).astype(np.float32)
        source = f"uniform random HU {tuple(shape)} ({CT_FILE} not found)"
    normalised = intensity.window(array).normalise(array)
    del array
    return normalised, source


def model_bundle(scale: int):
    """The shipped models for `scale` if present, else random ones of the shipped architecture."""
    import keras

    from sr3d import inference, models

    if (inference.shipped_model_dir(scale) / inference.MODEL_FILES["hw"]).exists():
        return inference.load_models(None, scale), "shipped"
    keras.utils.set_random_seed(0)
    bundle = inference.ModelBundle(models.build("hw", scale, FILTERS), models.build("d", scale, FILTERS), scale)
    return bundle, f"random init, build('hw'|'d', {scale}, filters={FILTERS})"


def stage_flops(shape: tuple, scale: int) -> dict:
    from sr3d import inference

    total = inference.conv_flops(shape, scale, FILTERS, "3d")
    hw = inference.conv_flops(shape, scale, FILTERS, "2d")
    return {"hw": hw, "d": total - hw, "total": total}


# ---------------------------------------------------------------------------- CNN timings

def time_upscale(lr: np.ndarray, bundle, label: str, **options) -> dict:
    """One timed `upscale_normalised` call, with throughput and load."""
    from sr3d import inference

    r = bundle.scale
    flops = stage_flops(lr.shape, r)
    ensemble = options.get("ensemble", False)
    work = 8 * flops["hw"] + 4 * flops["d"] if ensemble else flops["total"]
    with Meter() as meter:
        out = inference.upscale_normalised(lr, bundle, **options)
    voxels = inference.output_voxels(lr.shape, r)
    if out.size != voxels:
        raise RuntimeError(f"unexpected output shape {out.shape} for {lr.shape} x{r}")
    return {"label": label, "scale": r, "input_shape": list(lr.shape), "output_shape": list(out.shape),
            "options": {k: v for k, v in options.items() if k != "progress"},
            "seconds": meter.seconds, "output_voxels_per_s": voxels / meter.seconds,
            "conv_gflop": work / 1e9, "conv_gflops": work / meter.seconds / 1e9,
            "gflop_per_cpu_s": work / meter.record["cpu_seconds"] / 1e9, "load": meter.record}


def _best_time(fn, rounds: int) -> tuple[float, float]:
    """Best wall time of `rounds` calls, and the CPU-seconds of this process during that call."""
    best = (float("inf"), float("inf"))
    for _ in range(rounds):
        c0, t0 = _own_cpu_seconds(), time.perf_counter()
        fn()
        wall, cpu = time.perf_counter() - t0, _own_cpu_seconds() - c0
        if wall < best[0]:
            best = (wall, cpu)
    return best


def _rate(flops: float, wall_cpu: tuple[float, float], prefix: str = "") -> dict:
    wall, cpu = wall_cpu
    return {f"{prefix}seconds": wall, f"{prefix}cpu_seconds": cpu, f"{prefix}gflops": flops / wall / 1e9,
            f"{prefix}gflop_per_cpu_s": flops / max(cpu, 1e-9) / 1e9}


def _stage_planes(shape: tuple, scale: int, count: int) -> dict:
    """`count` random planes of the shape each stage sees for a (D, H, W) volume."""
    d, h, w = shape
    rng = np.random.default_rng(0)
    return {"hw": rng.random((count, h, w), dtype=np.float32),
            "d": rng.random((count, d, w * scale), dtype=np.float32)}


def _plane_flops(stage: str, plane_shape: tuple, scale: int) -> float:
    from sr3d import inference

    n, rows, cols = plane_shape
    if stage == "hw":
        return inference.conv_flops((n, rows, cols), scale, FILTERS, "2d")
    # n stage-d planes (D, rW) are the n = rH output rows of a (D, H, W) volume: the 3d total minus stage hw.
    shape = (rows, n / scale, cols / scale)
    return inference.conv_flops(shape, scale, FILTERS, "3d") - inference.conv_flops(shape, scale, FILTERS, "2d")


def batch_sweep(bundle, shape: tuple, sizes: Sizes) -> dict:
    """Per-stage throughput on the volume's plane shapes for each batch size (interleaved rounds)."""
    from sr3d import upscaling

    planes = _stage_planes(shape, bundle.scale, sizes.sweep_planes)
    stages = {(stage, b): upscaling._Stage(getattr(bundle, stage), b, False, stage)
              for stage in ("hw", "d") for b in sizes.batch_sizes}
    best = {key: (float("inf"), float("inf")) for key in stages}
    for key, run in stages.items():  # warm-up: tracing and oneDNN primitives
        run(planes[key[0]][: key[1]])
    with Meter() as meter:
        for _ in range(sizes.sweep_rounds):
            for key, run in stages.items():
                best[key] = min(best[key], _best_time(lambda: run(planes[key[0]]), 1))
    d, h, w = shape
    counts = {"hw": d, "d": h * bundle.scale}  # planes per stage in one volume
    rows = []
    for b in sizes.batch_sizes:
        row = {"batch_size": b}
        for stage in ("hw", "d"):
            row.update(_rate(_plane_flops(stage, planes[stage].shape, bundle.scale), best[(stage, b)],
                             f"{stage}_"))
        row["volume_seconds_estimate"] = sum(row[f"{s}_seconds"] / sizes.sweep_planes * counts[s]
                                             for s in ("hw", "d"))
        rows.append(row)
    best_row = min(rows, key=lambda row: row["volume_seconds_estimate"])
    return {"planes": sizes.sweep_planes, "plane_shapes": {s: list(p.shape[1:]) for s, p in planes.items()},
            "rounds": sizes.sweep_rounds, "rows": rows, "best_batch_size": best_row["batch_size"],
            "load": meter.record}


def calling_ways(bundle, shape: tuple, sizes: Sizes, batch_size: int) -> dict:
    """Same planes through the model called in different ways (interleaved rounds, best time)."""
    import tensorflow as tf

    from sr3d import upscaling

    planes = _stage_planes(shape, bundle.scale, sizes.sweep_planes)
    results = {}
    for stage in ("hw", "d"):
        model = getattr(bundle, stage)
        x = planes[stage]
        jit = tf.function(lambda t, m=model: m(t, training=False)["final"], jit_compile=True)
        ways = {
            "sr3d _Stage (tf.function, per batch)": upscaling._Stage(model, batch_size, False, stage),
            "tf.function jit_compile=True (XLA)": lambda p: np.concatenate(
                [jit(p[i:i + batch_size, ..., None]).numpy() for i in range(0, len(p), batch_size)]),
            "model.predict": lambda p, m=model: m.predict(p[..., None], batch_size=batch_size,
                                                          verbose=0)["final"],
        }
        best = {name: (float("inf"), float("inf")) for name in ways}
        for run in ways.values():
            run(x)
        for _ in range(sizes.sweep_rounds):
            for name, run in ways.items():
                best[name] = min(best[name], _best_time(lambda: run(x), 1))
        flops = _plane_flops(stage, x.shape, bundle.scale)
        results[stage] = [{"way": name, **_rate(flops, timing)} for name, timing in best.items()]
    return {"batch_size": batch_size, "planes": sizes.sweep_planes, "stages": results}


# ---------------------------------------------------------------------------- per-layer profile

def _conv_as_1x1(kernel, bias):
    """A 3x3 'same' conv as cheap dense work: few inputs -> shifted copies then 1x1; few outputs -> 1x1 then shifted sum."""
    import tensorflow as tf

    kh, kw, cin, cout = kernel.shape

    if cin <= cout:
        k = tf.reshape(kernel, (1, 1, kh * kw * cin, cout))

        def run(x):
            height, width = tf.shape(x)[1], tf.shape(x)[2]
            padded = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
            taps = tf.concat([padded[:, i:i + height, j:j + width, :] for i in range(kh) for j in range(kw)], -1)
            return tf.nn.conv2d(taps, k, 1, "VALID") + bias
    else:
        # (cin, taps * cout): output channel t * cout + c is tap t of output c.
        k = tf.reshape(tf.transpose(tf.reshape(kernel, (kh * kw, cin, cout)), (1, 0, 2)),
                       (1, 1, cin, kh * kw * cout))

        def run(x):
            height, width = tf.shape(x)[1], tf.shape(x)[2]
            y = tf.pad(tf.nn.conv2d(x, k, 1, "VALID"), [[0, 0], [1, 1], [1, 1], [0, 0]])
            out = bias
            for i in range(kh):
                for j in range(kw):
                    t = i * kw + j
                    out = out + y[:, i:i + height, j:j + width, t * cout:(t + 1) * cout]
            return out
    return run


def layer_profile(bundle, shape: tuple, sizes: Sizes) -> dict:
    """Time of every conv layer of both stages on one batch of the volume's planes."""
    import tensorflow as tf

    r = bundle.scale
    d, h, w = shape
    n = sizes.layer_batch
    geometry = {"hw": ((h, w), (h * r, w * r)), "d": ((d, w * r), (d * r, w * r))}
    rng = np.random.default_rng(0)
    out = {}
    for stage, (lr_hw, hr_hw) in geometry.items():
        model = getattr(bundle, stage)
        rows = []
        for index in range(1, 11):
            layer = model.get_layer(f"conv{index}")
            cin = layer.kernel.shape[2]
            spatial = lr_hw if index <= 6 else hr_hw
            x = tf.constant(rng.random((n,) + spatial + (cin,), dtype=np.float32))
            flops = 2.0 * 9 * cin * layer.filters * n * spatial[0] * spatial[1]
            keras_call = tf.function(lambda t, lay=layer: lay(t))
            reference = keras_call(x)
            row = {"layer": f"conv{index}", "in_channels": cin, "out_channels": layer.filters,
                   "spatial": list(spatial), "gflop": flops / 1e9,
                   **_rate(flops, _best_time(lambda: keras_call(x).numpy(), 1 + sizes.sweep_rounds))}
            if min(cin, layer.filters) < FILTERS:
                alt = tf.function(lambda t, f=_conv_as_1x1(layer.kernel, layer.bias), a=layer.activation: a(f(t)))
                row["alt_max_abs_diff"] = float(tf.reduce_max(tf.abs(alt(x) - reference)))
                row.update(_rate(flops, _best_time(lambda: alt(x).numpy(), 1 + sizes.sweep_rounds), "alt_"))
            rows.append(row)
        whole = tf.function(lambda t, m=model: m(t, training=False)["final"])
        x = tf.constant(rng.random((n,) + lr_hw + (1,), dtype=np.float32))
        whole(x)
        timing = _rate(_plane_flops(stage, (n,) + lr_hw, r),
                       _best_time(lambda: whole(x).numpy(), 1 + sizes.sweep_rounds), "model_")
        out[stage] = {"batch": n, "lr_plane": list(lr_hw), "hr_plane": list(hr_hw), "layers": rows, **timing,
                      "sum_conv_seconds": sum(row["seconds"] for row in rows),
                      "sum_conv_cpu_seconds": sum(row["cpu_seconds"] for row in rows)}
    return out


def stage_profile(lr: np.ndarray, bundle, batch_size: int) -> dict:
    """Whole-volume time of stage hw then stage d (untiled), as upscale_normalised runs them."""
    from sr3d import upscaling

    flops = stage_flops(lr.shape, bundle.scale)
    r = bundle.scale
    with Meter() as hw_meter:
        hw_out = upscaling._Stage(bundle.hw, batch_size, False, "hw")(lr)
    with Meter() as d_meter:
        planes = np.ascontiguousarray(hw_out.transpose(1, 0, 2))
        del hw_out
        upscaling._Stage(bundle.d, batch_size, False, "d")(planes)
    return {"batch_size": batch_size, "input_shape": list(lr.shape), "scale": r,
            **{stage: {"gflop": flops[stage] / 1e9, "load": meter.record,
                       **_rate(flops[stage], (meter.seconds, meter.record["cpu_seconds"]))}
               for stage, meter in (("hw", hw_meter), ("d", d_meter))}}


def time_lanczos(lr: np.ndarray, scale: int, rounds: int = 2) -> dict:
    from sr3d import baselines

    baselines.upscale(lr[:2, :8, :8], scale, "lanczos", "3d")
    with Meter() as meter:
        seconds, cpu_seconds = _best_time(lambda: baselines.upscale(lr, scale, "lanczos", "3d"), rounds)
    return {"input_shape": list(lr.shape), "scale": scale, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "rounds": rounds, "load": meter.record}


# ---------------------------------------------------------------------------- precision and I/O

CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
                "amx_int8")
PRECISIONS = ("float32", "bfloat16")
# End to end also times "auto", what `sr3d upscale` runs by default (its per-stage choice is recorded).
PIPELINE_PRECISIONS = PRECISIONS + ("auto",)


def cpu_features() -> dict:
    """The x86 features that matter for the convolutions, and what precision "auto" picks here."""
    from sr3d import precision

    flags = precision.cpu_flags()
    return {"found": [f for f in CPU_FEATURES if f in flags], "missing": [f for f in CPU_FEATURES if f not in flags],
            "native_bf16": precision.native_bf16(flags), "auto_resolves_to": precision.resolve("auto", flags)}


def conv_stack_rates(sizes: Sizes) -> dict:
    """float32 and bfloat16 rate of a raw stack of 3x3 32 -> 32 convolutions (tf.nn.conv2d + ReLU,
    oneDNN), interleaved rounds, best time: the hardware's ceiling for the networks' main layers."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    n, (h, w), layers = sizes.conv_batch, sizes.conv_plane, sizes.conv_layers
    x = rng.random((n, h, w, FILTERS), dtype=np.float32)
    kernels = [rng.standard_normal((3, 3, FILTERS, FILTERS), dtype=np.float32) * 0.06 for _ in range(layers)]
    flops = 2.0 * 9 * FILTERS * FILTERS * n * h * w * layers
    runs = {}
    for name, dtype in (("float32", tf.float32), ("bfloat16", tf.bfloat16)):
        xs, ks = tf.cast(x, dtype), [tf.cast(k, dtype) for k in kernels]

        @tf.function
        def stack(t, ks=ks):
            for k in ks:
                t = tf.nn.relu(tf.nn.conv2d(t, k, 1, "SAME"))
            return t

        stack(xs)
        runs[name] = (stack, xs)
    best = {name: (float("inf"), float("inf")) for name in runs}
    with Meter() as meter:
        for _ in range(sizes.sweep_rounds + 1):
            for name, (stack, xs) in runs.items():
                best[name] = min(best[name], _best_time(lambda: stack(xs).numpy(), 1))
    rates = {name: _rate(flops, timing) for name, timing in best.items()}
    return {"batch": n, "plane": [h, w], "layers": layers, "gflop": flops / 1e9, **rates,
            "bf16_speedup": rates["float32"]["seconds"] / rates["bfloat16"]["seconds"],
            "bf16_speedup_cpu": rates["float32"]["cpu_seconds"] / rates["bfloat16"]["cpu_seconds"],
            "load": meter.record}


def stage_precision_rates(bundle, shape: tuple, sizes: Sizes) -> dict:
    """Each stage network on the volume's planes (batch 8) in float32 and bfloat16, interleaved."""
    from sr3d import upscaling

    planes = _stage_planes(shape, bundle.scale, sizes.sweep_planes)
    stages = {(stage, p): upscaling._Stage(getattr(bundle, stage), 8, False, stage, p)
              for stage in ("hw", "d") for p in PRECISIONS}
    for (stage, _), run in stages.items():
        run(planes[stage][:2])
    best = {key: (float("inf"), float("inf")) for key in stages}
    for _ in range(sizes.sweep_rounds):
        for key, run in stages.items():
            best[key] = min(best[key], _best_time(lambda: run(planes[key[0]]), 1))
    out = {}
    for stage in ("hw", "d"):
        flops = _plane_flops(stage, planes[stage].shape, bundle.scale)
        out[stage] = {p: _rate(flops, best[(stage, p)]) for p in PRECISIONS}
        out[stage]["bf16_speedup"] = best[(stage, "float32")][0] / best[(stage, "bfloat16")][0]
    return {"planes": sizes.sweep_planes, "plane_shapes": {s: list(p.shape[1:]) for s, p in planes.items()},
            "stages": out}


def write_mr_scan(shape: tuple, directory: pathlib.Path) -> pathlib.Path:
    """The bundled real T1 resampled to `shape`, in its units, as the int16 .nii.gz a user would pass."""
    from sr3d import io as sr3d_io

    scan = sr3d_io.load_volume(MR_FILE)
    array = np.round(_resample(scan.array, shape))
    factors = np.array(scan.array.shape, float) / np.array(shape, float)
    affine = scan.affine.copy()
    affine[:3, :3] = scan.affine[:3, :3] * factors
    volume = sr3d_io.Volume(array.astype(np.float32), tuple(np.array(scan.spacing) * factors), affine,
                            source_dtype="int16")
    return sr3d_io.save_volume(volume, directory / "lr_input.nii.gz")


@contextlib.contextmanager
def _gzip_level(level: int):
    """nibabel's gzip level for files it writes (its default is 1)."""
    import nibabel as nib

    default = nib.openers.Opener.default_compresslevel
    nib.openers.Opener.default_compresslevel = level
    try:
        yield
    finally:
        nib.openers.Opener.default_compresslevel = default


def pipeline_runs(path: pathlib.Path, bundle, rounds: int, out_dir: pathlib.Path) -> dict:
    """`sr3d upscale`'s work in three timed parts (load the scan, upscale_volume, save_volume .nii.gz),
    float32, bfloat16 and auto interleaved for `rounds` rounds; the fastest round of each is kept. The
    first round also writes the output as .nii (uncompressed) and as .nii.gz at gzip level 6."""
    from sr3d import inference
    from sr3d import io as sr3d_io
    from sr3d import precision as sr3d_precision

    best: dict = {}
    writes = {}
    for index in range(rounds):
        for precision in PIPELINE_PRECISIONS:
            with Meter() as load:
                volume = sr3d_io.load_volume(path)
            with Meter() as compute:
                result = inference.upscale_volume(volume, bundle, batch_size=8, tile_mb=256, precision=precision)
            target = out_dir / f"out_{precision}.nii.gz"
            with Meter() as write:
                sr3d_io.save_volume(result, target)
            row = {"load": load.record, "compute": compute.record, "write": write.record,
                   "output_shape": list(result.array.shape), "output_dtype": result.source_dtype,
                   "file_mb": target.stat().st_size / MIB}
            row["total_seconds"] = sum(row[part]["seconds"] for part in ("load", "compute", "write"))
            row["total_cpu_seconds"] = sum(row[part]["cpu_seconds"] for part in ("load", "compute", "write"))
            if precision not in best or row["total_seconds"] < best[precision]["total_seconds"]:
                best[precision] = row
            if index == 0 and precision == "float32":
                for label, name, level in (("nii.gz, gzip level 1 (nibabel default)", "w1.nii.gz", 1),
                                           ("nii.gz, gzip level 6", "w6.nii.gz", 6),
                                           ("nii, uncompressed", "w0.nii", None)):
                    with _gzip_level(level or 1), Meter() as meter:
                        sr3d_io.save_volume(result, out_dir / name)
                    writes[label] = {**meter.record, "file_mb": (out_dir / name).stat().st_size / MIB}
                    (out_dir / name).unlink()
            target.unlink()
            del result, volume
    for row in best.values():
        for part in ("load", "compute", "write"):
            row[f"{part}_share"] = row[part]["seconds"] / row["total_seconds"]
    return {"input": str(path.name), "input_mb": path.stat().st_size / MIB, "rounds": rounds, "best": best,
            "bf16_speedup_compute": best["float32"]["compute"]["seconds"] / best["bfloat16"]["compute"]["seconds"],
            "bf16_speedup_total": best["float32"]["total_seconds"] / best["bfloat16"]["total_seconds"],
            "bf16_speedup_compute_cpu": (best["float32"]["compute"]["cpu_seconds"]
                                         / best["bfloat16"]["compute"]["cpu_seconds"]),
            "auto_stage_precisions": dict(zip(("hw", "d"), sr3d_precision.stage_precisions("auto", bundle.scale))),
            "auto_speedup_total": best["float32"]["total_seconds"] / best["auto"]["total_seconds"],
            "auto_speedup_total_cpu": best["float32"]["total_cpu_seconds"] / best["auto"]["total_cpu_seconds"],
            "writes": writes}


# ---------------------------------------------------------------------------- memory

def _status_kb(field: str, pid: str = "self") -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _mem_available_kb() -> int:
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


def memory_child(shape: tuple, tile_mb: float | None, batch_size: int) -> dict:
    """Runs in a subprocess: peak RSS while upscaling a CT-like volume 2x (VmHWM reset before)."""
    from sr3d import inference, upscaling

    bundle, model_source = model_bundle(2)
    inference.upscale_normalised(np.zeros((4, 8, 8), np.float32), bundle, batch_size=batch_size)
    lr, source = ct_volume(shape)
    rss_before_kb = _status_kb("VmRSS")
    # Writing 5 to clear_refs resets the peak (VmHWM) to the current RSS (Linux >= 4.0).
    pathlib.Path("/proc/self/clear_refs").write_text("5")
    with Meter() as meter:
        out = inference.upscale_normalised(lr, bundle, batch_size=batch_size, tile_mb=tile_mb)
    peak_kb = _status_kb("VmHWM")
    return {"input_shape": list(shape), "output_shape": list(out.shape), "tile_mb": tile_mb,
            "batch_size": batch_size, "source": source, "model": model_source,
            "rows_per_band": upscaling._band_rows(shape, 2, tile_mb, "3d", ensemble=False),
            "input_mib": lr.nbytes / MIB, "output_mib": out.nbytes / MIB,
            "rss_before_mib": rss_before_kb / 1024, "peak_during_mib": peak_kb / 1024,
            "process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds": meter.seconds, "conv_gflops": stage_flops(shape, 2)["total"] / meter.seconds / 1e9,
            "gflop_per_cpu_s": stage_flops(shape, 2)["total"] / meter.record["cpu_seconds"] / 1e9,
            "load": meter.record}


def activation_child(stage: str, rows: int, cols: int, batch_size: int) -> dict:
    """Runs in a subprocess: peak RSS of one batch of (rows, cols) planes through one stage network."""
    from sr3d import upscaling

    bundle, _ = model_bundle(2)
    run = upscaling._Stage(getattr(bundle, stage), batch_size, False, stage)
    run(np.zeros((1, 8, 8), np.float32))
    planes = np.random.default_rng(0).random((batch_size, rows, cols), dtype=np.float32)
    rss_before_kb = _status_kb("VmRSS")
    pathlib.Path("/proc/self/clear_refs").write_text("5")
    out = run(planes)
    peak_kb = _status_kb("VmHWM")
    hr_tensor = batch_size * out.shape[1] * out.shape[2] * FILTERS * 4
    return {"stage": stage, "plane": [rows, cols], "batch_size": batch_size,
            "peak_minus_before_mib": (peak_kb - rss_before_kb) / 1024, "output_mib": out.nbytes / MIB,
            "hr_32_channel_tensor_mib": hr_tensor / MIB}


def activation_runs(sizes: Sizes, concurrent: bool = False) -> list[dict]:
    """Peak memory of one stage-d batch on the big volume's (D, rW) planes, per batch size.

    concurrent: start all subprocesses at once (the smoke run, where memory is small).
    """
    d, _, w = sizes.big_volume

    def start(batch_size: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, __file__, "--activation-child", "d", str(d), str(2 * w),
                                 str(batch_size)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(batch_size: int, proc: subprocess.Popen) -> dict:
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            return {"batch_size": batch_size, "failed": stderr.strip()[-500:]}
        return json.loads(stdout.strip().splitlines()[-1])

    if concurrent:
        procs = [(b, start(b)) for b in sizes.batch_sizes]
        return [finish(b, proc) for b, proc in procs]
    return [finish(b, start(b)) for b in sizes.batch_sizes]


def _start_memory_child(shape: tuple, tile_mb: float | None, batch_size: int) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--memory-child", *map(str, shape),
           "none" if tile_mb is None else str(tile_mb), str(batch_size)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_memory_child(shape: tuple, tile_mb: float | None, batch_size: int, limit_gb: float,
                     proc: subprocess.Popen | None = None) -> dict:
    """Starts `memory_child` in a subprocess (unless given) and watches its RSS; kills it above `limit_gb`."""
    proc = proc or _start_memory_child(shape, tile_mb, batch_size)
    watched_kb, reason = 0, None
    while proc.poll() is None:
        try:
            rss_kb = _status_kb("VmRSS", str(proc.pid))
        except (FileNotFoundError, ProcessLookupError):
            break
        watched_kb = max(watched_kb, rss_kb)
        if rss_kb > limit_gb * 1e6 or _mem_available_kb() < 1.5e6:
            reason = f"killed at RSS {rss_kb / 1e6:.1f} GB (limit {limit_gb} GB or < 1.5 GB left)"
            proc.kill()
            break
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    if reason is not None:
        return {"input_shape": list(shape), "tile_mb": tile_mb, "failed": reason,
                "watched_peak_mib": watched_kb / 1024}
    if proc.returncode != 0:
        return {"input_shape": list(shape), "tile_mb": tile_mb,
                "failed": f"exit {proc.returncode}: {stderr.strip()[-500:]}"}
    result = json.loads(stdout.strip().splitlines()[-1])
    result["watched_peak_mib"] = watched_kb / 1024
    return result


def memory_runs(sizes: Sizes, batch_size: int, concurrent: bool = False) -> list[dict]:
    """Tiled then untiled at the big size; untiled again at half depth if it had to be stopped.

    concurrent: start both subprocesses at once (the smoke run, where memory is small).
    """
    shape = sizes.big_volume
    second = _start_memory_child(shape, None, batch_size) if concurrent else None
    runs = [run_memory_child(shape, sizes.tile_mb, batch_size, sizes.rss_limit_gb)]
    untiled = run_memory_child(shape, None, batch_size, sizes.rss_limit_gb, second)
    runs.append(untiled)
    if "failed" in untiled:
        smaller = (shape[0] // 2,) + tuple(shape[1:])
        runs.append(run_memory_child(smaller, None, batch_size, sizes.rss_limit_gb))
    return runs


# ---------------------------------------------------------------------------- report

def _fmt(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def references(result: dict) -> dict:
    """Matmul rates the CNN is compared with: best over the start and end runs.

    The per-core reference is the single-threaded wall rate: OpenBLAS's idle worker threads
    spin, so its CPU-seconds overstate the work.
    """
    mm = result["matmul"]
    runs = [mm[when] for when in ("start", "end")]

    def best(env: str, key: str, one_thread: bool) -> float:
        values = [(run[env]["one_thread"] if one_thread else run[env])[key]
                  for run in runs if not one_thread or "one_thread" in run[env]]
        return max(values) if values else float("nan")

    return {"wall_gflops": best("env_as_is", "gflops", False),
            "wall_gflops_env_unset": best("openblas_env_unset", "gflops", False),
            "per_cpu_s": best("env_as_is", "gflops", True),
            "per_cpu_s_env_unset": best("openblas_env_unset", "gflops", True)}


def _matmul_lines(result: dict) -> list[str]:
    lines = ["| run | n | threads | GFLOP/s (best) | GFLOP/s (median) | GFLOP per CPU-s | OpenBLAS core "
             "| own cores | other cores |", "|---|---|---|---|---|---|---|---|---|"]
    for when in ("start", "end"):
        for env, run in result["matmul"][when].items():
            for threads, row in ((run.get("runtime_threads"), run), (1, run.get("one_thread"))):
                if row is None:
                    continue
                lines.append(f"| {when}, {env} | {run['n']} | {threads} | {_fmt(row['gflops'])} "
                             f"| {_fmt(row['median_gflops'])} | {_fmt(row['gflop_per_cpu_s'])} "
                             f"| {run.get('runtime_corename')} | {row['load']['own_cores']:.2f} "
                             f"| {row['load']['other_cores']:.2f} |")
    return lines


def _summary_lines(result: dict, ref: dict) -> list[str]:
    main = result["cnn"][0]
    nproc = result["machine"]["nproc"]
    lines = ["## Against the spec targets (numbers only; see docs/benchmarks.md for the reading)", "",
             f"- Conv FLOP/s vs matmul (target >= {TARGET_MATMUL_RATIO:.0%}): main 2x run "
             f"{_fmt(main['conv_gflops'])} GFLOP/s wall = {main['conv_gflops'] / ref['wall_gflops']:.2f} of "
             f"matmul {_fmt(ref['wall_gflops'])}; per CPU-second {_fmt(main['gflop_per_cpu_s'])} = "
             f"{main['gflop_per_cpu_s'] / ref['per_cpu_s']:.2f} of 1-thread matmul {_fmt(ref['per_cpu_s'])} GFLOP/s "
             f"(env as is), {main['gflop_per_cpu_s'] / ref['per_cpu_s_env_unset']:.2f} of "
             f"{_fmt(ref['per_cpu_s_env_unset'])} (OpenBLAS env unset).",
             f"- {tuple(main['input_shape'])} -> {tuple(main['output_shape'])} (target about "
             f"{TARGET_SECONDS:.0f} s): {_fmt(main['seconds'])} s wall with {main['load']['own_cores']:.2f} "
             f"of {nproc} cores obtained; {_fmt(main['load']['cpu_seconds'])} CPU-s, i.e. "
             f"{_fmt(main['load']['cpu_seconds'] / nproc)} s if {nproc} cores were free and scaled perfectly.",
             ]
    if "pipeline" in result:
        pipe, auto = result["pipeline"], result["cpu_features"]["auto_resolves_to"]
        lines.append(f"- bfloat16 (issue 15, target: auto >= 1.6x float32 end to end where the CPU has bf16): "
                     f"auto is {auto} here; bfloat16 / float32 = {pipe['bf16_speedup_total']:.2f}x end to end "
                     f"(load + compute + write), {pipe['bf16_speedup_compute']:.2f}x compute.")
    tiled = [row for row in result["memory"] if row.get("tile_mb") is not None and "failed" not in row]
    for row in tiled:
        extra = row["peak_during_mib"] - row["rss_before_mib"] - row["output_mib"]
        lines.append(f"- Memory (bounded by output + tile budget): {tuple(row['input_shape'])} x2, tile_mb "
                     f"{row['tile_mb']:g}: peak during upscaling {_fmt(row['peak_during_mib'], 0)} MiB = RSS "
                     f"before {_fmt(row['rss_before_mib'], 0)} + output {_fmt(row['output_mib'], 0)} + "
                     f"{_fmt(extra, 0)} MiB.")
    return lines + [""]


def markdown(result: dict) -> str:
    m = result["machine"]
    ref = references(result)
    nproc = m["nproc"]
    lines = [
        "# sr3d inference benchmark",
        "",
        f"Generated by `{result['command']}` on {result['started']} ({result['total_minutes']:.1f} min).",
        f"Machine: {nproc} cores, {m['cpu_model']}, {m['memory_total_gb']:.0f} GB; "
        f"TensorFlow {m['tensorflow']}, Keras {m['keras']}, numpy {m['numpy']}, "
        f"BLAS {m['numpy_blas'].get('build', {}).get('name', '?')} "
        f"(runtime core {m['numpy_blas'].get('runtime_corename', '?')}). "
        f"Env: {', '.join(f'{k}={v}' for k, v in m['env'].items() if v is not None) or 'none set'}.",
        f"Models: x2 {result['models']['x2']}; x4 {result['models']['x4']}. Volume: {result['volume_source']}.",
        "",
        f"Load average (1, 5, 15 min) before: {[round(v, 1) for v in result['load_before']['loadavg_1_5_15']]}, "
        f"after: {[round(v, 1) for v in result['load_after']['loadavg_1_5_15']]}. `own cores` = CPU-seconds of "
        f"this benchmark per second, `other cores` = of every other process (out of {nproc}). "
        "`GFLOP per CPU-s` divides by this process's CPU time instead of wall time: it barely depends on "
        "the other processes.",
        "",
    ]
    lines += _summary_lines(result, ref)
    lines += ["## numpy float32 matmul (a @ b)", ""] + _matmul_lines(result)
    lines += ["", f"References for the ratios: {_fmt(ref['wall_gflops'])} GFLOP/s wall (env as is, best), "
              f"{_fmt(ref['per_cpu_s'])} GFLOP/s single-threaded (env as is; the per-core rate), "
              f"{_fmt(ref['per_cpu_s_env_unset'])} with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset.", "",
              "## CNN inference (`upscale_normalised`, no ensemble unless said)", "",
              "| run | input (D, H, W) | output | batch | tile_mb | s | CPU-s | Mvoxel/s | conv GFLOP/s "
              "| / matmul | GFLOP per CPU-s | / 1-thread matmul | own cores | other cores |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["cnn"]:
        o = row["options"]
        lines.append(
            f"| {row['label']} | {tuple(row['input_shape'])} | {tuple(row['output_shape'])} | {o.get('batch_size')} "
            f"| {o.get('tile_mb')} | {_fmt(row['seconds'])} | {_fmt(row['load']['cpu_seconds'])} "
            f"| {_fmt(row['output_voxels_per_s'] / 1e6, 2)} | {_fmt(row['conv_gflops'])} "
            f"| {row['conv_gflops'] / ref['wall_gflops']:.2f} | {_fmt(row['gflop_per_cpu_s'])} "
            f"| {row['gflop_per_cpu_s'] / ref['per_cpu_s']:.2f} | {row['load']['own_cores']:.2f} "
            f"| {row['load']['other_cores']:.2f} |")
    lan, lan4 = result["lanczos"], result["lanczos_small"]
    main = result["cnn"][0]
    by_label = {row["label"]: row for row in result["cnn"]}
    plain, ens, x4 = (by_label[k] for k in (SMALL_2X, SMALL_ENSEMBLE, SMALL_4X))
    lines += ["", "Self-ensemble counts 8x the stage-hw and 4x the stage-d FLOPs.", "",
              f"Lanczos (`sr3d.baselines.upscale(lr, r, 'lanczos', '3d')`, OpenCV): 2x on "
              f"{tuple(lan['input_shape'])} {_fmt(lan['seconds'], 2)} s ({_fmt(lan['cpu_seconds'], 2)} CPU-s), "
              f"CNN / Lanczos = {main['seconds'] / lan['seconds']:.0f}x in wall time, "
              f"{main['load']['cpu_seconds'] / lan['cpu_seconds']:.0f}x in CPU time; 4x on "
              f"{tuple(lan4['input_shape'])} {_fmt(lan4['seconds'], 2)} s, CNN / Lanczos = "
              f"{x4['seconds'] / lan4['seconds']:.0f}x (wall), {x4['load']['cpu_seconds'] / lan4['cpu_seconds']:.0f}x "
              "(CPU).",
              f"Self-ensemble / plain on {tuple(plain['input_shape'])}: {ens['seconds'] / plain['seconds']:.1f}x "
              f"wall, {ens['load']['cpu_seconds'] / plain['load']['cpu_seconds']:.1f}x CPU "
              f"(FLOP ratio {ens['conv_gflop'] / plain['conv_gflop']:.1f}x).", ""]
    lines += _precision_lines(result)
    sp = result["stage_profile"]
    lines += [f"## Per stage (whole volume {tuple(sp['input_shape'])}, untiled, batch {sp['batch_size']})", "",
              "| stage | GFLOP | s | CPU-s | GFLOP/s | GFLOP per CPU-s | share of CPU time |",
              "|---|---|---|---|---|---|---|"]
    total_cpu = sp["hw"]["cpu_seconds"] + sp["d"]["cpu_seconds"]
    for stage in ("hw", "d"):
        st = sp[stage]
        lines.append(f"| {stage} | {_fmt(st['gflop'])} | {_fmt(st['seconds'])} | {_fmt(st['cpu_seconds'])} "
                     f"| {_fmt(st['gflops'])} | {_fmt(st['gflop_per_cpu_s'])} "
                     f"| {st['cpu_seconds'] / total_cpu:.0%} |")
    lines += ["", "## Per layer (one batch of the volume's planes, each layer alone)", ""]
    for stage, prof in result["layer_profile"].items():
        lines += [f"Stage {stage}: batch {prof['batch']}, LR plane {tuple(prof['lr_plane'])}, HR plane "
                  f"{tuple(prof['hr_plane'])}; whole model {_fmt(prof['model_seconds'], 3)} s, "
                  f"{_fmt(prof['model_cpu_seconds'], 3)} CPU-s ({_fmt(prof['model_gflop_per_cpu_s'])} GFLOP "
                  f"per CPU-s); conv layers alone sum to {_fmt(prof['sum_conv_cpu_seconds'], 3)} CPU-s. "
                  "Last columns: the same layer as a 1x1 convolution plus shifted copies (few input "
                  "channels) or shifted sums (few output channels), a possible faster formulation.", "",
                  "| layer | in -> out | GFLOP | s | CPU-s | share of conv CPU | GFLOP per CPU-s "
                  "| 1x1 form CPU-s | 1x1 form GFLOP per CPU-s | max abs diff |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in prof["layers"]:
            alt = (f"{_fmt(row['alt_cpu_seconds'], 3)} | {_fmt(row['alt_gflop_per_cpu_s'])} "
                   f"| {row['alt_max_abs_diff']:.1e}" if "alt_seconds" in row else " | | ")
            lines.append(f"| {row['layer']} | {row['in_channels']} -> {row['out_channels']} | {_fmt(row['gflop'])} "
                         f"| {_fmt(row['seconds'], 3)} | {_fmt(row['cpu_seconds'], 3)} "
                         f"| {row['cpu_seconds'] / prof['sum_conv_cpu_seconds']:.0%} "
                         f"| {_fmt(row['gflop_per_cpu_s'])} | {alt} |")
        lines.append("")
    sw = result["batch_sweep"]
    lines += [f"## Batch size (each stage on {sw['planes']} planes of the volume, best of {sw['rounds']} "
              "interleaved rounds)", "",
              "| batch | hw s | hw GFLOP/s | hw GFLOP per CPU-s | d s | d GFLOP/s | d GFLOP per CPU-s "
              "| volume estimate s |", "|---|---|---|---|---|---|---|---|"]
    for row in sw["rows"]:
        lines.append(f"| {row['batch_size']} | {_fmt(row['hw_seconds'], 2)} | {_fmt(row['hw_gflops'])} "
                     f"| {_fmt(row['hw_gflop_per_cpu_s'])} | {_fmt(row['d_seconds'], 2)} | {_fmt(row['d_gflops'])} "
                     f"| {_fmt(row['d_gflop_per_cpu_s'])} | {_fmt(row['volume_seconds_estimate'])} |")
    ways = result["calling_ways"]
    lines += ["", f"Best batch size by wall time: {sw['best_batch_size']}.", "",
              f"## Ways of calling the model (batch {ways['batch_size']}, {ways['planes']} planes)", "",
              "| stage | way | s | GFLOP/s | GFLOP per CPU-s |", "|---|---|---|---|---|"]
    for stage, rows in ways["stages"].items():
        for row in rows:
            lines.append(f"| {stage} | {row['way']} | {_fmt(row['seconds'], 2)} | {_fmt(row['gflops'])} "
                         f"| {_fmt(row['gflop_per_cpu_s'])} |")
    lines += _memory_lines(result)
    return "\n".join(lines) + "\n"


def _precision_lines(result: dict) -> list[str]:
    """The bf16 section: CPU features, raw conv rates, per-stage and end-to-end float32 vs bfloat16."""
    if "pipeline" not in result:
        return []
    cpu, conv, pipe = result["cpu_features"], result["conv_stack"], result["pipeline"]
    lan = result["lanczos"]
    lines = ["## float32 vs bfloat16 (`precision=`), and load / compute / write", "",
             f"CPU features found: {', '.join(cpu['found']) or 'none'}; missing: {', '.join(cpu['missing']) or 'none'}. "
             f"Native bf16: {', '.join(cpu['native_bf16']) or 'none'}, so `precision='auto'` resolves to "
             f"**{cpu['auto_resolves_to']}** on this machine.", "",
             f"Raw stack of {conv['layers']} 3x3 {FILTERS} -> {FILTERS} convolutions (tf.nn.conv2d + ReLU), batch "
             f"{conv['batch']} of {tuple(conv['plane'])}, best of interleaved rounds:", "",
             "| dtype | s | CPU-s | GFLOP/s | GFLOP per CPU-s |", "|---|---|---|---|---|"]
    for name in PRECISIONS:
        row = conv[name]
        lines.append(f"| {name} | {_fmt(row['seconds'], 3)} | {_fmt(row['cpu_seconds'], 3)} | {_fmt(row['gflops'])} "
                     f"| {_fmt(row['gflop_per_cpu_s'])} |")
    lines += ["", f"bf16 / float32 speed: {conv['bf16_speedup']:.2f}x wall, {conv['bf16_speedup_cpu']:.2f}x CPU.", ""]
    sp = result["stage_precision"]
    lines += [f"Stage networks on {sp['planes']} planes of the volume (batch 8, best of interleaved rounds):", "",
              "| stage | plane | float32 s | float32 GFLOP/s | bfloat16 s | bfloat16 GFLOP/s | bf16 speedup |",
              "|---|---|---|---|---|---|---|"]
    for stage, row in sp["stages"].items():
        lines.append(f"| {stage} | {tuple(sp['plane_shapes'][stage])} | {_fmt(row['float32']['seconds'], 2)} "
                     f"| {_fmt(row['float32']['gflops'])} | {_fmt(row['bfloat16']['seconds'], 2)} "
                     f"| {_fmt(row['bfloat16']['gflops'])} | {row['bf16_speedup']:.2f}x |")
    lines += ["", f"End to end as `sr3d upscale` does it: load `{pipe['input']}` ({_fmt(pipe['input_mb'])} MiB, int16), "
              "`upscale_volume` (2x 3D, batch 8, tile_mb 256), `save_volume` to .nii.gz; float32, bfloat16 and "
              f"auto interleaved, fastest of {pipe['rounds']} rounds each:", "",
              "| precision | load s | compute s | write s | total s | shares load / compute / write | compute CPU-s "
              "| CNN / Lanczos CPU | own cores | other cores |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in PIPELINE_PRECISIONS:
        if name not in pipe["best"]:  # runs recorded before auto was timed
            continue
        row = pipe["best"][name]
        lines.append(f"| {name} | {_fmt(row['load']['seconds'], 2)} | {_fmt(row['compute']['seconds'])} "
                     f"| {_fmt(row['write']['seconds'], 2)} | {_fmt(row['total_seconds'])} "
                     f"| {row['load_share']:.0%} / {row['compute_share']:.0%} / {row['write_share']:.0%} "
                     f"| {_fmt(row['compute']['cpu_seconds'])} "
                     f"| {row['compute']['cpu_seconds'] / lan['cpu_seconds']:.0f}x "
                     f"| {row['compute']['own_cores']:.2f} | {row['compute']['other_cores']:.2f} |")
    lines += ["", f"**bfloat16 / float32: {pipe['bf16_speedup_total']:.2f}x end to end, "
              f"{pipe['bf16_speedup_compute']:.2f}x for the compute part ({pipe['bf16_speedup_compute_cpu']:.2f}x in "
              "CPU-s)** (target: auto >= 1.6x end to end where the CPU has bf16).", ""]
    if "auto_speedup_total" in pipe:
        stages = pipe["auto_stage_precisions"]
        lines += [f"**auto / float32: {pipe['auto_speedup_total']:.2f}x end to end "
                  f"({pipe['auto_speedup_total_cpu']:.2f}x in CPU-s)**; auto ran stage hw in {stages['hw']} and "
                  f"stage d in {stages['d']}.", ""]
    lines += ["Writing the float32 run's output another way (same volume):", "",
              "| format | s | CPU-s | file MiB |", "|---|---|---|---|"]
    for label, row in pipe["writes"].items():
        lines.append(f"| {label} | {_fmt(row['seconds'], 2)} | {_fmt(row['cpu_seconds'], 2)} | {_fmt(row['file_mb'])} |")
    return lines + [""]


def _memory_lines(result: dict) -> list[str]:
    if not result["memory"]:
        return ["", "Memory runs skipped (--skip-memory).", ""]
    lines = ["", "## Peak memory, CT-like volume at 2x (one subprocess per run)", ""]
    if "memory_reused_from" in result:
        lines += [f"Reused from an earlier run of this script: {result['memory_reused_from']}.", ""]
    lines += ["| input (D, H, W) | tile_mb | rows/band | input MiB | output MiB | RSS before MiB "
              "| peak during MiB | peak - before - output MiB | s | conv GFLOP/s | GFLOP per CPU-s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["memory"]:
        if "failed" in row:
            lines.append(f"| {tuple(row['input_shape'])} | {row['tile_mb']} | {row['failed']} | | | | | | | | |")
            continue
        extra = row["peak_during_mib"] - row["rss_before_mib"] - row["output_mib"]
        per_cpu = row.get("gflop_per_cpu_s", stage_flops(tuple(row["input_shape"]), 2)["total"]
                          / row["load"]["cpu_seconds"] / 1e9)
        lines.append(f"| {tuple(row['input_shape'])} | {row['tile_mb']} | {row['rows_per_band']} "
                     f"| {_fmt(row['input_mib'], 0)} | {_fmt(row['output_mib'], 0)} "
                     f"| {_fmt(row['rss_before_mib'], 0)} | {_fmt(row['peak_during_mib'], 0)} "
                     f"| {_fmt(extra, 0)} | {_fmt(row['seconds'], 0)} | {_fmt(row['conv_gflops'])} "
                     f"| {_fmt(per_cpu)} |")
    lines += ["", f"Source: {result['memory'][0].get('source', '?')}; models: "
              f"{sorted({row.get('model', '?') for row in result['memory']})}.", ""]
    acts = result.get("activations", [])
    if acts:
        lines += ["Peak memory of ONE stage-d batch on the big volume's (D, rW) planes (subprocess per row): "
                  "TensorFlow's activations, which `tile_mb` does not limit.", "",
                  "| batch | plane | peak - before MiB | one 32-channel HR tensor MiB | output MiB |",
                  "|---|---|---|---|---|"]
        for row in acts:
            if "failed" in row:
                lines.append(f"| {row['batch_size']} | failed: {row['failed'][-120:]} | | | |")
                continue
            lines.append(f"| {row['batch_size']} | {tuple(row['plane'])} | {_fmt(row['peak_minus_before_mib'], 0)} "
                         f"| {_fmt(row['hr_32_channel_tensor_mib'], 0)} | {_fmt(row['output_mib'], 0)} |")
        lines.append("")
    return lines


def _log(what: str, started: float) -> None:
    print(f"[{time.perf_counter() - started:7.1f} s] {what} ...", flush=True)



def _lanczos_and_precision(result: dict, lr, bundle, sizes, started: float) -> None:
    """The Lanczos timing and the precision section (conv stack, stages, load/compute/write),
    shared by the full run and --precision-only."""
    _log("Lanczos", started)
    result["lanczos"] = time_lanczos(lr, 2)
    _log("precision: conv stack, stages, load/compute/write pipeline", started)
    result["cpu_features"] = cpu_features()
    result["conv_stack"] = conv_stack_rates(sizes)
    result["stage_precision"] = stage_precision_rates(bundle, sizes.volume, sizes)
    with tempfile.TemporaryDirectory() as tmp:
        scan = write_mr_scan(sizes.volume, pathlib.Path(tmp))
        result["pipeline"] = pipeline_runs(scan, bundle, sizes.pipeline_rounds, pathlib.Path(tmp))

def run_precision(sizes: Sizes, out_dir: pathlib.Path, command: str) -> dict:
    """Only the float32 vs bfloat16 part (with matmul and Lanczos for the ratios): `--precision-only`,
    for a quick check of a CPU; writes precision.json and precision.md, not inference.*."""
    started = time.perf_counter()
    result: dict = {"command": command, "started": datetime.datetime.now().isoformat(timespec="seconds"),
                    "sizes": dataclasses.asdict(sizes), "load_before": load_snapshot()}
    _log("matmul", started)
    result["matmul"] = {"start": matmul_both(sizes)}
    result["machine"] = machine_info()
    bundle, result["models"] = model_bundle(2)
    lr, result["volume_source"] = mr_volume(sizes.volume)

    from sr3d import inference

    for precision in PRECISIONS:
        inference.upscale_normalised(lr[:4, :16, :16], bundle, precision=precision)
    _lanczos_and_precision(result, lr, bundle, sizes, started)
    _log("matmul", started)
    result["matmul"]["end"] = matmul_both(sizes)
    result["load_after"] = load_snapshot()
    result["total_minutes"] = (time.perf_counter() - started) / 60
    m, ref = result["machine"], references(result)
    lines = ["# sr3d inference benchmark: float32 vs bfloat16", "",
             f"Generated by `{command}` on {result['started']} ({result['total_minutes']:.1f} min). Machine: "
             f"{m['nproc']} cores, {m['cpu_model']}; TensorFlow {m['tensorflow']}, Keras {m['keras']}. Models: x2 "
             f"{result['models']}. Volume: {result['volume_source']}.", "",
             f"Load average (1, 5, 15 min) before: {[round(v, 1) for v in result['load_before']['loadavg_1_5_15']]}, "
             f"after: {[round(v, 1) for v in result['load_after']['loadavg_1_5_15']]}; busiest processes before: "
             f"{'; '.join(result['load_before']['top_processes'][:3])}.", ""]
    lines += _precision_lines(result)
    lines += ["## numpy float32 matmul (a @ b)", ""] + _matmul_lines(result)
    lines += ["", f"References: {_fmt(ref['wall_gflops'])} GFLOP/s wall (env as is), {_fmt(ref['per_cpu_s'])} "
              f"single-threaded, {_fmt(ref['wall_gflops_env_unset'])} wall with OPENBLAS_CORETYPE / "
              "OPENBLAS_L2_SIZE unset.", ""]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "precision.json").write_text(json.dumps(result, indent=2, default=str))
    (out_dir / "precision.md").write_text("\n".join(lines) + "\n")
    return result


def run(sizes: Sizes, out_dir: pathlib.Path, command: str, skip_memory: bool,
        reuse_memory: pathlib.Path | None) -> dict:
    started = time.perf_counter()
    result: dict = {"command": command, "started": datetime.datetime.now().isoformat(timespec="seconds"),
                    "sizes": dataclasses.asdict(sizes), "load_before": load_snapshot()}
    _log("matmul", started)
    result["matmul"] = {"start": matmul_both(sizes)}
    result["machine"] = machine_info()
    bundle2, source2 = model_bundle(2)
    bundle4, source4 = model_bundle(4)
    result["models"] = {"x2": source2, "x4": source4}
    lr, result["volume_source"] = mr_volume(sizes.volume)
    small, _ = mr_volume(sizes.small_volume)

    from sr3d import inference

    for bundle in (bundle2, bundle4):  # warm-up: TensorFlow kernels, oneDNN, the bf16 copies
        for precision in PRECISIONS:
            inference.upscale_normalised(small[:4, :16, :16], bundle, precision=precision)
    _log("batch sweep", started)
    result["batch_sweep"] = batch_sweep(bundle2, sizes.volume, sizes)
    _log("calling ways", started)
    result["calling_ways"] = calling_ways(bundle2, sizes.volume, sizes, 8)
    _log("layer profile", started)
    result["layer_profile"] = layer_profile(bundle2, sizes.volume, sizes)

    _log("CNN 2x", started)
    cnn = [time_upscale(lr, bundle2, "2x 3D, default options", batch_size=8, tile_mb=256)]
    sweep = {row["batch_size"]: row["volume_seconds_estimate"] for row in result["batch_sweep"]["rows"]}
    best_batch = result["batch_sweep"]["best_batch_size"]
    if 8 in sweep and sweep[best_batch] < 0.9 * sweep[8]:  # only a clear win is worth a second full run
        cnn.append(time_upscale(lr, bundle2, f"2x 3D, best sweep batch {best_batch}",
                                batch_size=best_batch, tile_mb=256))
    _log("stage profile", started)
    result["stage_profile"] = stage_profile(lr, bundle2, 8)
    _lanczos_and_precision(result, lr, bundle2, sizes, started)
    _log("ensemble and 4x", started)
    cnn.append(time_upscale(small, bundle2, SMALL_2X, batch_size=8, tile_mb=256))
    cnn.append(time_upscale(small, bundle2, SMALL_ENSEMBLE, batch_size=8, tile_mb=256, ensemble=True))
    cnn.append(time_upscale(small, bundle4, SMALL_4X, batch_size=8, tile_mb=256))
    result["cnn"] = cnn
    result["lanczos_small"] = time_lanczos(small, 4)
    del lr, small

    result["memory"], result["activations"] = [], []
    if reuse_memory is not None:
        previous = json.loads(reuse_memory.read_text())
        result["memory"] = previous["memory"]
        result["memory_reused_from"] = f"{reuse_memory} (run started {previous['started']})"
    elif not skip_memory:
        _log("memory (subprocesses)", started)
        result["memory"] = memory_runs(sizes, 8, concurrent=sizes == QUICK)
    if not skip_memory:
        _log("activation memory (subprocesses)", started)
        result["activations"] = activation_runs(sizes, concurrent=sizes == QUICK)
    _log("matmul", started)
    result["matmul"]["end"] = matmul_both(sizes)
    result["load_after"] = load_snapshot()
    result["total_minutes"] = (time.perf_counter() - started) / 60
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "inference.json").write_text(json.dumps(result, indent=2, default=str))
    (out_dir / "inference.md").write_text(markdown(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", help="directory for inference.json / inference.md (default: docs/benchmarks, "
                                      "or a temporary directory with --quick, so a smoke run never overwrites "
                                      "the published numbers)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run under a minute")
    parser.add_argument("--skip-memory", action="store_true", help="skip the (slow) peak-memory subprocesses")
    parser.add_argument("--precision-only", action="store_true",
                        help="only float32 vs bfloat16 (plus matmul and Lanczos): precision.json / precision.md")
    parser.add_argument("--reuse-memory", type=pathlib.Path, metavar="JSON",
                        help="copy the big-volume memory runs from an earlier inference.json (they take "
                             "most of the time) instead of rerunning them; recorded in the output")
    parser.add_argument("--matmul-child", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--activation-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.matmul_child:
        print(json.dumps(matmul_gflops(*args.matmul_child)))
        return
    if args.memory_child:
        d, h, w, tile, batch = args.memory_child
        tile_mb = None if tile == "none" else float(tile)
        print(json.dumps(memory_child((int(d), int(h), int(w)), tile_mb, int(batch))))
        return
    if args.activation_child:
        stage, rows, cols, batch = args.activation_child
        print(json.dumps(activation_child(stage, int(rows), int(cols), int(batch))))
        return
    sizes = QUICK if args.quick else Sizes()
    out = args.out or (os.path.join(tempfile.gettempdir(), "sr3d_bench_quick") if args.quick
                       else str(REPO / "docs" / "benchmarks"))
    command = "python benchmarks/bench_inference.py " + " ".join(sys.argv[1:])
    if args.precision_only:
        run_precision(sizes, pathlib.Path(out), command)
        print(f"wrote {out}/precision.json and precision.md", file=sys.stderr)
        print((pathlib.Path(out) / "precision.md").read_text())
        return
    result = run(sizes, pathlib.Path(out), command, args.skip_memory, args.reuse_memory)
    print(f"wrote {out}/inference.json and inference.md", file=sys.stderr)
    print(markdown(result))


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
