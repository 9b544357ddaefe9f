"""tf.distribute training: mirrored on two logical CPUs, and two worker processes on 127.0.0.1."""
import json
import os
import socket
import subprocess
import sys

import h5py
import numpy as np
import pytest

from sr3d import io as sr3d_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


@pytest.fixture(scope="module")
def scans(tmp_path_factory, ixi_files, scan_crop):
    out = tmp_path_factory.mktemp("scans")
    return [str(sr3d_io.save_volume(scan_crop(f, np.s_[40:52, 30:90, 30:90]), out / f.name)) for f in ixi_files[:2]]


def _cmd(scans, model_dir, *extra):
    return [sys.executable, os.path.join(REPO, "train.py"), f"--data={','.join(scans)}", f"--model_dir={model_dir}",
            "--stage=hw", "--scale=2", "--epochs=2", "--steps_per_epoch=5", "--batch_size=16", "--patch_size=5",
            "--filters=4", *extra]


def _layer_weights(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[()])
                     if isinstance(o, h5py.Dataset) and n.startswith("layers") else None)
    return out


def _losses(model_dir):
    rows = (model_dir / "history.csv").read_text().strip().splitlines()
    col = rows[0].split(",").index("loss")
    return [float(r.split(",")[col]) for r in rows[1:]]


def _assert_same_training(model_dir, reference_dir):
    """Same losses and weights as the reference run, up to float32 round-off of summing
    per-replica gradients (the global batch and its seeded patches are the same)."""
    np.testing.assert_allclose(_losses(model_dir), _losses(reference_dir), rtol=1e-5)
    a = _layer_weights(reference_dir / "checkpoint" / "latest.weights.h5")
    b = _layer_weights(model_dir / "checkpoint" / "latest.weights.h5")
    assert a.keys() == b.keys() and len(a) == 20
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-6, err_msg=key)


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory, scans):
    model_dir = tmp_path_factory.mktemp("single") / "run"
    result = subprocess.run(_cmd(scans, model_dir), env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return model_dir


@pytest.mark.slow
def test_two_workers_on_loopback_match_one_device(tmp_path, scans, single_device_run):
    model_dir = tmp_path / "run"
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        env = dict(ENV, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        procs.append(subprocess.Popen(_cmd(scans, model_dir, "--strategy=multi_worker"), env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "2 all_reduces" in outputs[0][1] or "group_size = 2" in outputs[0][1]
    # Only the chief (worker 0) writes the run.
    assert (model_dir / "model.keras").exists() and (model_dir / ".worker-1").is_dir()
    _assert_same_training(model_dir, single_device_run)


@pytest.mark.slow
def test_mirrored_on_two_logical_cpus_matches_one_device(tmp_path, scans, single_device_run):
    model_dir = tmp_path / "run"
    result = subprocess.run(_cmd(scans, model_dir, "--strategy=mirrored"), env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "num_devices = 2" in result.stderr
    _assert_same_training(model_dir, single_device_run)


_INTERRUPTED_MIRRORED = """
import sys
import keras
from sr3d import training

class Stop(Exception):
    pass

class StopAt(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if self.model.optimizer.iterations.numpy() == 7:  # step 2 of epoch 2 (5 steps per epoch)
            raise Stop()

data, model_dir = sys.argv[1].split(","), sys.argv[2]
config = training.TrainConfig(data=data, model_dir=model_dir, stage="hw", scale=2, epochs=2, steps_per_epoch=5,
                              batch_size=16, patch_size=5, filters=4, save_every_steps=1, strategy="mirrored")
try:
    training.train(config, callbacks=[StopAt()])
except Stop:
    print("stopped")
"""


@pytest.mark.slow
def test_mirrored_run_interrupted_mid_epoch_resumes_to_the_one_device_weights(tmp_path, scans,
                                                                              single_device_run):
    model_dir = tmp_path / "run"
    stopped = subprocess.run([sys.executable, "-c", _INTERRUPTED_MIRRORED, ",".join(scans), str(model_dir)],
                             env=ENV, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr[-3000:]
    assert json.loads((model_dir / "checkpoint" / "state.json").read_text()) == {"epoch": 1, "step": 2}
    assert not (model_dir / "model.keras").exists()
    resumed = subprocess.run(_cmd(scans, model_dir, "--strategy=mirrored", "--save_every_steps=1"), env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    a = _layer_weights(single_device_run / "checkpoint" / "latest.weights.h5")
    b = _layer_weights(model_dir / "checkpoint" / "latest.weights.h5")
    assert a.keys() == b.keys() and len(a) == 20
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-6, err_msg=key)


def test_multi_worker_without_tf_config_is_a_clear_error(tmp_path, scans):
    env = {k: v for k, v in ENV.items() if k != "TF_CONFIG"}
    result = subprocess.run(_cmd(scans, tmp_path / "run", "--strategy=multi_worker"), env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "TF_CONFIG" in result.stderr and "Traceback" not in result.stderr
