"""SOM mathematics against small, independent numpy references."""

from collections import deque

import keras
import numpy as np
import pytest
import tensorflow as tf

from common.errors import UsageError
from desom.layers import (
    SOMLayer,
    batch_som,
    gaussian_kernel,
    map_distances,
    pairwise_sq_distances,
    som_loss,
    temperature,
    umatrix,
    window_kernel,
)
from desom.models import DESOM, Kerasom, SOMTask


# ---------------------------------------------------------------- map distances
def grid_neighbours(r, c, topology):
    if topology == "rectangular":
        return [(r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)]
    # odd-r hexagonal layout: odd rows sit half a unit to the right
    up_down = [(r - 1, c), (r + 1, c)]
    up_down += [(r - 1, c + 1), (r + 1, c + 1)] if r % 2 else [(r - 1, c - 1), (r + 1, c - 1)]
    return [(r, c - 1), (r, c + 1), *up_down]


def bfs_distances(rows, cols, topology, toroidal):
    """Shortest paths on the grid's neighbour graph: the reference."""
    n = rows * cols
    out = np.zeros((n, n))
    for start in range(n):
        seen = {start: 0}
        queue = deque([start])
        while queue:
            k = queue.popleft()
            for r, c in grid_neighbours(k // cols, k % cols, topology):
                if toroidal:
                    r, c = r % rows, c % cols
                elif not (0 <= r < rows and 0 <= c < cols):
                    continue
                j = r * cols + c
                if j not in seen:
                    seen[j] = seen[k] + 1
                    queue.append(j)
        out[start] = [seen[j] for j in range(n)]
    return out


MAPS = [(size, topology, toroidal) for size in [(1, 5), (3, 4), (6, 5), (8, 8)]
        for topology in ("rectangular", "hexagonal") for toroidal in (False, True)
        if not (toroidal and topology == "hexagonal" and size[0] % 2)]  # needs an even row count


@pytest.mark.parametrize("size, topology, toroidal", MAPS)
def test_map_distances_match_shortest_paths(size, topology, toroidal):
    rows, cols = size
    np.testing.assert_array_equal(map_distances((rows, cols), topology, toroidal),
                                  bfs_distances(rows, cols, topology, toroidal))


def test_rectangular_distance_across_a_row_end():
    # Units 7 (row 0, col 7) and 8 (row 1, col 0) of an 8x8 map are 1 + 7 apart;
    # the original DESOM code's |k - l| // width row term gave 0 + 7.
    assert map_distances((8, 8))[7, 8] == 8


def test_hexagonal_interior_units_have_six_neighbours():
    d = map_distances((6, 6), "hexagonal")
    assert ((d == 1).sum(axis=1)[[7, 8, 14, 15]] == 6).all()
    assert ((map_distances((6, 6), "hexagonal", toroidal=True) == 1).sum(axis=1) == 6).all()


def test_bad_maps_are_usage_errors():
    with pytest.raises(UsageError, match="positive"):
        map_distances((0, 3))
    with pytest.raises(UsageError, match="even number of rows"):
        map_distances((5, 4), "hexagonal", toroidal=True)
    with pytest.raises(UsageError, match="unknown topology"):
        map_distances((2, 2), "triangular")


# ---------------------------------------------------------------- kernels and schedules
def test_kernels():
    d = np.array([0.0, 1.0, 2.0, 3.5])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(gaussian_kernel(d, 2.0)),
                               np.exp(-(d**2) / 4.0), rtol=1e-6)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(window_kernel(d, 2.0)), [1, 1, 1, 0])


def test_temperature_schedules():
    assert temperature(0, 101, 10, 0.1) == pytest.approx(10)
    assert temperature(50, 101, 10, 0.1) == pytest.approx(1.0)  # geometric midpoint
    assert temperature(100, 101, 10, 0.1) == pytest.approx(0.1)
    assert temperature(500, 101, 10, 0.1) == pytest.approx(0.1)  # past the schedule
    assert temperature(25, 101, 10, 2, "linear") == pytest.approx(8)
    assert temperature(99, 101, 10, 2, "constant") == 10
    with pytest.raises(ValueError, match="unknown decay"):
        temperature(0, 10, 10, 1, "cosine")


