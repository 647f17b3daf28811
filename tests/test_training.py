"""The shared training loop: K steps per call, in-graph scalars, timings, checkpoints, XLA choice."""

import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

import common.training as training
import dcn.dec.models as dcn_models
import desom.models as desom_models
from common.cli import ArgumentParser, add_run_arguments
from common.data import load_data
from common.errors import UsageError
from common.runtime import resolve_jit
from dcn import DCN
from dcn.dec.models import clustering_schedule
from desom import DESOM, ConvDESOM, Kerasom
from desom.layers import temperature, temperature_op
from tests.helpers import interrupt_on_call

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"hidden": (32, 32, 64)}


@pytest.fixture(scope="module")
def digits():
    (x, y), _ = load_data("digits")
    return x, y


def _desom(x, seed=3):
    keras.utils.set_random_seed(seed)
    model = DESOM(64, (3, 3), **SMALL)
    model.init_prototypes(x, seed=seed)
    return model


# ---------------------------------------------------------------- K steps per call
@pytest.mark.slow
@pytest.mark.parametrize("jit", ["on", "off"])
def test_k_steps_per_call_train_exactly_like_one_step_per_call(digits, tmp_path, jit):
    x, y = digits
    runs = {}
    for k in (1, 16, "auto"):
        model = _desom(x)
        result = model.fit(x, y, iterations=70, batch_size=64, eval_interval=25, verbose=0, jit_compile=jit,
                           steps_per_execution=k, save_dir=tmp_path / str(k))
        runs[k] = (model.prototypes, pd.read_csv(tmp_path / str(k) / "log.csv").drop(columns="time"), result)
    protos, log, result = runs[1]
    assert log["iteration"].tolist() == [0, 25, 50, 70]
    assert result.steps_per_execution == 1 and runs[16][2].steps_per_execution == 16
    for k in (16, "auto"):
        np.testing.assert_allclose(runs[k][0], protos, rtol=1e-6, atol=1e-7)
        pd.testing.assert_frame_equal(runs[k][1], log, rtol=1e-6)
        assert runs[k][2].iterations == 70


@pytest.mark.slow
def test_refresh_and_stop_points_do_not_depend_on_k(digits, monkeypatch):
    x, y = digits
    original = dcn_models.ClusteringTask.refresh
    seen = []

    def recording(self, iteration):
        # steps taken so far, read from the optimizer: a call stopped right at the refresh
        seen.append((iteration, int(optimizer.iterations.numpy())))
        return original(self, iteration)

    monkeypatch.setattr(dcn_models.ClusteringTask, "refresh", recording)
    reference = None
    for k in (1, 4, 16, "auto"):
        for tol, stop in ((0.0, None), (1.0, 7)):  # tol 1: stops at the second refresh
            seen.clear()
            keras.utils.set_random_seed(2)
            model = DCN((64,), 10, hidden=(32, 32))
            model.init_centers(x, n_init=2, seed=2)
            optimizer = keras.optimizers.Adam()
            # XLA off: where calls stop is the host's choice, whatever compiles the step (XLA: K steps per
            # call train alike, test_k_steps_per_call_train_exactly_like_one_step_per_call[on])
            result = model.fit(x, y, max_iterations=61, update_interval=7, eval_interval=5, tol=tol,
                               batch_size=64, verbose=0, steps_per_execution=k, optimizer=optimizer,
                               jit_compile="off")
            if stop is None:
                assert seen == [(i, i) for i in range(0, 61, 7)]
                assert result.iterations == 61 and result.stopped_early is None
                if reference is None:
                    reference = model.centers
                np.testing.assert_allclose(model.centers, reference, rtol=1e-5, atol=1e-6)
            else:
                assert seen == [(0, 0), (7, 7)]
                assert result.iterations == 7 and "labels changed" in result.stopped_early


def test_auto_k_aims_at_tenth_of_a_second_calls_that_outgrow_the_time_between_them():
    auto = training.auto_steps_per_execution
    assert auto(0.001) == 100 and auto(0.001, per_call=0.005) == 100  # one process: 0.1 s calls
    assert auto(0.06, per_call=0.05) == 7  # a slow agreement between calls: 0.45 s calls, the round 10 %
    assert auto(0.5) == 1 and auto(1e-7) == training.MAX_STEPS_PER_EXECUTION


@pytest.mark.slow
def test_resume_with_another_k_ends_where_an_uninterrupted_run_ends(digits, tmp_path, monkeypatch):
    x, y = digits
    kwargs = dict(iterations=90, batch_size=64, eval_interval=30, verbose=0, checkpoint_minutes=0)
    reference = _desom(x)
    reference.fit(x, y, save_dir=tmp_path / "ref", steps_per_execution=1, **kwargs)
    restore = interrupt_on_call(monkeypatch, desom_models.SOMTask, "evaluate", 3)  # the row at 60
    with pytest.raises(KeyboardInterrupt):
        _desom(x).fit(x, y, save_dir=tmp_path / "run", steps_per_execution=16, **kwargs)
    restore()
    resumed = _desom(x)
    result = resumed.fit(x, y, save_dir=tmp_path / "run", resume=True, steps_per_execution="auto", **kwargs)
    assert (result.iterations, result.trained) == (90, 30)
    np.testing.assert_allclose(resumed.prototypes, reference.prototypes, rtol=1e-5, atol=1e-6)
    log, ref_log = (pd.read_csv(tmp_path / d / "log.csv") for d in ("run", "ref"))
    assert log["iteration"].tolist() == [0, 30, 60, 90]
    # the row at 60, cut short by the interruption, is written on resume, its losses from the sums saved
    # with the checkpoint: every row as in the uninterrupted run
    for column in ("loss", "quantization_error"):
        np.testing.assert_allclose(log[column], ref_log[column], rtol=1e-5)


