"""What a wider stage-hw network costs: training step and inference time per filter count, one run.

  python benchmarks/bench_filters.py [--filters 32,48,64] [--repeats 5] [--out docs/benchmarks]

For each filter count (untrained x2 stage-hw networks: time does not depend on the weights):
the median time of one training step (batch 128 of 7 x 7 LR patches, the two-term loss and Adam,
as sr3d.training compiles it) and of stage hw on 16 slices of 256 x 256 (sr3d.upscaling's traced
call). The filter counts are interleaved repeat by repeat, so machine load hits them alike;
ratios are to the first count. Writes OUT/filters.json and OUT/filters.md. The equal-time
training comparison that uses these ratios is in docs/model_card.md ("Network width").
"""
import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import _report  # noqa: E402
from sr3d import models, training, upscaling  # noqa: E402

SCALE, BATCH, PATCH, SLICES, SIDE, STEPS = 2, 128, 7, 16, 256, 10


def _setups(filters: int, rng: np.random.Generator):
    """(train_step, infer) closures for one filter count, traced once."""
    import tensorflow as tf

    model = models.build("hw", SCALE, filters=filters)
    optimizer = tf.keras.optimizers.Adam(1e-3)
    lr = tf.constant(rng.random((BATCH, PATCH, PATCH, 1), dtype=np.float32))
    hr = tf.constant(rng.random((BATCH, PATCH * SCALE, PATCH * SCALE, 1), dtype=np.float32))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(training.two_term_loss(hr, model(lr, training=True),
                                                         training.TrainConfig.intermediate_weight))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    traced = upscaling._traced(model)
    slices = tf.constant(rng.random((SLICES, SIDE, SIDE, 1), dtype=np.float32))

    def train_step():
        for _ in range(STEPS):
            step()
        float(step())

    def infer():
        np.asarray(traced(slices))

    train_step(), infer()  # trace and warm up
    return {"train": train_step, "infer": infer, "parameters": model.count_params()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filters", default="32,48,64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="docs/benchmarks")
    args = parser.parse_args()
    counts = [int(f) for f in args.filters.split(",")]
    rng = np.random.default_rng(0)
    setups = {f: _setups(f, rng) for f in counts}
    times = {f: {"train": [], "infer": []} for f in counts}
    for repeat in range(args.repeats):
        for f in counts:
            for what in ("train", "infer"):
                tick = time.perf_counter()
                setups[f][what]()
                times[f][what].append(time.perf_counter() - tick)
        print(f"repeat {repeat + 1}/{args.repeats}", flush=True)
    base = counts[0]
    med = {f: {w: statistics.median(t) for w, t in times[f].items()} for f in counts}
    rows = [{"filters": f, "parameters": setups[f]["parameters"],
             "train_step_ms": round(1000 * med[f]["train"] / (STEPS + 1), 2),
             "infer_ms_per_slice": round(1000 * med[f]["infer"] / SLICES, 2),
             "train_ratio": round(med[f]["train"] / med[base]["train"], 3),
             "infer_ratio": round(med[f]["infer"] / med[base]["infer"], 3)} for f in counts]
    cpu = _report.cpu_name()
    lines = [f"Stage hw x{SCALE} cost per filter count ({cpu}; medians of {args.repeats} interleaved repeats; "
             "`python benchmarks/bench_filters.py`)", "",
             f"| filters | parameters | train step (batch {BATCH}, {PATCH}x{PATCH}) ms | ratio | "
             f"inference ms / {SIDE}x{SIDE} slice | ratio |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['filters']} | {r['parameters']:,} | {r['train_step_ms']} | {r['train_ratio']:.2f} | "
              f"{r['infer_ms_per_slice']} | {r['infer_ratio']:.2f} |" for r in rows]
    _report.write_report(args.out, "filters", {"cpu": cpu, "repeats": args.repeats, "batch": BATCH, "patch": PATCH,
                                               "inference_slices": [SLICES, SIDE, SIDE], "scale": SCALE,
                                               "rows": rows}, lines)


if __name__ == "__main__":
    main()