# ---------------------------------------------------------------- the layer
def test_som_layer_distances_and_config():
    rng = np.random.default_rng(0)
    protos = rng.normal(size=(6, 3)).astype(np.float32)
    z = rng.normal(size=(5, 3)).astype(np.float32)
    layer = SOMLayer((2, 3), prototypes=protos)
    d = keras.ops.convert_to_numpy(layer(z))
    expected = ((z[:, None, :] - protos[None]) ** 2).sum(axis=-1)
    np.testing.assert_allclose(d, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pairwise_sq_distances(z, protos), expected, rtol=1e-5, atol=1e-5)
    clone = SOMLayer.from_config(SOMLayer((2, 4), "hexagonal", True).get_config())
    assert (clone.map_size, clone.topology, clone.toroidal) == ((2, 4), "hexagonal", True)
    with pytest.raises(ValueError, match="expected"):
        SOMLayer((2, 3), prototypes=np.zeros((6, 2)))(z)


def test_som_loss_against_numpy_with_gradient_only_through_distances():
    rng = np.random.default_rng(1)
    z = tf.Variable(rng.normal(size=(7, 2)).astype(np.float32))
    protos = rng.normal(size=(6, 2)).astype(np.float32)
    layer = SOMLayer((2, 3), prototypes=protos)
    T = 1.5
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(som_loss(layer(z), layer.unit_distances, T))
    grad = tape.gradient(loss, z).numpy()

    zn = z.numpy()
    d = ((zn[:, None, :] - protos[None]) ** 2).sum(-1)
    bmu = d.argmin(axis=1)
    rc = np.array([(k // 3, k % 3) for k in range(6)])
    map_d = np.abs(rc[bmu][:, None, :] - rc[None]).sum(-1)
    w = np.exp(-(map_d**2) / T**2)
    assert float(loss) == pytest.approx((w * d).sum(axis=1).mean(), rel=1e-5)
    # d/dz of mean_i sum_k w_ik |z_i - p_k|^2 with w held fixed
    expected_grad = 2 * (w[:, :, None] * (zn[:, None, :] - protos[None])).sum(axis=1) / len(zn)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_desom_loss_against_numpy():
    keras.utils.set_random_seed(3)
    model = DESOM(input_dim=6, map_size=(2, 2), latent_dim=2, hidden=(5, 4))
    x = np.random.default_rng(3).random((8, 6)).astype(np.float32)
    task = SOMTask(model, gamma=0.5, Tmax=2.0, Tmin=1.0, decay="exponential",
                   neighborhood="window", som_iterations=10, update_interval=1)
    terms = task.loss_terms(x, None, {"T": tf.constant(1.0)})

    def dense(h, layer, relu):
        k, b = (w.numpy() for w in layer.weights)
        out = h @ k + b
        return np.maximum(out, 0) if relu else out

    enc = [layer for layer in model.encoder.layers if isinstance(layer, keras.layers.Dense)]
    dec = [layer for layer in model.decoder.layers if isinstance(layer, keras.layers.Dense)]
    h = x
    for i, layer in enumerate(enc):
        h = dense(h, layer, i < len(enc) - 1)
    z = h
    for i, layer in enumerate(dec):
        h = dense(h, layer, i < len(dec) - 1)
    rec = ((x - h) ** 2).mean(axis=1)
    d = ((z[:, None, :] - model.prototypes[None]) ** 2).sum(-1)
    w = (map_distances((2, 2))[d.argmin(axis=1)] <= 1.0).astype(float)  # window kernel, T = 1
    som = (w * d).sum(axis=1)
    np.testing.assert_allclose(terms["reconstruction"].numpy(), rec, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(terms["som"].numpy(), som, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(terms["loss"].numpy(), rec + 0.5 * som, rtol=1e-4, atol=1e-5)



def _normalized_task(model, gamma=0.5):
    return SOMTask(model, gamma=gamma, Tmax=2.0, Tmin=1.0, decay="exponential", neighborhood="gaussian",
                   som_iterations=10, update_interval=1, normalize=True)


def test_normalized_som_loss_is_the_som_loss_over_the_batch_spread():
    rng = np.random.default_rng(4)
    model = Kerasom(input_dim=3, map_size=(2, 3))
    model.set_prototypes(rng.normal(size=(6, 3)))
    x = rng.normal(size=(9, 3)).astype(np.float32)
    terms = _normalized_task(model).loss_terms(x, None, {"T": tf.constant(1.5)})
    d = ((x[:, None, :] - model.prototypes[None]) ** 2).sum(-1)
    w = np.exp(-(map_distances((2, 3))[d.argmin(axis=1)] ** 2) / 1.5**2)
    spread = ((x - x.mean(axis=0)) ** 2).sum(axis=1).mean()
    np.testing.assert_allclose(terms["som"].numpy(), (w * d).sum(axis=1) / spread, rtol=1e-4)
    np.testing.assert_allclose(terms["latent_spread"].numpy(), np.full(9, spread), rtol=1e-5)


def test_normalized_som_loss_ignores_the_scale_of_the_latent_space():
    # DESOM's plain loss falls by c^2 when codes and prototypes shrink by c:
    # the incentive that collapses a 2048-d ResNet latent. The normalized one
    # does not move.
    rng = np.random.default_rng(5)
    model = Kerasom(input_dim=4, map_size=(3, 3))
    protos, x = rng.normal(size=(9, 4)), rng.normal(size=(16, 4)).astype(np.float32)
    plain = SOMTask(model, gamma=1.0, Tmax=2.0, Tmin=1.0, decay="exponential", neighborhood="gaussian",
                    som_iterations=10, update_interval=1)
    values = {}
    for c in (1.0, 0.01):
        model.set_prototypes(c * protos)
        values[c] = [float(np.mean(task.loss_terms(c * x, None, {"T": tf.constant(1.0)})["loss"]))
                     for task in (plain, _normalized_task(model))]
    assert values[0.01][0] == pytest.approx(1e-4 * values[1.0][0], rel=1e-3)
    assert values[0.01][1] == pytest.approx(values[1.0][1], rel=1e-3)


def test_normalized_som_loss_gives_no_gradient_towards_shrinking_the_codes():
    # Along the direction that scales codes and prototypes together, the plain
    # loss L has derivative 2 L (shrinking pays); the normalized one 0, which
    # needs the gradient to flow through the spread too.
    rng = np.random.default_rng(6)
    model = Kerasom(input_dim=3, map_size=(2, 2))
    model.set_prototypes(rng.normal(size=(4, 3)))
    x = tf.constant(rng.normal(size=(10, 3)).astype(np.float32))
    for normalize in (False, True):
        task = SOMTask(model, gamma=1.0, Tmax=2.0, Tmin=1.0, decay="exponential", neighborhood="gaussian",
                       som_iterations=10, update_interval=1, normalize=normalize)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_mean(task.loss_terms(x, None, {"T": tf.constant(1.0)})["som"])
        gx, gp = tape.gradient(loss, [x, model.som.prototypes])
        along_scale = float(tf.reduce_sum(gx * x) + tf.reduce_sum(gp * model.som.prototypes))
        expected = 0.0 if normalize else 2 * float(loss)
        assert along_scale == pytest.approx(expected, abs=1e-4 * abs(2 * float(loss)))

# ---------------------------------------------------------------- numpy tools
def test_umatrix_on_a_line():
    protos = np.array([[0.0], [1.0], [3.0]])
    np.testing.assert_allclose(umatrix(protos, map_distances((1, 3))), [1.0, 1.5, 2.0])


def test_batch_som_lowers_quantization_error():
    rng = np.random.default_rng(0)
    z = np.concatenate([rng.normal(c, 0.1, (50, 2)) for c in (0, 3, 6)])
    init = rng.normal(0, 0.1, (4, 2))
    fitted = batch_som(z, map_distances((2, 2)), init, epochs=10, Tmax=1.0, Tmin=0.3)

    def qe(p):
        return np.sqrt(pairwise_sq_distances(z, p).min(axis=1)).mean()

    assert qe(fitted) < 0.5 * qe(init)


def test_best_units_and_map_errors_in_chunks_match_the_whole_distance_matrix():
    from common.metrics import quantization_error, topographic_error

    rng = np.random.default_rng(0)
    z = rng.normal(size=(9000, 2)).astype(np.float32)  # more samples than one chunk (8192)
    protos = rng.normal(size=(9, 2)).astype(np.float32)
    d = ((z[:, None, :].astype(np.float64) - protos[None]) ** 2).sum(axis=-1)
    model = Kerasom(2, (3, 3))
    model.set_prototypes(protos)
    bmu, sq, qe, te = model.assign_codes(z)  # 9,000 samples: two chunks of distances
    np.testing.assert_array_equal(bmu, d.argmin(axis=1))
    np.testing.assert_allclose(sq, d.min(axis=1), rtol=1e-5, atol=1e-5)
    assert qe == pytest.approx(quantization_error(d), rel=1e-5)
    assert te == pytest.approx(topographic_error(d, unit_distances=model.unit_distances), abs=1e-12)
    out = model.evaluate_map(z, internal=False)
    assert out["quantization_error"] == pytest.approx(quantization_error(d), rel=1e-5)
    assert out["topographic_error"] == pytest.approx(
        topographic_error(d, unit_distances=model.unit_distances), abs=1e-12)
    assert out["n_samples"] == 9000


def test_default_tmax_is_the_papers_up_to_20x20_then_half_the_larger_side():
    from desom.layers import default_tmax

    assert [default_tmax(s) for s in ((8, 8), (20, 20), (5, 20), (24, 10), (40, 40), (100, 3))] == [
        10.0, 10.0, 10.0, 12.0, 20.0, 50.0]


def test_temperatures_take_the_given_values_else_the_map_and_schedule_defaults():
    from desom.layers import temperatures

    assert temperatures((8, 8)) == (10.0, 0.1)
    assert temperatures((40, 40), schedule="topology") == (20.0, 0.7)
    assert temperatures((40, 40), Tmax=5, Tmin=0.5, schedule="topology") == (5.0, 0.5)
    with pytest.raises(UsageError, match=r"need --Tmin <= --Tmax, got 12 > 10$"):
        temperatures((8, 8), Tmin=12)


def test_large_maps_report_the_papers_accuracy_not_the_one_to_one():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10]], np.float32)
    y = rng.integers(0, 3, 300)
    z = (centres[y] + rng.normal(0, 0.5, (300, 2))).astype(np.float32)
    model = Kerasom(2, (3, 3))
    model.set_prototypes(np.repeat(centres, 3, axis=0) + rng.normal(0, 0.3, (9, 2)))
    out = model.evaluate_map(z, y, internal=False)
    assert "acc" not in out and out["acc_kmeans"] == pytest.approx(1.0)
    small = Kerasom(2, (1, 3))
    small.set_prototypes(centres)
    out = small.evaluate_map(z, y, internal=False)
    assert "acc_kmeans" not in out and out["acc"] == pytest.approx(1.0)


def test_named_schedules_give_their_temperatures_and_yield_to_explicit_flags():
    from desom.cli import DesomCommand
    from desom.layers import SCHEDULES

    command = DesomCommand()
    parser = command.parser()
    from desom.benchmark import parser as benchmark_parser

    for p in (parser, benchmark_parser()):  # both spell the names out (no Keras import for --help)
        assert tuple(p._option_string_actions["--schedule"].choices) == tuple(SCHEDULES)
    resolved = {}
    for argv in ([], ["--schedule", "topology"], ["--schedule", "topology", "--Tmin", "0.3"],
                 ["--schedule", "topology", "--map_size", "30", "30"]):
        args = parser.parse_args(argv)
        command.check(args)
        resolved[" ".join(argv)] = (args.Tmax, args.Tmin)
    assert list(resolved.values()) == [(10.0, 0.1), (10.0, 0.7), (10.0, 0.3), (15.0, 0.7)]
    # topology: from 10 down to 0.7 over the run (exponential), never below
    got = [temperature(i, 10000, 10.0, SCHEDULES["topology"]) for i in (0, 5000, 9999, 12000)]
    assert got == pytest.approx([10.0, 10.0 * 0.07 ** (5000 / 9999), 0.7, 0.7])
