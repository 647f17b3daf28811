"""The self-organizing-map mathematics, in one place.

* :func:`map_distances`: distances between the units of a rectangular or
  hexagonal map, optionally toroidal (wrapping around its edges).
* :data:`KERNELS`: the neighbourhood kernels ``gaussian`` exp(-d^2 / T^2) and
  ``window`` (d <= T).
* :func:`temperature`: the neighbourhood radius T at an iteration
  (``exponential``, ``linear`` or ``constant`` decay from Tmax to Tmin);
  :func:`temperature_op`, the same as a tensor inside the compiled step.
* :class:`SOMLayer`: the prototypes as a Keras layer returning squared
  Euclidean distances; :func:`som_loss`: the SOM loss of DESOM.
* :func:`umatrix` and :func:`batch_som`: numpy tools on trained prototypes.

Units are numbered row by row: unit ``k`` sits at row ``k // width`` and
column ``k % width``. Hexagonal maps use the "odd-r" layout: odd rows are
shifted half a unit to the right, and every unit has six neighbours at
distance 1.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from common.errors import UsageError

TOPOLOGIES = ("rectangular", "hexagonal")
DECAYS = ("exponential", "linear", "constant")


# --------------------------------------------------------------------------- #
# Map geometry (numpy: computed once per map)
# --------------------------------------------------------------------------- #
#: Most units of a map: distances between units are kept as a units x units
#: matrix (10,000 units: 400 MB in float32), which grows with the square.
MAX_UNITS = 10_000


def check_map(map_size, topology: str = "rectangular", toroidal: bool = False,
              flag: str = "map_size") -> tuple[int, int]:
    """Validate a map description; returns (rows, cols) as ints. ``flag``
    names the map in messages (``--som_map_size`` for a command's flag)."""
    try:
        rows, cols = (int(v) for v in map_size)
    except (TypeError, ValueError):
        raise UsageError(f"{flag} must be two integers (rows, cols), got {map_size!r}") from None
    if rows < 1 or cols < 1:
        raise UsageError(f"{flag} must be positive, got {rows} x {cols}")
    if rows * cols > MAX_UNITS:
        raise UsageError(f"{flag} {rows} {cols} has {rows * cols} units; at most {MAX_UNITS} are supported "
                         "(the units x units distance matrix grows with the square)")
    if topology not in TOPOLOGIES:
        raise UsageError(f"unknown topology '{topology}'; choose {' or '.join(TOPOLOGIES)}")
    if toroidal and topology == "hexagonal" and rows % 2:
        raise UsageError(f"a toroidal hexagonal map needs an even number of rows, got {rows}")
    return rows, cols


def unit_coordinates(map_size, units=None) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each unit index (all units when ``units`` is None)."""
    rows, cols = check_map(map_size)
    units = np.arange(rows * cols) if units is None else np.asarray(units)
    return units // cols, units % cols


def _hex_distance(r1, c1, r2, c2):
    # odd-r offset -> axial coordinates, then the hexagonal (cube) distance.
    q1, q2 = c1 - (r1 - (r1 & 1)) // 2, c2 - (r2 - (r2 & 1)) // 2
    dq, dr = q1 - q2, r1 - r2
    return (np.abs(dq) + np.abs(dr) + np.abs(dq + dr)) // 2


def map_distances(map_size, topology: str = "rectangular", toroidal: bool = False) -> np.ndarray:
    """(units, units) matrix of grid distances between the units of a map.

    Rectangular maps use the Manhattan distance |row_k - row_l| + |col_k -
    col_l| (computed from the coordinates: the original DESOM's
    ``|k - l| // width`` row term is wrong across row ends). Hexagonal maps
    use the number of steps between hexagons. Toroidal maps take the shortest
    way around the edges. Computed a block of rows at a time, so that a map
    of :data:`MAX_UNITS` units needs little more than the result's 400 MB.
    """
    rows, cols = check_map(map_size, topology, toroidal)
    r, c = unit_coordinates((rows, cols))
    n = rows * cols
    d = np.empty((n, n), np.float32)
    step = max(1, 2**22 // n)  # about 4 million distances per block
    for start in range(0, n, step):
        block = slice(start, start + step)
        d[block] = _distances(r[block, None], c[block, None], r[None, :], c[None, :], rows, cols,
                              topology, toroidal)
    return d


def _distances(r1, c1, r2, c2, rows: int, cols: int, topology: str, toroidal: bool) -> np.ndarray:
    if topology == "rectangular":
        dr, dc = np.abs(r1 - r2), np.abs(c1 - c2)
        if toroidal:
            dr, dc = np.minimum(dr, rows - dr), np.minimum(dc, cols - dc)
        return dr + dc
    if not toroidal:
        return _hex_distance(r1, c1, r2, c2)
    # Shortest over the images of the map shifted by whole periods; an even
    # row count keeps the odd-row offsets aligned across the seam.
    return np.min([_hex_distance(r1, c1, r2 + i * rows, c2 + j * cols)
                   for i in (-1, 0, 1) for j in (-1, 0, 1)], axis=0)


# --------------------------------------------------------------------------- #
# Neighbourhood kernels and temperature schedules
# --------------------------------------------------------------------------- #
def gaussian_kernel(d, T):
    """exp(-d^2 / T^2): 1 at the best-matching unit, smooth decay around it."""
    return ops.exp(-ops.square(d) / (T * T))


def window_kernel(d, T):
    """1 for units within map distance T of the best-matching unit, else 0."""
    return ops.cast(ops.less_equal(d, T), "float32")


KERNELS = {"gaussian": gaussian_kernel, "window": window_kernel}


#: Named temperature schedules: the final radius Tmin that T decays to
#: (exponentially, from Tmax, over the iterations). ``paper``: DESOM's 0.1,
#: where the neighbourhood has all but vanished and the map ends as k-means
#: on its units (topographic error 0.52 on Fashion-MNIST 8x8, 0.65 on 20x20).
#: ``topology``: 0.7, where each unit still pulls its neighbours by exp(-1/0.49)
#: = 0.13 (8x8, 3 seeds: 0.24 for 0.014 less purity, or the paper's purity in
#: 30,000 iterations; 20x20, one seed: 0.31 for 0.007 less); see the README.
SCHEDULES = {"paper": 0.1, "topology": 0.7}


def default_tmax(map_size) -> float:
    """The starting radius for a map: the paper's 10 up to 20x20, half the
    larger side beyond (a radius of 10 on a 40x40 map never orders it as a
    whole: distant corners start independent)."""
    return max(10.0, max(int(v) for v in map_size) / 2.0)


def temperatures(map_size, Tmax: float | None = None, Tmin: float | None = None,
                 schedule: str = "paper") -> tuple[float, float]:
    """A run's (Tmax, Tmin): the values given, else :func:`default_tmax` of
    the map and the named schedule's end (:data:`SCHEDULES`). Raises
    UsageError when Tmin > Tmax."""
    Tmax = default_tmax(map_size) if Tmax is None else float(Tmax)
    Tmin = SCHEDULES[schedule] if Tmin is None else float(Tmin)
    if Tmin > Tmax:
        raise UsageError(f"need --Tmin <= --Tmax, got {Tmin:g} > {Tmax:g}")
    return Tmax, Tmin


def temperature(iteration: int, iterations: int, Tmax: float, Tmin: float,
                decay: str = "exponential") -> float:
    """Neighbourhood radius T at ``iteration`` of a schedule of ``iterations``.

    exponential: Tmax (Tmin/Tmax)^(it/(iterations-1)); linear: Tmax - (Tmax -
    Tmin) it/(iterations-1); constant: Tmax. Iterations past the schedule
    stay at its last value.
    """
    if decay not in DECAYS:
        raise ValueError(f"unknown decay '{decay}'; choose one of {', '.join(DECAYS)}")
    if decay == "constant":
        return float(Tmax)
    frac = min(iteration, iterations - 1) / max(iterations - 1, 1)
    if decay == "exponential":
        return float(Tmax * (Tmin / Tmax) ** frac)
    return float(Tmax - (Tmax - Tmin) * frac)


def temperature_op(iteration, iterations: int, Tmax: float, Tmin: float, decay: str = "exponential",
                   update_interval: int = 1):
    """:func:`temperature` as a float32 tensor, for use inside a compiled step.

    ``iteration`` is an integer tensor (the training loop's counter); T is
    held for ``update_interval`` iterations at a time (its value at the last
    multiple of ``update_interval``).
    """
    if decay not in DECAYS:
        raise ValueError(f"unknown decay '{decay}'; choose one of {', '.join(DECAYS)}")
    if decay == "constant" or iterations <= 1:
        return ops.convert_to_tensor(Tmax, "float32")
    it = ops.convert_to_tensor(iteration, "int64")
    it = it - it % int(update_interval)
    # Counted from the end of the schedule, where T is small: float32 keeps its
    # relative precision there (Tmax - (Tmax - Tmin) frac would cancel).
    last = float(iterations - 1)
    rest = (last - ops.minimum(ops.cast(it, "float32"), last)) / last
    if decay == "exponential":
        return Tmin * ops.exp(rest * float(np.log(Tmax / Tmin)))
    return Tmin + (Tmax - Tmin) * rest


# --------------------------------------------------------------------------- #
# The layer and the loss
# --------------------------------------------------------------------------- #
@keras.saving.register_keras_serializable(package="desom")
class SOMLayer(keras.layers.Layer):
    """Prototypes of a self-organizing map; outputs squared distances to them.

    Args:
        map_size: (rows, cols) of the map; ``rows * cols`` prototypes.
        topology: ``rectangular`` or ``hexagonal``.
        toroidal: whether the map wraps around its edges.
        prototypes: optional initial values, shape (units, dim); otherwise
            Glorot-uniform.

    Input (batch, dim) -> output (batch, units): ||z - w_k||^2 for each unit.
    The layer computes in float32 even under a mixed-precision policy.
    """

    def __init__(self, map_size, topology: str = "rectangular", toroidal: bool = False,
                 prototypes=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.map_size = check_map(map_size, topology, toroidal)
        self.topology = topology
        self.toroidal = bool(toroidal)
        self.n_units = self.map_size[0] * self.map_size[1]
        self.unit_distances = map_distances(self.map_size, topology, toroidal)
        self._initial = None if prototypes is None else np.asarray(prototypes, np.float32)
        if self._initial is not None and self._initial.shape[0] != self.n_units:
            raise ValueError(f"{self._initial.shape[0]} initial prototypes for {self.n_units} units")

    def build(self, input_shape):
        dim = int(input_shape[-1])
        self.prototypes = self.add_weight(shape=(self.n_units, dim), initializer="glorot_uniform",
                                          name="prototypes")
        if self._initial is not None:
            if self._initial.shape != (self.n_units, dim):
                raise ValueError(f"initial prototypes of shape {self._initial.shape}, "
                                 f"expected {(self.n_units, dim)}")
            self.prototypes.assign(self._initial)
            self._initial = None

    def call(self, inputs):
        # ||z||^2 - 2 z.w + ||w||^2 as one matrix product: no (batch, units, dim)
        # intermediate, which matters for plain SOMs on raw pixels.
        z2 = ops.sum(ops.square(inputs), axis=-1, keepdims=True)
        w2 = ops.sum(ops.square(self.prototypes), axis=-1)
        d = z2 - 2.0 * ops.matmul(inputs, ops.transpose(self.prototypes)) + w2[None, :]
        return ops.maximum(d, 0.0)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.n_units)

    def get_config(self):
        config = super().get_config()
        config.update(map_size=list(self.map_size), topology=self.topology, toroidal=self.toroidal)
        return config

    def loss(self, sq_distances, T, kernel: str = "gaussian"):
        """Per-sample SOM loss of this map; see :func:`som_loss`."""
        return som_loss(sq_distances, self.unit_distances, T, kernel)


def som_loss(sq_distances, unit_distances, T, kernel: str = "gaussian"):
    """Per-sample SOM loss: sum over units of K(d_map(bmu, k), T) ||z - w_k||^2.

    The best-matching unit is the nearest prototype, found in the same step
    with no gradient through the choice nor through the kernel weights. The
    DESOM loss is the batch mean of this (times gamma) plus the reconstruction
    error.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown neighbourhood '{kernel}'; choose one of {', '.join(KERNELS)}")
    bmu = ops.argmin(ops.stop_gradient(sq_distances), axis=1)
    weights = KERNELS[kernel](ops.take(ops.convert_to_tensor(unit_distances), bmu, axis=0), T)
    return ops.sum(ops.stop_gradient(weights) * sq_distances, axis=1)


# --------------------------------------------------------------------------- #
# numpy tools on prototypes
# --------------------------------------------------------------------------- #
def pairwise_sq_distances(z: np.ndarray, prototypes: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """(samples, units) squared Euclidean distances, computed in chunks."""
    z = np.asarray(z, np.float32).reshape(len(z), -1)
    p = np.asarray(prototypes, np.float32).reshape(len(prototypes), -1)
    p2 = (p * p).sum(axis=1)
    out = np.empty((len(z), len(p)), np.float32)
    for s in range(0, len(z), chunk):
        zc = z[s:s + chunk]
        out[s:s + chunk] = (zc * zc).sum(axis=1, keepdims=True) - 2.0 * zc @ p.T + p2
    return np.maximum(out, 0.0, out=out)


def distance_chunks(z, prototypes: np.ndarray, chunk: int = 8192):
    """(start, squared distances of ``z[start:start + chunk]`` to the prototypes),
    chunk after chunk: whole-data statistics without the (samples, units)
    matrix. ``z`` may be anything sliced into arrays (e.g. a
    :class:`~common.diskarray.DiskArray`)."""
    for start in range(0, len(z), chunk):
        yield start, pairwise_sq_distances(z[start:start + chunk], prototypes)


def umatrix(prototypes: np.ndarray, unit_distances: np.ndarray) -> np.ndarray:
    """Mean distance of each prototype to the prototypes of its neighbour units.

    High values mark borders between clusters on the map.
    """
    p = np.asarray(prototypes, np.float64).reshape(len(prototypes), -1)
    dist = np.sqrt(pairwise_sq_distances(p, p).astype(np.float64))
    neighbours = np.asarray(unit_distances) == 1
    counts = np.maximum(neighbours.sum(axis=1), 1)
    return (dist * neighbours).sum(axis=1) / counts


def batch_som(z: np.ndarray, unit_distances: np.ndarray, init: np.ndarray, epochs: int = 10,
              Tmax: float = 10.0, Tmin: float = 1.0, kernel: str = "gaussian") -> np.ndarray:
    """A plain batch SOM fit of prototypes to ``z`` (used to initialise DESOM).

    Each epoch assigns every sample to its best-matching unit, then moves
    each prototype to the kernel-weighted mean of all samples, with T decaying
    exponentially from Tmax to Tmin over the epochs.
    """
    z = np.asarray(z, np.float32).reshape(len(z), -1)
    p = np.asarray(init, np.float32).copy()
    for epoch in range(epochs):
        T = temperature(epoch, epochs, Tmax, Tmin)
        bmu = pairwise_sq_distances(z, p).argmin(axis=1)
        h = ops.convert_to_numpy(KERNELS[kernel](unit_distances, T))  # (units, units)
        counts = np.bincount(bmu, minlength=len(p)).astype(np.float64)
        sums = np.zeros((len(p), z.shape[1]))
        np.add.at(sums, bmu, z)
        num, den = h @ sums, h @ counts
        keep = den > 1e-12
        p[keep] = (num[keep] / den[keep, None]).astype(np.float32)
    return p