def test_a_log_row_after_a_resume_averages_its_whole_interval(tmp_path):
    """Stopped at iteration 13 (rows every 5), resumed: the row at 15 is the
    mean loss of steps 11-15, as in an uninterrupted run, not of 14-15."""
    x = np.random.default_rng(0).random((53, 8, 8, 1)).astype(np.float32)

    class Stopping(_SmallTask):
        def refresh(self, iteration):
            if iteration == 13:
                raise KeyboardInterrupt

    kwargs = dict(iterations=30, batch_size=8, eval_interval=5, refresh_interval=13, verbose=0,
                  checkpoint_minutes=0, steps_per_execution=3)
    training.train(_SmallTask(), x, save_dir=tmp_path / "ref", optimizer=keras.optimizers.SGD(0.05), **kwargs)
    with pytest.raises(KeyboardInterrupt):
        training.train(Stopping(), x, save_dir=tmp_path / "run", optimizer=keras.optimizers.SGD(0.05),
                       **kwargs)
    training.train(_SmallTask(), x, save_dir=tmp_path / "run", resume=True,
                   optimizer=keras.optimizers.SGD(0.05), **kwargs)
    log, ref_log = (pd.read_csv(tmp_path / d / "log.csv") for d in ("run", "ref"))
    assert log["iteration"].tolist() == ref_log["iteration"].tolist() == [0, 5, 10, 15, 20, 25, 30]
    np.testing.assert_allclose(log["loss"], ref_log["loss"], rtol=1e-5)


@pytest.mark.slow
def test_fit_resumed_with_more_iterations_keeps_the_temperature_schedule(digits, tmp_path):
    """The Python API as the command: resumed with iterations=90 after 60,
    T goes on as before (at Tmin after 60), not along a 90-iteration decay."""
    x, y = digits
    kwargs = dict(batch_size=64, eval_interval=15, verbose=0, checkpoint_minutes=0, save_dir=tmp_path / "run")
    _desom(x).fit(x, y, iterations=60, **kwargs)
    before = pd.read_csv(tmp_path / "run" / "log.csv")
    _desom(x).fit(x, y, iterations=90, resume=True, **kwargs)
    log = pd.read_csv(tmp_path / "run" / "log.csv")
    assert log["iteration"].tolist() == [0, 15, 30, 45, 60, 75, 90]
    np.testing.assert_allclose(log["T"].iloc[:5], before["T"], rtol=1e-6)
    np.testing.assert_allclose(log["T"].iloc[5:], 0.1, rtol=1e-6)  # a 90-iteration decay: 0.21 at 75
    # a fresh run in the same folder takes its own schedule
    _desom(x).fit(x, y, iterations=90, **kwargs)
    assert pd.read_csv(tmp_path / "run" / "log.csv")["T"].iloc[5] > 0.2


class _SmallTask(training.Task):
    """A small dense network fitted to (augmented) images, with ``dropouts``
    dropout layers: its weights depend on every draw. Each instance starts
    from the global seed ``seed``."""

    def __init__(self, seed=1, dropouts=0):
        keras.utils.set_random_seed(seed)
        self.model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(4),
                                       *[keras.layers.Dropout(0.5) for _ in range(dropouts)]])

    def loss_terms(self, x, idx, scalars):
        return {"loss": keras.ops.sum(keras.ops.square(self.model(x, training=True) - 1.0), axis=1)}


def test_augmentation_draws_depend_on_the_seed_alone_not_on_interruptions_or_earlier_draws(tmp_path,
                                                                                            monkeypatch):
    from common.networks import Augmentation

    (x, _), _ = load_data("digits", flatten=False)

    def flip_shift():
        return Augmentation([lambda s: keras.layers.RandomFlip("horizontal", seed=s),
                             lambda s: keras.layers.RandomTranslation(0.2, 0.2, seed=s)], seed=4)

    def run(save_dir=None, resume=False, augment=None, seed=4):
        task = _SmallTask(seed=1)
        training.train(task, x, iterations=60, batch_size=64, eval_interval=20, verbose=0,
                       checkpoint_minutes=0, save_dir=save_dir, resume=resume, map_fn=augment or flip_shift(),
                       seed=seed, optimizer=keras.optimizers.SGD(0.01))
        return task.model.get_weights()

    def assert_same(a, b):
        for got, want in zip(a, b):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    reference = run(tmp_path / "ref")
    restore = interrupt_on_call(monkeypatch, _SmallTask, "evaluate", 3)  # the row at 40
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run")
    restore()
    assert_same(run(tmp_path / "run", resume=True), reference)  # drawn on from the checkpoint
    used = flip_shift()
    for _ in range(3):  # an earlier phase's draws
        used(x[:64])
    assert_same(run(augment=used), reference)
    other = run(seed=5)  # another seed draws (and shuffles) otherwise
    assert not np.allclose(other[0], reference[0])


