"""conv10 (3x3, 32 -> 1) as a 1x1 conv 32 -> 9 plus a sum of 9 shifted copies (docs/benchmarks.md,
recommendation 3): the same function with the same weights, timed against the Keras layer per stage
and precision, interleaved repeats, CPU-seconds of this process, medians.

  python benchmarks/bench_thin_layers.py 6 --out docs/benchmarks     # thin_layers.json / thin_layers.md

Not integrated in sr3d: see docs/benchmarks.md for the numbers and the decision.
"""
import pathlib
import os, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import numpy as np, keras, tensorflow as tf
from sr3d import models, precision

class ShiftedSum(keras.layers.Layer):
    def __init__(self, filters, activation=None, sum_dtype="float32", **kw):
        super().__init__(**kw); self.filters=filters; self.activation=keras.activations.get(activation); self.sum_dtype=sum_dtype
    def build(self, s):
        self.kernel=self.add_weight(shape=(1,1,s[-1],9*self.filters), name="kernel")
        self.bias=self.add_weight(shape=(self.filters,), name="bias", initializer="zeros")
    def call(self, x):
        h, w = tf.shape(x)[1], tf.shape(x)[2]
        z = tf.nn.conv2d(x, self.kernel, 1, "VALID")
        z = tf.cast(z, self.sum_dtype)
        z = tf.pad(z, [[0,0],[1,1],[1,1],[0,0]])
        f = self.filters
        out = tf.cast(self.bias, self.sum_dtype)
        for i in range(3):
            for j in range(3):
                t = i*3+j
                out = out + z[:, i:i+h, j:j+w, t*f:(t+1)*f]
        return self.activation(tf.cast(out, self.compute_dtype))

def rewrite(model, names, sum_dtype="float32"):
    def clone(layer):
        if layer.name in names:
            return ShiftedSum(layer.filters, layer.activation, sum_dtype, name=layer.name, dtype=layer.dtype_policy)
        return layer.__class__.from_config(layer.get_config())
    copy = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        new = copy.get_layer(layer.name)
        if layer.name in names:
            k, b = layer.get_weights()
            new.set_weights([np.transpose(k, (2,0,1,3)).reshape(1,1,k.shape[2],9*k.shape[3]), b])
        else:
            new.set_weights(layer.get_weights())
    return copy

bundle = models.load_models(None, 2)
rng = np.random.default_rng(0)
planes = {"hw": rng.random((16,256,256),dtype=np.float32), "d": rng.random((16,176,512),dtype=np.float32)}
variants = {}
for stage in ("hw","d"):
    for p in ("float32","bfloat16"):
        base = precision.network(getattr(bundle, stage), p)
        variants[(stage,p,"keras")] = base
        variants[(stage,p,"c10")] = rewrite(base, {"conv10"})
fns = {}
for key, m in variants.items():
    fns[key] = tf.function(lambda x, m=m: m(x, training=False)["final"], input_signature=[tf.TensorSpec((None,None,None,1), tf.float32)])
    x = planes[key[0]][:8, ..., None]
    ref = fns[(key[0],key[1],"keras")](x).numpy()
    out = fns[key](x).numpy()
    print(key, "maxdiff", np.abs(out-ref).max(), flush=True)
    diffs[key] = float(np.abs(out-ref).max())
times = {k: [] for k in fns}
REPEATS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
OUT = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
load_before = os.getloadavg()
diffs = {}
for rep in range(REPEATS):
    for key, fn in fns.items():
        x = planes[key[0]]
        c = time.process_time()
        for i in range(0,16,8): fn(x[i:i+8,...,None]).numpy()
        times[key].append(time.process_time()-c)
    print(rep, os.getloadavg(), flush=True)
for key, ts in times.items():
    base = np.median(times[(key[0],key[1],"keras")])
    print(key, "median CPU-s %.3f" % np.median(ts), "ratio %.3f" % (np.median(ts)/base), ["%.2f"%t for t in ts])

if OUT:
    import _report
    med = {k: float(np.median(v)) for k, v in times.items()}
    lines = [f"# conv10 as 1x1 + shifted sums ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             f"CPU: {_report.cpu_name()}; load average before {load_before}, after {os.getloadavg()}; "
             f"{REPEATS} interleaved repeats, 16 planes per stage, batch 8, shipped x2.", "",
             "| stage | precision | Keras CPU-s | rewrite CPU-s | ratio | max abs diff vs Keras (network units) |",
             "|---|---|---|---|---|---|"]
    for stage in ("hw", "d"):
        for p in ("float32", "bfloat16"):
            a, b = med[(stage, p, "keras")], med[(stage, p, "c10")]
            lines.append(f"| {stage} | {p} | {a:.3f} | {b:.3f} | {b / a:.3f} | {diffs[(stage, p, 'c10')]:.2g} |")
    _report.write_report(OUT, "thin_layers", {"times": {"/".join(k): v for k, v in times.items()},
                                              "max_abs_diff": {"/".join(k): v for k, v in diffs.items()}}, lines)
