"""Tests for sr3d.training and train.py: two-term loss, a short real run, determinism, resume."""
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from sr3d import io as sr3d_io
from sr3d import training
from sr3d.training import checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def small_scans(tmp_path_factory, ixi_files, scan_crop):
    """12 x 60 x 60 crops of three real IXI scans: two to train on, one held out."""
    out = tmp_path_factory.mktemp("scans")
    return [str(sr3d_io.save_volume(scan_crop(f, np.s_[40:52, 30:90, 30:90]), out / f.name))
            for f in ixi_files[:2] + ixi_files[-1:]]


def _config(scans, model_dir, **changes):
    base = dict(data=tuple(scans[:2]), val_data=(scans[2],), model_dir=str(model_dir), stage="hw", scale=2,
                epochs=2, steps_per_epoch=4, batch_size=16, patch_size=5, filters=4, save_every_steps=1,
                verbose=0)
    base.update(changes)
    return training.TrainConfig(**base)


def _weights(path):
    """All arrays of a .weights.h5 file, by path inside the file."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def test_two_term_loss_on_known_tensors(tmp_path):
    import keras

    config = _config(["a", "b", "c"], tmp_path, intermediate_weight=0.7)
    model = training.build_model(config)
    training.compile_model(model, config)
    rng = np.random.default_rng(0)
    x = rng.random((3, 5, 6, 1)).astype(np.float32)
    y = rng.random((3, 10, 12, 1)).astype(np.float32)
    outputs = model.predict(x, verbose=0)
    expected = np.mean(np.abs(outputs["final"] - y)) + 0.7 * np.mean(np.abs(outputs["intermediate"] - y))
    result = model.evaluate(x, {"final": y, "intermediate": y}, verbose=0, return_dict=True)
    np.testing.assert_allclose(result["loss"], expected, rtol=1e-5)
    assert isinstance(model.loss["final"], keras.losses.MeanAbsoluteError)


def test_learning_rate_schedule_drops_in_the_middle():
    config = training.TrainConfig(data=("a",), model_dir="m", epochs=40)
    assert [config.learning_rate_at(e) for e in (0, 19, 20, 39)] == [1e-3, 1e-3, 1e-4, 1e-4]


@pytest.mark.slow
def test_short_run_learns_and_writes_everything(tmp_path, small_scans):
    config = _config(small_scans, tmp_path / "run", epochs=3, steps_per_epoch=15, filters=8,
                     batch_size=32, save_every_steps=50)
    model_path = training.train(config)
    assert model_path.exists()
    for name in ("config.json", "training.json", "history.csv", "training_curve.png",
                 "epochs/epoch_003.weights.h5", "checkpoint/latest.weights.h5"):
        assert (tmp_path / "run" / name).exists(), name
    rows = (tmp_path / "run" / "history.csv").read_text().strip().splitlines()
    header = rows[0].split(",")
    losses = [float(r.split(",")[header.index("loss")]) for r in rows[1:]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    val = [float(r.split(",")[header.index("val_psnr")]) for r in rows[1:]]
    assert val[-1] > val[0]
    summary = json.loads((tmp_path / "run" / "training.json").read_text())
    assert summary["config"]["stage"] == "hw" and summary["steps_per_epoch"] == 15
    assert (tmp_path / "run" / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _Interrupt(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["hw", "d"])
def test_interrupted_run_resumes_to_the_same_weights(tmp_path, small_scans, stage):
    import keras

    class StopAt(keras.callbacks.Callback):
        def __init__(self, at):
            super().__init__()
            self.at, self.seen = at, 0

        def on_train_batch_end(self, batch, logs=None):
            self.seen += 1
            if self.seen == self.at:
                raise _Interrupt()

    straight = _config(small_scans, tmp_path / "straight", stage=stage)
    training.train(straight)
    resumed = _config(small_scans, tmp_path / "resumed", stage=stage)
    with pytest.raises(_Interrupt):
        training.train(resumed, callbacks=[StopAt(6)])  # mid-epoch 2 (4 steps per epoch)
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())
    assert state == {"epoch": 1, "step": 2}
    # The position that counts is stored inside the weights file (one rename commits both);
    # state.json only mirrors it, so a stale one (a kill between the two writes) changes nothing.
    (tmp_path / "resumed" / "checkpoint" / "state.json").write_text('{"epoch": 0, "step": 1}')
    training.train(resumed)
    a = _weights(tmp_path / "straight" / "checkpoint" / "latest.weights.h5")
    b = _weights(tmp_path / "resumed" / "checkpoint" / "latest.weights.h5")
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def tiny_hw_model(tiny_bundle_dir):
    return tiny_bundle_dir / "hw.keras"


def test_cascade_stacks_are_stage_hw_outputs_on_the_3d_degraded_scan(tiny_hw_model):
    import keras

    from sr3d import degrade

    volume = np.random.default_rng(0).random((9, 14, 17)).astype(np.float32)
    model = keras.saving.load_model(tiny_hw_model, compile=False)
    rows, cols = training.cascade_stacks(volume, model, 2)
    # Independently: the paper's 3D LR simulation, then the network on every LR slice.
    hr, lr = degrade.simulate_lr(volume, 2, "3d")
    assert hr.shape == (8, 14, 16) and lr.shape == (4, 7, 8)
    in_plane = np.asarray(model(lr[..., None], training=False)["final"])[..., 0]  # (4, 14, 16)
    assert rows.lr.shape == (14, 4, 16) and rows.hr.shape == (14, 8, 16)
    assert cols.lr.shape == (16, 4, 14) and cols.hr.shape == (16, 8, 14)
    np.testing.assert_allclose(rows.lr[3], in_plane[:, 3, :], rtol=0, atol=1e-5)
    np.testing.assert_allclose(cols.lr[5], in_plane[:, :, 5], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(rows.hr[3], hr[:, 3, :])
    np.testing.assert_array_equal(cols.hr[5], hr[:, :, 5])


def test_cascade_training_checks_its_stage_hw_model(tmp_path, small_scans, tiny_hw_model, tiny_bundle_dir):
    with pytest.raises(ValueError, match="stage 'd'"):
        _config(small_scans, tmp_path / "a", stage="hw", hw_model=str(tiny_hw_model))
    with pytest.raises(FileNotFoundError, match="nothing.keras"):
        _config(small_scans, tmp_path / "b", stage="d", hw_model=str(tmp_path / "nothing.keras"))
    d_model = tiny_bundle_dir / "d.keras"
    with pytest.raises(ValueError, match="d.keras: not a stage-hw network for scale 2"):
        training.train(_config(small_scans, tmp_path / "c", stage="d", hw_model=str(d_model)))
    with pytest.raises(ValueError, match="not a stage-hw network for scale 3"):
        training.train(_config(small_scans, tmp_path / "e", stage="d", scale=3, hw_model=str(tiny_hw_model)))


@pytest.mark.slow
def test_cascade_run_with_flips_resumes_to_the_same_weights(tmp_path, small_scans, tiny_hw_model):
    import keras

    class StopAt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2 and self.model.optimizer.iterations.numpy() == 7:
                raise _Interrupt()

    options = dict(stage="d", hw_model=str(tiny_hw_model), flip_rotate=True)
    training.train(_config(small_scans, tmp_path / "straight", **options))
    resumed = _config(small_scans, tmp_path / "resumed", **options)
    with pytest.raises(_Interrupt):
        training.train(resumed, callbacks=[StopAt()])
    training.train(resumed)
    summary = json.loads((tmp_path / "resumed" / "training.json").read_text())
    assert summary["config"]["hw_model"] == str(tiny_hw_model) and summary["config"]["flip_rotate"]
    a = _weights(tmp_path / "straight" / "checkpoint" / "latest.weights.h5")
    b = _weights(tmp_path / "resumed" / "checkpoint" / "latest.weights.h5")
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_resume_with_other_settings_is_refused(tmp_path, small_scans):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(_config(small_scans, tmp_path / "run").to_json()))
    with pytest.raises(ValueError, match="scale"):
        training.train(_config(small_scans, tmp_path / "run", scale=3))


def _train_cmd(scans, model_dir, epochs=2):
    return [sys.executable, os.path.join(REPO, "train.py"), f"--data={scans[0]},{scans[1]}",
            f"--model_dir={model_dir}", "--stage=hw", "--scale=2", f"--epochs={epochs}",
            "--steps_per_epoch=40", "--batch_size=16", "--filters=4", "--save_every_steps=2"]


@pytest.mark.slow
def test_killed_train_py_resumes_from_its_checkpoint(tmp_path, small_scans):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    straight = subprocess.run(_train_cmd(small_scans, tmp_path / "straight"), env=env,
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(small_scans, killed_dir), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_file = killed_dir / "checkpoint" / "state.json"
    deadline = time.time() + 240
    state = None
    while time.time() < deadline and proc.poll() is None:
        if state_file.exists():
            try:
                state = json.loads(state_file.read_text())
            except json.JSONDecodeError:
                state = None
            if state and (state["epoch"], state["step"]) >= (0, 10):
                break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "model.keras").exists()
    rerun = subprocess.run(_train_cmd(small_scans, killed_dir), env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming" in rerun.stdout
    a = _weights(tmp_path / "straight" / "checkpoint" / "latest.weights.h5")
    b = _weights(killed_dir / "checkpoint" / "latest.weights.h5")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_scans_too_small_for_the_patches_are_named(tmp_path, small_scans):
    with pytest.raises(ValueError, match=r"IXI.*T1_ds\.nii\.gz.*no plane is large enough for 40x40"):
        training.train(_config(small_scans, tmp_path / "run", patch_size=40))


def test_train_py_rejects_a_missing_scan(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--data=/nonexistent/scan.nii.gz",
                             f"--model_dir={tmp_path}"], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode != 0
    assert "/nonexistent/scan.nii.gz" in result.stderr
    assert "Traceback" not in result.stderr


def test_checkpoint_position_is_read_from_the_weights_file_or_an_older_state_json(tmp_path):
    ckpt = tmp_path / training.CHECKPOINT_DIR
    ckpt.mkdir()
    with h5py.File(ckpt / training.CHECKPOINT_WEIGHTS, "w") as f:   # as sr3d wrote it before 2026-12-01
        f.create_dataset("vars", data=np.zeros(3))
    (ckpt / "state.json").write_text('{"epoch": 3, "step": 7}')
    assert checkpoints.read_state(tmp_path) == (3, 7)
    with h5py.File(ckpt / training.CHECKPOINT_WEIGHTS, "a") as f:
        f.attrs["sr3d_epoch"], f.attrs["sr3d_step"] = 4, 0
    assert checkpoints.read_state(tmp_path) == (4, 0)  # the file's own position wins over state.json
    (ckpt / training.CHECKPOINT_WEIGHTS).write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="unreadable checkpoint"):
        checkpoints.read_state(tmp_path)


def _shipped_script_train_flags(tmp_path) -> dict:
    """{(stage, scale): {flag: value}} of the train.py calls experiments/train_shipped.sh makes,
    recorded by running the script with a `python3` that only writes down its arguments."""
    import os
    import pathlib
    import subprocess

    repo = pathlib.Path(__file__).resolve().parents[1]
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    (bin_dir / "python3").chmod(0o755)
    subprocess.run(["bash", str(repo / "experiments" / "train_shipped.sh"), str(tmp_path / "runs"), "2 4"],
                   check=True, env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, timeout=60)
    calls = {}
    for line in log.read_text().splitlines():
        words = line.split()
        if words[0] != "train.py":
            continue
        flags = dict(word[2:].split("=", 1) for word in words[1:])
        calls[(flags["stage"], int(flags["scale"]))] = flags
    return calls


def test_shipped_recipe_is_what_train_shipped_sh_runs(tmp_path):
    calls = _shipped_script_train_flags(tmp_path)
    assert sorted(calls) == [("d", 2), ("d", 4), ("hw", 2), ("hw", 4)]
    defaults = {"epochs": 40, "steps_per_epoch": None, "flat_fraction": 0.0, "seed": 0, "hw_model": None}
    for (stage, scale), flags in calls.items():
        explicit = {"hw_model": flags["hw_model"]} if stage == "d" else {}
        settings = training.resolve_recipe("shipped", stage, scale, defaults, explicit)
        assert settings["epochs"] == int(flags["epochs"])
        assert settings["steps_per_epoch"] == int(flags["steps_per_epoch"])
        assert settings["flat_fraction"] == float(flags["flat_fraction"])
        assert settings["seed"] == int(flags["seed"])


def test_recipe_flags_given_explicitly_win_and_paper_keeps_the_defaults():
    defaults = {"epochs": 40, "steps_per_epoch": None, "flat_fraction": 0.0, "seed": 0, "hw_model": None}
    assert training.resolve_recipe("paper", "hw", 2, defaults, {}) == defaults
    settings = training.resolve_recipe("shipped", "hw", 4, defaults, {"flat_fraction": 0.0, "epochs": 3})
    assert settings == {"epochs": 3, "steps_per_epoch": 250, "flat_fraction": 0.0, "seed": 0, "hw_model": None}
    with pytest.raises(ValueError, match="--hw_model"):
        training.resolve_recipe("shipped", "d", 2, defaults, {})


def test_fine_tuning_starts_from_the_given_weights(tmp_path, small_scans):
    first = training.train(_config(small_scans, tmp_path / "first", epochs=1, steps_per_epoch=2))
    # With a zero learning rate, Adam leaves the weights where they started: those of init_model.
    tuned = training.train(_config(small_scans, tmp_path / "tuned", epochs=1, steps_per_epoch=2,
                                   learning_rate=0.0, learning_rate_after_drop=0.0, init_model=str(first),
                                   noise_probability=0.5, max_noise=0.03))
    from sr3d import models
    for a, b in zip(models.load(first).get_weights(), models.load(tuned).get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="does not match"):
        training.train(_config(small_scans, tmp_path / "wide", epochs=1, steps_per_epoch=1, filters=8,
                               init_model=str(first)))
    with pytest.raises(FileNotFoundError, match="init_model"):
        _config(small_scans, tmp_path / "x", init_model=str(tmp_path / "missing.keras"))


def test_a_run_made_before_a_setting_existed_resumes_at_its_default(tmp_path, small_scans):
    (tmp_path / "run").mkdir()
    old = _config(small_scans, tmp_path / "run").to_json()
    for added in ("noise_probability", "max_noise", "init_model"):
        del old[added]
    (tmp_path / "run" / "config.json").write_text(json.dumps(old))
    checkpoints.check_same_run(tmp_path / "run", _config(small_scans, tmp_path / "run"))
    with pytest.raises(ValueError, match="noise_probability"):
        checkpoints.check_same_run(tmp_path / "run", _config(small_scans, tmp_path / "run",
                                                           noise_probability=0.5, max_noise=0.02))