def test_reseeding_starts_each_generator_from_the_seed_and_phase():
    from dcn.selflabel import AUGMENTATIONS, augmenter

    augment = augmenter(list(AUGMENTATIONS), seed=7)
    states = training.seed_states(training.layers_of(augment))
    assert len(states) == len(AUGMENTATIONS)  # one generator per layer
    assert training.seed_states([*training.layers_of(augment), augment.pipeline]) == states  # each once
    assert [v.numpy().tolist() for v in states] == [[s, 0] for s in training.layer_seeds(len(states), 7)]
    drawn = {}
    for phase in ("pretrain", "train"):
        augment(np.random.default_rng(0).random((4, 28, 28, 1), np.float32))
        training.reseed(states, 7, phase)
        drawn[phase] = [v.numpy().tolist() for v in states]
        assert all(count == 0 for _, count in drawn[phase])
    assert len({s for s, _ in drawn["pretrain"] + drawn["train"]}) == 2 * len(states)  # all different
    training.reseed(states, 7, "train")
    assert [v.numpy().tolist() for v in states] == drawn["train"]
    assert training.layers_of(lambda batch: batch) == []


def test_a_checkpoint_without_the_random_state_resumes_with_a_warning(tmp_path, monkeypatch, capsys):
    from common.networks import Augmentation

    (x, _), _ = load_data("digits", flatten=False)
    flips = Augmentation([lambda s: keras.layers.RandomFlip("horizontal", seed=s)], seed=4)
    kwargs = dict(iterations=40, batch_size=64, eval_interval=20, verbose=0, checkpoint_minutes=0,
                  save_dir=tmp_path)
    restore = interrupt_on_call(monkeypatch, _SmallTask, "evaluate", 2)  # the row at 20
    with pytest.raises(KeyboardInterrupt):  # a plain function: its state is not saved, as before
        training.train(_SmallTask(seed=1), x, map_fn=lambda batch: flips(batch), **kwargs)
    restore()
    result = training.train(_SmallTask(seed=1), x, map_fn=flips, resume=True, **kwargs)
    assert (result.iterations, result.trained) == (40, 20)
    err = capsys.readouterr().err
    assert "written before the augmentation's random state was saved" in err and "cannot be read" not in err


