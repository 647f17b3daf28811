"""Figures written by the command-line programs (matplotlib, Agg backend).

Maps are drawn with unit 0 at the top left and rows going down, as the
units are numbered; hexagonal maps shift odd rows half a unit to the right.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import RegularPolygon  # noqa: E402


def _positions(map_size, topology):
    rows, cols = map_size
    r, c = np.divmod(np.arange(rows * cols), cols)
    if topology == "hexagonal":
        return c + 0.5 * (r % 2), r * np.sqrt(3) / 2
    return c.astype(float), r.astype(float)


def save_figure(fig, path, bbox_inches="tight"):
    """Write ``fig`` atomically (a failed redraw keeps the old picture), then close it."""
    from common.results import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, bbox_inches=bbox_inches, dpi=100)
    plt.close(fig)
    return path


def prototype_grid(images, map_size, path, topology: str = "rectangular", title: str | None = None):
    """Draw one image per unit at its place on the map (decoded prototypes).

    ``images``: (units, H, W) or (units, H, W, C) with C = 1 or 3.
    """
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    rows, cols = map_size
    x, y = _positions(map_size, topology)
    width = cols + (0.5 if topology == "hexagonal" and rows > 1 else 0.0)
    height = (y.max() + 1.0) if rows else 1.0
    scale = min(12.0 / width, 12.0 / height, 1.2)
    fig = plt.figure(figsize=(width * scale, height * scale))
    lo, hi = float(np.min(images)), float(np.max(images))
    for k, img in enumerate(images):
        ax = fig.add_axes([x[k] / width, 1.0 - (y[k] + 1.0) / height, 0.95 / width, 0.95 / height])
        ax.imshow(np.clip((img - lo) / (hi - lo + 1e-12), 0, 1), cmap="gray" if img.ndim == 2 else None,
                  interpolation="nearest")
        ax.set_axis_off()
    if title:
        fig.suptitle(title, y=1.02)
    return save_figure(fig, path)


def image_rows(rows, path, title: str | None = None):
    """Rows of images, each with a label on its left: ``rows`` is a list of
    ``(label, images)``, images (n, H, W) or (n, H, W, C) in [0, 1] (e.g.
    originals above reconstructions, or one generated row per cluster)."""
    rows = [(label, np.asarray(images)) for label, images in rows]
    cols = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(0.9 * cols + 1.2, 0.95 * len(rows) + 0.4),
                             squeeze=False)
    for (label, images), line in zip(rows, axes):
        if images.ndim == 4 and images.shape[-1] == 1:
            images = images[..., 0]
        for i, ax in enumerate(line):
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if i < len(images):
                ax.imshow(np.clip(images[i], 0, 1), cmap="gray" if images[i].ndim == 2 else None,
                          vmin=0, vmax=1, interpolation="nearest")
        line[0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def _hexes(ax, values, map_size, cmap, label):
    x, y = _positions(map_size, "hexagonal")
    norm = matplotlib.colors.Normalize(np.min(values), np.max(values))
    colors = matplotlib.colormaps[cmap](norm(values))
    for xi, yi, col in zip(x, y, colors):
        ax.add_patch(RegularPolygon((xi, yi), numVertices=6, radius=1 / np.sqrt(3),
                                    facecolor=col, edgecolor="white", linewidth=0.5))
    ax.set_xlim(-0.6, x.max() + 0.6)
    ax.set_ylim(y.max() + 0.7, -0.7)
    ax.set_aspect("equal")
    ax.set_axis_off()
    sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
    plt.colorbar(sm, ax=ax, fraction=0.046, label=label)


def map_heatmaps(panels: dict, map_size, path, topology: str = "rectangular", title: str | None = None):
    """One heat map per entry of ``panels`` (name -> value per unit), side by side."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    cmaps = {"U-matrix": "bone_r", "hits": "viridis"}
    for ax, (name, values) in zip(axes[0], panels.items()):
        values = np.asarray(values, float)
        cmap = cmaps.get(name, "viridis")
        if topology == "hexagonal":
            _hexes(ax, values, map_size, cmap, name)
        else:
            im = ax.imshow(values.reshape(map_size), cmap=cmap, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            plt.colorbar(im, ax=ax, fraction=0.046, label=name)
        if len(panels) > 1:
            ax.set_title(name)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def training_curves(log, path, columns=("loss", "purity", "nmi", "quantization_error", "topographic_error")):
    """Plot the columns of a training log (a DataFrame) against the iteration."""
    present = [c for c in columns if c in log and log[c].notna().any()]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(3.6 * len(present), 3.0), squeeze=False)
    for ax, col in zip(axes[0], present):
        rows = log[log[col].notna()]
        ax.plot(rows["iteration"], rows[col], marker=".")
        ax.set_xlabel("iteration")
        ax.set_title(col)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def confusion_matrix(cm, class_names, path, title: str | None = None, row_names=None):
    """A labelled confusion matrix: rows are true classes (``row_names``,
    default ``class_names``), columns predicted ones (``class_names``)."""
    cm = np.asarray(cm)
    rows = list(class_names if row_names is None else row_names)
    size = max(4.0, 0.55 * max(len(class_names), len(rows)) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black", fontsize=8)
    plt.colorbar(im, ax=ax, fraction=0.046)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def scatter_panels(panels, path, title: str | None = None):
    """Side-by-side 2-d scatter plots: ``panels`` is a list of
    ``(title, xy, labels)`` with ``xy`` of shape (n, 2) and one label per
    point (up to 20 distinct labels get their own colours and a legend; more
    are drawn with a continuous colour map)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (name, xy, labels) in zip(axes[0], panels):
        xy, labels = np.asarray(xy), np.asarray(labels)
        kinds = np.unique(labels)
        if len(kinds) <= 20:
            cmap = plt.get_cmap("tab10" if len(kinds) <= 10 else "tab20")
            for i, k in enumerate(kinds):
                at = labels == k
                ax.scatter(xy[at, 0], xy[at, 1], s=4, color=cmap(i), label=str(k), alpha=0.7, linewidths=0)
            ax.legend(markerscale=3, fontsize=6, loc="best", frameon=False, ncol=2)
        else:
            ax.scatter(xy[:, 0], xy[:, 1], s=4, c=np.searchsorted(kinds, labels), cmap="viridis", alpha=0.7,
                       linewidths=0)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def project_2d(features, kind: str = "tsne", seed: int = 0) -> np.ndarray:
    """(n, 2) coordinates of ``features``: ``"pca"`` or ``"tsne"`` (scikit-learn;
    t-SNE after a PCA to 50 dimensions for wider features, perplexity at
    most 30 and a third of the samples)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    features = np.asarray(features, np.float32).reshape(len(features), -1)
    if kind == "pca":
        return PCA(2, random_state=seed).fit_transform(features)
    if features.shape[1] > 50 and len(features) > 50:
        features = PCA(50, random_state=seed).fit_transform(features)
    perplexity = min(30.0, (len(features) - 1) / 3.0)
    return TSNE(2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(features)


def architecture(model, path, expand_nested: bool = True) -> Path:
    """``keras.utils.plot_model`` to ``path`` (.png), nested models expanded
    unless ``expand_nested=False`` (a ResNet50 expanded is hundreds of boxes).

    Graphviz's ``dot`` aborts on some nested layouts (an assertion in its
    orthogonal router); the plot is then drawn without expanding the nested
    models. Without Graphviz, or if both fail, the text summary goes to a
    ``.txt`` beside it, with one warning on stderr. Returns the path written
    (atomically, as every file of a run).
    """
    import keras

    from common.results import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    reason = ""
    for expand in ((True, False) if expand_nested else (False,)):
        try:  # pydot prints dot's failure before raising it; the one warning below says it instead
            with (contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()),
                  atomic_path(path) as tmp):
                keras.utils.plot_model(model, to_file=str(tmp), show_shapes=True, expand_nested=expand,
                                       dpi=72)
            return path
        except ImportError as e:  # no pydot or no dot program: no second try
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            break
        except (AssertionError, OSError) as e:  # dot failed on this layout
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    lines = []
    model.summary(print_fn=lambda line, *a, **k: lines.append(line), expand_nested=True)
    txt = path.with_suffix(".txt")
    with atomic_path(txt) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print(f"warning: no architecture plot ({reason}); install Graphviz (apt-get install graphviz) "
          f"for {path.name}; wrote {txt.name} instead", file=sys.stderr)
    return txt