def test_dropout_draws_after_a_resume_are_those_of_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    import tensorflow as tf

    from dcn.autoencoders.models import VAE

    (x, _), _ = load_data("digits", flatten=False)
    kwargs = dict(iterations=60, batch_size=64, eval_interval=20, verbose=0, checkpoint_minutes=0)

    def run(task, save_dir=None, resume=False):
        return training.train(task, x, save_dir=save_dir, resume=resume, optimizer=keras.optimizers.SGD(0.01),
                              **kwargs)

    def interrupted(task, save_dir):
        restore = interrupt_on_call(monkeypatch, _SmallTask, "evaluate", 3)  # the row at 40
        with pytest.raises(KeyboardInterrupt):
            run(task, save_dir)
        restore()
        capsys.readouterr()

    reference = _SmallTask(dropouts=1)
    run(reference, tmp_path / "ref")
    interrupted(_SmallTask(dropouts=1), tmp_path / "run")
    saved = tf.train.list_variables(tf.train.latest_checkpoint(tmp_path / "run" / "checkpoints" / "train"))
    assert any(name.startswith("model_random_state/0/") for name, _ in saved)
    resumed = _SmallTask(dropouts=1)
    assert run(resumed, tmp_path / "run", resume=True).trained == 20
    for got, want in zip(resumed.model.get_weights(), reference.model.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert "warning" not in capsys.readouterr().err
    # the VAE's sampled code has its generator found too, beside its encoder's two dropouts
    assert len(training.seed_states([VAE((64,), latent_dim=2)])) == 3

    # a checkpoint without the model's random state (written before it was saved), or with it for another
    # number of generators (a dropout added), resumes with a warning and without that part
    for before, after, said in [(0, 1, "was written before the model's random state"),
                                (1, 2, "for 1 generator, the model has 2")]:
        interrupted(_SmallTask(dropouts=before), tmp_path / f"{before}to{after}")
        result = run(_SmallTask(dropouts=after), tmp_path / f"{before}to{after}", resume=True)
        err = capsys.readouterr().err
        assert (result.iterations, result.trained) == (60, 20)
        assert said in err and "cannot be read" not in err


# ---------------------------------------------------------------- in-graph scalars
@pytest.mark.parametrize("decay", ["exponential", "linear", "constant"])
@pytest.mark.parametrize("update_interval", [1, 7])
def test_temperature_computed_in_the_compiled_step_equals_the_schedule(decay, update_interval):
    import tensorflow as tf

    iterations = np.array([0, 1, 6, 7, 8, 500, 998, 999, 1000, 5000], np.int64)
    graph = tf.function(lambda it: temperature_op(it, 1000, 10.0, 0.1, decay, update_interval),
                        jit_compile=True)
    got = np.array([float(graph(tf.constant(i))) for i in iterations])
    expected = [temperature(i - i % update_interval, 1000, 10.0, 0.1, decay) for i in iterations]
    np.testing.assert_allclose(got, expected, rtol=2e-6)
    assert float(temperature_op(0, 1, 10.0, 0.1, decay)) == temperature(0, 1, 10.0, 0.1, decay)
    # and the closed form itself, against numpy
    if decay == "exponential":
        frac = np.minimum(iterations - iterations % update_interval, 999) / 999
        np.testing.assert_allclose(expected, 10.0 * 0.01**frac, rtol=1e-12)


@pytest.mark.slow
def test_the_log_records_the_temperature_the_step_used(digits, tmp_path):
    x, y = digits
    model = _desom(x)
    model.fit(x, y, iterations=40, batch_size=64, eval_interval=10, update_interval=4, Tmax=5.0, Tmin=0.5,
              verbose=0, save_dir=tmp_path, steps_per_execution=16)
    log = pd.read_csv(tmp_path / "log.csv")
    expected = [temperature(min(i, 39) - min(i, 39) % 4, 40, 5.0, 0.5) for i in log["iteration"]]
    np.testing.assert_allclose(log["T"], expected, rtol=2e-6)


# ---------------------------------------------------------------- timings
def test_timings_add_up_and_name_where_the_time_went(digits, monkeypatch):
    x, y = digits
    evaluate, refresh = dcn_models.ClusteringTask.evaluate, dcn_models.ClusteringTask.refresh

    def slow_evaluate(self):
        time.sleep(0.2)
        return evaluate(self)

    def slow_refresh(self, iteration):
        time.sleep(0.3)
        return refresh(self, iteration)

    monkeypatch.setattr(dcn_models.ClusteringTask, "evaluate", slow_evaluate)
    monkeypatch.setattr(dcn_models.ClusteringTask, "refresh", slow_refresh)
    keras.utils.set_random_seed(0)
    model = DCN((64,), 10, hidden=(32, 32))
    model.init_centers(x, n_init=1)
    result = model.fit(x, y, max_iterations=40, update_interval=10, eval_interval=20, tol=0.0,
                       batch_size=64, verbose=0)
    t = result.timings
    parts = [t.setup, t.compile, t.steps, t.evaluation, t.refresh, t.checkpoint, t.other]
    assert min(parts) >= 0 and sum(parts) == pytest.approx(t.total, abs=1e-6)
    assert t.evaluation >= 3 * 0.2 and t.refresh >= 4 * 0.3        # rows at 0, 20, 40; refreshes at 0-30
    assert t.steps < 0.5 * (t.evaluation + t.refresh)              # the sleeps are not counted as steps
    assert t.compile_steps == 1 and t.timed_steps == 39 and t.compile > t.steps / 39
    assert result.iterations_per_second == pytest.approx(39 / t.steps)
    assert result.seconds == pytest.approx(t.total)
    saved = t.to_dict()
    assert saved["timed_steps"] == 39 and saved["evaluation_seconds"] == round(t.evaluation, 3)


# ---------------------------------------------------------------- checkpoints
@pytest.mark.slow
def test_checkpoints_follow_the_wall_clock_not_the_iterations(digits, tmp_path, monkeypatch):
    import tensorflow as tf

    x, y = digits
    saved = []
    save = tf.train.CheckpointManager.save

    def recording(self, checkpoint_number=None, **kw):
        saved.append(checkpoint_number)
        return save(self, checkpoint_number=checkpoint_number, **kw)

    monkeypatch.setattr(tf.train.CheckpointManager, "save", recording)
    _desom(x).fit(x, y, iterations=60, batch_size=64, eval_interval=20, verbose=0, save_dir=tmp_path / "a",
                  checkpoint_minutes=0)
    assert saved == [60]  # only the end
    saved.clear()
    _desom(x).fit(x, y, iterations=60, batch_size=64, eval_interval=20, verbose=0, save_dir=tmp_path / "b",
                  checkpoint_minutes=1e-9, steps_per_execution=5)
    assert saved[-1] == 60 and len(saved) > 5 and saved == sorted(saved)  # after every call, then the end


def test_unshuffled_batches_take_consecutive_rows_and_wrap_around():
    import tensorflow as tf

    x = np.arange(10, dtype=np.float32)[:, None]
    batches = training._Batches(tf, x, batch_size=4, seed=0, shuffle=False)  # DEC-keras' order
    rows = [batches(tf.constant(i, tf.int64))[1].numpy().tolist() for i in range(6)]
    assert rows == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1], [2, 3, 4, 5], [6, 7, 8, 9], [0, 1, 2, 3]]
    xb, idx = batches(tf.constant(2, tf.int64))
    np.testing.assert_array_equal(xb.numpy()[:, 0], idx.numpy())
    shuffled = training._Batches(tf, x, batch_size=4, seed=0)
    epoch = np.concatenate([shuffled(tf.constant(i, tf.int64))[1].numpy() for i in range(2)])
    assert len(set(epoch)) == 8 and epoch.tolist() != list(range(8))  # 8 distinct rows, not in order


def test_predict_in_batches_pads_the_last_batch_and_keeps_the_output_shape_of_no_rows():
    from common.networks import predict_in_batches

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    x = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    np.testing.assert_allclose(predict_in_batches(model, x, batch_size=4), model(x).numpy(), atol=1e-6)
    empty = predict_in_batches(model, x[:0])
    assert empty.shape == (0, 2) and empty.dtype == np.float32  # argmax(axis=1) works on it


class _Regression(training.Task):
    """A linear model fitting the pixel sums; the loss turns NaN from step ``poison_at`` on."""

    def __init__(self, dim, poison_at=None):
        self.model = keras.Sequential([keras.Input((dim,)), keras.layers.Dense(1)])
        self.poison_at = poison_at

    def scalars(self, iteration):
        import tensorflow as tf

        if self.poison_at is None:
            return {}
        return {"poison": tf.where(iteration >= self.poison_at, float("nan"), 0.0)}

    def loss_terms(self, x, idx, scalars):
        err = keras.ops.square(self.model(x)[:, 0] - keras.ops.sum(x, axis=1) / 10.0)
        return {"loss": err + scalars.get("poison", 0.0), "error": err}


def _regression(x, poison_at=None):
    keras.utils.set_random_seed(5)
    return _Regression(x.shape[1], poison_at)


def _weights(task):
    return [w.numpy().copy() for w in task.model.weights]


@pytest.mark.parametrize("k", [1, 16])
def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(digits, tmp_path, k):
    from common.errors import TrainingDiverged

    x, _ = digits
    kwargs = dict(batch_size=64, eval_interval=10, verbose=0, checkpoint_minutes=0, save_dir=tmp_path,
                  steps_per_execution=k)
    task = _regression(x, poison_at=37)
    training.train(task, x, iterations=30, **kwargs)  # the checkpoint of iteration 30
    good = _weights(task)
    with pytest.raises(TrainingDiverged, match=r"train: training diverged at iteration 38 \(loss = nan\); "
                       r"stopped without saving, the checkpoint of iteration 30 is kept"):
        training.train(task, x, iterations=60, resume=True, **kwargs)
    assert pd.read_csv(tmp_path / "log.csv")["iteration"].tolist() == [0, 10, 20, 30]
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "train").glob("*.index")) == ["ckpt-30.index"]
    again = _regression(x)
    result = training.train(again, x, iterations=30, resume=True, **kwargs)
    assert result.trained == 0
    for a, b in zip(_weights(again), good):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_bin_desom_exits_non_zero_with_one_line_when_training_diverges(tmp_path):
    res = subprocess.run([sys.executable, "-m", "desom.cli", "--lr", "1e6", "--iterations", "300",
                          "--map_size", "3", "3", "--save_dir", str(tmp_path), "--verbose", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 3, res.stderr[-2000:]
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "training diverged at iteration" in err[0] and "--lr" in err[0], err
    assert not (tmp_path / "model.keras").exists()


def test_resume_falls_back_to_the_previous_checkpoint_when_the_newest_is_damaged(digits, tmp_path, capsys):
    x, _ = digits
    kwargs = dict(batch_size=64, eval_interval=10, verbose=0, checkpoint_minutes=0, save_dir=tmp_path)
    reference = _regression(x)
    training.train(reference, x, iterations=90, **{**kwargs, "save_dir": None})
    task = _regression(x)
    training.train(task, x, iterations=30, **kwargs)
    training.train(task, x, iterations=60, resume=True, **kwargs)
    folder = tmp_path / "checkpoints" / "train"
    data = next(folder.glob("ckpt-60.data-*"))
    data.write_bytes(data.read_bytes()[:100])  # cut short, as by a full disk
    capsys.readouterr()
    resumed = _regression(x)
    result = training.train(resumed, x, iterations=90, resume=True, **kwargs)
    err = capsys.readouterr().err
    assert "ckpt-60 cannot be read" in err and "resuming from the one before, ckpt-30" in err
    assert (result.iterations, result.trained) == (90, 60)
    for a, b in zip(_weights(resumed), _weights(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert pd.read_csv(tmp_path / "log.csv")["iteration"].tolist() == list(range(0, 100, 10))

    (folder / "checkpoint").write_text("garbage {{")  # a damaged index: found by file names
    result = training.train(_regression(x), x, iterations=100, resume=True, **kwargs)
    assert "using the checkpoint files found there" in capsys.readouterr().err
    assert (result.iterations, result.trained) == (100, 10)

    for f in folder.glob("ckpt-*"):
        f.write_bytes(b"")
    with pytest.raises(UsageError, match="no checkpoint in .* can be read; start the run again without"):
        training.train(_regression(x), x, iterations=110, resume=True, **kwargs)


# ---------------------------------------------------------------- XLA where it pays
def test_auto_compiles_dense_models_and_not_convolutional_ones_on_a_cpu(monkeypatch):
    import common.runtime as runtime

    dense, conv, som = DESOM(64, (2, 2), **SMALL), ConvDESOM((8, 8, 1), (2, 2), filters=(4,)), Kerasom(5)
    assert resolve_jit("auto", conv) == bool(runtime.gpu_names())  # on this machine, whatever it has
    monkeypatch.setattr(runtime, "gpu_names", lambda: [])  # then as on a CPU-only machine
    assert resolve_jit("auto", dense) and resolve_jit("auto", som)
    assert not resolve_jit("auto", conv)
    assert resolve_jit("on", conv) and resolve_jit(True, conv)
    assert not resolve_jit("off", dense) and not resolve_jit(False, dense)
    assert not resolve_jit("auto", dense, replicas=2) and not resolve_jit("on", dense, replicas=2)
    from dcn.autoencoders.models import VAE, Autoencoder

    assert resolve_jit("auto", Autoencoder((6,), 2, (4,)))
    assert not resolve_jit("auto", VAE((6,), 2, (4,), dropout=0.0))  # draws its code: slower under XLA
    assert not resolve_jit("auto", keras.Sequential([keras.Input((3,)), keras.layers.Dropout(0.1)]))
    dense.encoder.layers[1].supports_jit = False  # a layer XLA cannot compile
    assert not resolve_jit("auto", dense)
    with pytest.raises(UsageError, match="unknown XLA mode 'maybe'"):
        resolve_jit("maybe", dense)


def test_mixed_precision_without_a_gpu_says_so_in_one_line_and_runs(monkeypatch, capsys):
    import keras

    import common.runtime as runtime

    monkeypatch.setattr(runtime, "gpu_names", lambda: [])
    try:
        runtime.set_mixed_precision(True)
        assert keras.mixed_precision.global_policy().name == "mixed_float16"
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("warning: --mixed_precision is a GPU option"), err
        monkeypatch.setattr(runtime, "gpu_names", lambda: ["a GPU"])
        runtime.set_mixed_precision(True)
        assert capsys.readouterr().err == ""  # on a GPU, nothing to say
    finally:
        runtime.set_mixed_precision(False)


def test_a_gpu_tensorflow_cannot_use_is_explained_by_the_library_it_could_not_load():
    from common.runtime import gpu_problem

    startup = ("2026-12-03 I tensorflow/core/util/port.cc:153] oneDNN custom operations are on.\n"
               "2026-12-03 W tensorflow/core/common_runtime/gpu/gpu_device.cc:2256] Cannot dlopen some GPU "
               "libraries. Please make sure the missing libraries mentioned above are installed properly\n")
    assert gpu_problem(startup, True, 0, has_nvidia=True).endswith(
        "Cannot dlopen some GPU libraries. Please make sure the missing libraries mentioned above are "
        "installed properly")
    assert "built without CUDA (tensorflow-cpu)" in gpu_problem("", False, 0, has_nvidia=True)
    assert "found no usable GPU" in gpu_problem("nothing useful", True, 0, has_nvidia=True)
    assert gpu_problem(startup, True, 1, has_nvidia=True) is None  # it uses the GPU
    assert gpu_problem(startup, False, 0, has_nvidia=False) is None  # no GPU to use: nothing to say


def test_auto_leaves_out_steps_whose_augmentation_xla_cannot_compile_on_a_gpu(monkeypatch):
    import common.runtime as runtime
    from dcn.selflabel import ContrastiveTask, NeighbourTask, SelfLabelNet, augmenter

    monkeypatch.setattr(runtime, "gpu_names", lambda: ["a GPU"])  # on a GPU, auto compiles convolutions
    model = SelfLabelNet((8, 8, 1), 3, filters=(4,), dense=(8,), head=(4,))
    assert resolve_jit("auto", model)
    flips = augmenter(["flip"])  # a flip compiles; a shift (an image transform) does not
    assert resolve_jit("auto", model, extra=[flips.pipeline])
    x, neighbours = np.zeros((4, 8, 8, 1), np.float32), np.zeros((4, 1), np.int32)
    for task in (NeighbourTask(model, x, neighbours, augment=augmenter(["translate", "flip"])),
                 ContrastiveTask(model, augmenter(["crop", "flip"]))):
        assert not resolve_jit("auto", model, extra=task.step_layers())
    assert resolve_jit("auto", model, extra=NeighbourTask(model, x, neighbours).step_layers())


def test_the_loop_reports_its_xla_choice_and_plan(digits, capsys):
    from common.runtime import gpu_names

    x, _ = digits
    images = x.reshape(-1, 8, 8, 1)
    conv = ConvDESOM((8, 8, 1), (2, 2), filters=(4,))
    conv.init_prototypes(images)
    result = conv.fit(images, iterations=14, batch_size=128, eval_interval=7, verbose=2)
    on_gpu = bool(gpu_names())  # convolutions compile on a GPU only
    assert result.jit_compile is on_gpu
    out = capsys.readouterr().out
    assert (f"train: 14 iterations = 1.0 epochs of 14 batches of 128; XLA {'on' if on_gpu else 'off'}, "
            "steps per call auto") in out


def test_one_line_per_row_says_how_long_a_phase_has_to_go(digits, capsys, monkeypatch):
    import re

    from common import training

    monkeypatch.setattr(training, "ESTIMATE_AFTER_SECONDS", 0.0)  # at the first timed call
    x, _ = digits
    som = Kerasom(64, (2, 2))
    som.init_prototypes(x)
    som.fit(x, iterations=20, batch_size=128, eval_interval=10, verbose=2, steps_per_execution=1)
    lines = [line for line in capsys.readouterr().out.splitlines() if "to go" in line]
    assert len(lines) == 1 and re.fullmatch(r"train: about \d+ s to go at \d+\.\d ms a step", lines[0]), lines
    som.fit(x, iterations=20, batch_size=128, eval_interval=10, verbose=1, steps_per_execution=1)
    assert "to go" not in capsys.readouterr().out  # the progress bar's ETA says it


def test_a_run_plan_costs_the_phases_still_to_come():
    from common.training import RunPlan

    plan = RunPlan([("pretrain", 100), ("skipped", 0), ("train", 300), ("last", 50)])
    assert list(plan.steps) == ["pretrain", "train", "last"]  # phases without steps are left out
    assert plan.describe() == "pretrain 100 + train 300 + last 50 optimizer steps at most"
    plan.start("pretrain")
    assert plan.seconds_to_go("pretrain", 40, 0.01) == pytest.approx((40 + 300 + 50) * 0.01)
    plan.start("train")  # its own steps left, then the last phase at the speed just measured
    assert plan.seconds_to_go("train", 100, 0.02) == pytest.approx((100 + 50) * 0.02)
    plan = RunPlan([("pretrain", 100), ("train", 300), ("last", 50)])
    plan.start("train")  # a resumed run that skips the pretraining: it no longer counts
    assert plan.seconds_to_go("train", 300, 0.01) == pytest.approx(3.5)
    plan.start("train_more1")  # a phase the plan did not foresee counts its own steps
    assert plan.seconds_to_go("train_more1", 10, 0.01) == pytest.approx(0.6)
    kinds = RunPlan([(f"iteration_{i:02d}{knn}", 10) for i in range(2) for knn in ("", "_knn")])
    kinds.start("iteration_00")
    kinds.seconds_to_go("iteration_00", 0, 0.01)
    kinds.start("iteration_00_knn")  # the classifier's phase to come at its own kind's speed
    assert kinds.seconds_to_go("iteration_00_knn", 0, 0.05) == pytest.approx(10 * 0.01 + 10 * 0.05)
    many = RunPlan([(f"iteration_{i:02d}", 10) for i in range(5)])
    assert many.describe() == ("50 optimizer steps at most in 5 phases (iteration_00 10, iteration_01 10, "
                               "..., iteration_04 10)")


def test_within_a_planned_run_each_phase_says_how_long_the_whole_run_has_to_go(digits, capsys, monkeypatch):
    import re

    from common import training

    monkeypatch.setattr(training, "ESTIMATE_AFTER_SECONDS", 0.0)
    x, _ = digits
    som = Kerasom(64, (2, 2))
    som.init_prototypes(x)
    with training.planned_run([("first", 20), ("second", 1000)]):
        som.fit(x, iterations=20, batch_size=128, eval_interval=10, verbose=1, steps_per_execution=1,
                phase="first")
        line = [line for line in capsys.readouterr().out.splitlines() if "to go" in line]
        assert len(line) == 1 and re.fullmatch(
            r"first: about \d+ s to go at (\d+\.\d) ms a step; the whole run about (\d+) s of training "
            r"steps to go", line[0]), line
        per_step, whole = re.fullmatch(r".* at (\d+\.\d) ms .* about (\d+) s of .*", line[0]).groups()
        assert float(whole) >= float(per_step) - 1  # the second phase's 1,000 steps: per_step ms each
        som.fit(x, iterations=20, batch_size=128, eval_interval=10, verbose=1, steps_per_execution=1,
                phase="second")
        assert "to go" not in capsys.readouterr().out  # the last phase: the bar's ETA says it
    assert training._RUN_PLAN is None  # the plan ends with its block


# ---------------------------------------------------------------- defaults proportioned to the data
def test_batch_size_default_gives_small_data_enough_batches_per_epoch():
    from common.training import proportional_batch_size

    assert proportional_batch_size(70000) == 256 and proportional_batch_size(12800) == 256
    assert proportional_batch_size(12799) == 128 and proportional_batch_size(4000) == 64
    assert proportional_batch_size(1797) == 32 and proportional_batch_size(300) == 16
    assert proportional_batch_size(10) == 10  # never more than the samples


def test_clustering_schedule_scales_with_the_data():
    assert clustering_schedule(70000, 256) == (140, 19929)           # DEC's 140 and ~20,000 iterations
    assert clustering_schedule(1200, 256) == (4, 292)                # a refresh per epoch, 73 epochs
    assert clustering_schedule(1200, 256, update_interval=10, max_epochs=2) == (10, 8)
    assert clustering_schedule(1200, 256, max_iterations=50, max_epochs=2) == (4, 50)
    with pytest.raises(UsageError, match="max_epochs must be positive"):
        clustering_schedule(1200, 256, max_epochs=0)


# ---------------------------------------------------------------- flags and structure
@pytest.mark.parametrize("argv, message", [
    (["--steps_per_execution", "0"], "argument --steps_per_execution: must be a positive integer, got 0"),
    (["--steps_per_execution", "many"], "must be a positive integer, got 'many'"),
    (["--checkpoint_minutes", "-1"], "argument --checkpoint_minutes: must be a finite number of at least 0"),
    (["--checkpoint_minutes", "nan"], "must be a finite number of at least 0, got nan"),
    (["--jit", "maybe"], "argument --jit: invalid choice: 'maybe'"),
    (["--seed", "-1"], "argument --seed: must be in [0, 4294967295], got -1"),
    (["--seed", "4294967296"], "argument --seed: must be in [0, 4294967295], got 4294967296"),
    (["--seed", "1.5"], "argument --seed: must be an integer, got '1.5'"),
])
def test_bad_run_flags_get_one_line(argv, message, capsys):
    p = ArgumentParser(prog="cmd")
    add_run_arguments(p, "seed")
    with pytest.raises(SystemExit) as stop:
        p.parse_args(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_seed_bounds_are_what_keras_accepts():
    p = ArgumentParser(prog="cmd")
    add_run_arguments(p, "seed")
    seed = p.parse_args(["--seed", "4294967295"]).seed
    assert seed == 2**32 - 1
    keras.utils.set_random_seed(seed)
    with pytest.raises(ValueError):
        keras.utils.set_random_seed(seed + 1)


@pytest.mark.parametrize("kind, bounds, text, message", [
    (int, "[1, 10]", "0", "must be in [1, 10], got 0"),
    (int, "[1, 10]", "11", "must be in [1, 10], got 11"),
    (int, "[1, 10]", "x", "must be an integer, got 'x'"),
    (int, "[1, 10]", "2.5", "must be an integer, got '2.5'"),
    (int, None, "x", "must be an integer, got 'x'"),
    (float, "(0, 1)", "0", "must be in (0, 1), got 0"),
    (float, "(0, 1)", "1", "must be in (0, 1), got 1"),
    (float, "(0, 1]", "1.0001", "must be in (0, 1], got 1.0001"),
    (float, "[0, inf)", "-0.5", "must be in [0, inf), got -0.5"),
    (float, "(0, 1)", "x", "must be a number, got 'x'"),
    (float, "(0, 1)", "nan", "must be a finite number in (0, 1), got nan"),
    (float, "(0, inf)", "inf", "must be a finite number in (0, inf), got inf"),
    (float, None, "nan", "must be a finite number, got nan"),
    (float, None, "-inf", "must be a finite number, got -inf"),
    (float, None, "1e999", "must be a finite number, got 1e999"),
])
def test_number_refuses_what_is_outside_its_bounds(kind, bounds, text, message):
    import argparse

    from common.cli import Number

    with pytest.raises(argparse.ArgumentTypeError) as e:
        Number(kind, bounds)(text)
    assert str(e.value) == message


def test_number_takes_the_ends_of_closed_intervals_and_keeps_its_kind():
    from common.cli import Number

    closed, half_open = Number(int, "[1, 10]"), Number(float, "(0, 1]")
    assert closed("1") == 1 and closed("10") == 10 and type(closed("5")) is int
    assert half_open("1") == 1.0 and half_open("1e-9") == 1e-9 and type(half_open("1")) is float
    assert Number(float)("-1e300") == -1e300  # no bounds: any finite number
    assert Number(float, "[0, 1]")("0") == 0.0
    with pytest.raises(ValueError, match="bounds must look like"):
        Number(float, "0, 1")


def test_parser_groups_take_bounds_and_report_one_line(capsys):
    p = ArgumentParser(prog="cmd")
    p.add_argument("--lr", type=float, bounds="(0, inf)")
    p.add_argument("--size", type=int, nargs=2, bounds="[1, 100]")
    p.add_argument("--free", type=float)
    group = p.add_argument_group("training")
    group.add_argument("--epochs", type=int, default=3, bounds="[1, inf)")
    either = p.add_mutually_exclusive_group()
    either.add_argument("--share", type=float, bounds="(0, 1]")
    either.add_argument("--count", type=int, bounds="[1, inf)")
    a = p.parse_args(["--lr", "0.5", "--size", "1", "100", "--free", "-3", "--share", "1"])
    assert (a.lr, a.size, a.free, a.epochs, a.share) == (0.5, [1, 100], -3.0, 3, 1.0)
    for argv, message in [(["--lr", "0"], "argument --lr: must be in (0, inf), got 0"),
                          (["--size", "1", "101"], "argument --size: must be in [1, 100], got 101"),
                          (["--free", "nan"], "argument --free: must be a finite number, got nan"),
                          (["--epochs", "0"], "argument --epochs: must be in [1, inf), got 0"),
                          (["--share", "1.5"], "argument --share: must be in (0, 1], got 1.5"),
                          (["--count", "x"], "argument --count: must be an integer, got 'x'")]:
        with pytest.raises(SystemExit) as stop:
            p.parse_args(argv)
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err == f"cmd: error: {message} (see cmd --help)", err
    with pytest.raises(ValueError, match="bounds need type=int or type=float"):
        group.add_argument("--name", bounds="[0, 1]")


def test_run_flags_parse_and_no_jit_is_an_alias():
    p = ArgumentParser(prog="cmd")
    add_run_arguments(p, "seed")
    a = p.parse_args([])
    assert (a.jit, a.steps_per_execution, a.checkpoint_minutes) == ("auto", "auto", 10.0)
    a = p.parse_args(["--no_jit", "--steps_per_execution", "32", "--checkpoint_minutes", "0"])
    assert (a.jit, a.steps_per_execution, a.checkpoint_minutes) == ("off", 32, 0.0)
    with pytest.raises(UsageError, match="'auto' or a positive integer"):
        training.check_steps_per_execution(2.5)


def test_cli_helpers_and_the_loop_do_not_import_each_other():
    script = ("import sys, importlib\n"
              "importlib.import_module(sys.argv[1])\n"
              "print(sys.argv[2] in sys.modules)\n")
    for module, other in (("common.cli", "common.training"), ("common.training", "common.cli")):
        out = subprocess.run([sys.executable, "-c", script, module, other], capture_output=True, text=True,
                             cwd=ROOT, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip() == "False", (module, other)


@pytest.mark.slow
def test_batch_statistics_are_the_global_batchs_on_two_mirrored_cpus(tmp_path):
    """DEC's per-batch target and DESOM's normalised SOM loss divide by
    statistics of the batch: on two replicas, each holding half of it, they
    must still be the whole batch's (the weights end as on one device)."""
    import textwrap

    script = textwrap.dedent("""
        import sys
        import numpy as np
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras
        from common.data import load_data
        from common.runtime import make_strategy
        from dcn import DCN
        from desom import DESOM
        (x, y), _ = load_data("digits")
        x = x[:512]
        # XLA off: one device runs the kernels the two replicas run (XLA never compiles for several)
        def dec(model, strategy):
            model.init_centers(x, n_init=2, seed=2)
            model.fit(x, None, max_iterations=30, batch_size=32, target="batch", recon_weight=0.0, tol=0.0,
                      verbose=0, strategy=strategy, checkpoint_minutes=0, jit_compile="off")
        def desom(model, strategy):
            model.fit(x, None, iterations=30, batch_size=32, normalize=True, gamma=0.01, verbose=0,
                      strategy=strategy, checkpoint_minutes=0, jit_compile="off")
        cases = [("dec", lambda: DCN((64,), 10, hidden=(32, 32)), dec),
                 ("desom", lambda: DESOM(64, (3, 3), latent_dim=4, hidden=(16,)), desom)]
        for case, make, fit in cases:
            weights = {}
            for name in ("mirrored", "default"):
                strategy = make_strategy(name)
                with strategy.scope():
                    keras.utils.set_random_seed(3)
                    model = make()
                fit(model, strategy)
                weights[name] = model.get_weights()
            gap = max(np.abs(a - b).max() for a, b in zip(weights["mirrored"], weights["default"]))
            print(case, strategy.num_replicas_in_sync, make_strategy("mirrored").num_replicas_in_sync, gap)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    gaps = {line.split()[0]: line.split()[1:] for line in out.stdout.strip().splitlines()}
    for case in ("dec", "desom"):
        one, two, gap = gaps[case]
        assert (one, two) == ("1", "2") and float(gap) < 1e-5, out.stdout  # half batches: 1e-3 apart

