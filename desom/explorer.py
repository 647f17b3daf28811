"""The map explorer: one self-contained HTML page per trained map.

:func:`write_explorer` writes a page that opens from disk, offline, with no
server: the map as trained (rectangular or hexagonal) coloured by a chosen
layer (decoded prototypes, or for non-image data one component plane; the
U-matrix; hit counts; majority label and purity per unit when labels exist),
a tooltip per unit, the member samples of a clicked unit nearest its
prototype first (thumbnails for images, feature rows for tables), a search
box (a sample's row or a label highlights where it lies) and the run's
numbers and command.

The page is hand-written HTML, one canvas and a short script
(``explorer.html`` beside this module) rather than Bokeh or Plotly: a
standalone page from either inlines its whole JavaScript library before any
data, and the interactions here (thumbnails on click, search by row or
label) would be custom JavaScript callbacks in either. One canvas redraws a
40x40 map in a few milliseconds.

It embeds per-unit summaries, not the data set: for each unit its hits,
U-matrix value, label counts, decoded prototype (images shrunk to at most
:data:`THUMB_SIDE` pixels a side) and the rows and distances of up to
``members`` nearest samples; thumbnails or feature rows of the nearest of
them within ``thumbnail_bytes``; and each sample's best-matching unit and
label (for the search).
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import numpy as np

#: Thumbnails and prototype images are shrunk (block means) to at most this many pixels a side.
THUMB_SIDE = 32
#: Bytes of member thumbnails or feature rows a page embeds by default (the
#: other members are listed by row and distance).
THUMBNAIL_BYTES = 4 * 2**20
#: Non-image data: component planes and member columns kept (the features that
#: vary most over the decoded prototypes).
MAX_FEATURES = 64
TEMPLATE = Path(__file__).with_name("explorer.html")


def _packed(a, dtype) -> dict:
    """A little-endian typed array for the page: ``{"dtype", "data"}`` (base64)."""
    dt = np.dtype(dtype)
    raw = np.ascontiguousarray(a, dtype=dt.newbyteorder("<")).tobytes()
    return {"dtype": dt.name, "data": base64.b64encode(raw).decode("ascii")}


def _finite(v, digits: int = 6):
    """A JSON-safe number: NaN and inf become None."""
    if v is None:
        return None
    v = float(v)
    return round(v, digits) if math.isfinite(v) else None


def _uint8_images(images, lo: float, hi: float) -> np.ndarray:
    """(n, h, w, c) values in [lo, hi] -> uint8, shrunk to at most THUMB_SIDE a side."""
    a = np.clip((np.asarray(images, np.float32) - lo) / ((hi - lo) or 1.0), 0.0, 1.0) * 255.0
    n, h, w, c = a.shape
    step = -(-max(h, w) // THUMB_SIDE)  # ceil
    if step > 1:
        h2, w2 = h // step, w // step
        a = a[:, :h2 * step, :w2 * step].reshape(n, h2, step, w2, step, c).mean(axis=(2, 4))
    return np.round(a).astype(np.uint8)


def _image_shape(shape) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2:
        return (*shape, 1)
    if len(shape) == 3 and shape[-1] in (1, 3):
        return shape
    raise ValueError(f"image_shape must be (height, width) or (height, width, 1 or 3), got {shape}")


def explorer_data(model, x, y=None, *, class_names=None, image_shape=None, scaler=None, results=None,
                  command: str | None = None, title: str = "", members: int = 12,
                  thumbnail_bytes: int = THUMBNAIL_BYTES, feature_names=None, assignment=None) -> dict:
    """Everything the page shows, as a JSON-ready dict (see the module docstring).

    Args:
        model: a trained :class:`~desom.models.SOMModel` (DESOM, ConvDESOM,
            Kerasom, RSWNet's SOM head).
        x: the samples to place on the map, shaped as the model takes them
            (a :class:`~common.diskarray.DiskArray` is read in chunks).
        y: integer labels (0..k-1) or None; :func:`common.data.label_names`
            of ``y`` or ``class_names`` name them.
        image_shape: (height, width[, channels]) when the samples are images
            (drawn as pictures), None for feature vectors (component planes).
        scaler: a fitted :class:`~common.data.Scaler`: feature values are
            shown in the units of the data before scaling.
        results: the run's ``results.json`` (iterations, time, command).
        command: the command line shown (default: the one in ``results``).
        title: the page's title.
        members: rows listed per unit, nearest the prototype first.
        thumbnail_bytes: budget of embedded thumbnails / feature rows; each
            unit gets the same number (at least one).
        feature_names: the columns of table data (default ``feature 0``, ...).
        assignment: ``model.assign_codes`` of the samples' codes when already
            computed (else computed here).
    """
    from common.data import label_names
    from common.metrics import nmi, purity

    results = results or {}
    rows, cols = (int(v) for v in model.map_size)
    n_units = model.n_units
    n = len(x)
    bmu, sq, qe, te = assignment or model.assign_codes(model.transform(x))
    dist = np.sqrt(sq)
    hits = np.bincount(bmu, minlength=n_units)
    order = np.lexsort((dist, bmu))  # unit by unit, nearest first
    start = np.concatenate([[0], np.cumsum(hits)[:-1]])
    listed = np.minimum(hits, members)

    decoded = np.asarray(model.decode_prototypes(), np.float32)
    if image_shape is not None:
        shape = _image_shape(image_shape)
        per_sample = int(np.prod(_uint8_images(np.zeros((1, *shape)), 0, 1).shape))
    else:
        decoded = decoded.reshape(n_units, -1)
        if scaler is not None:
            decoded = scaler.inverse_transform(decoded)
        spread = decoded.std(axis=0)
        keep = np.sort(np.argsort(-spread, kind="stable")[:MAX_FEATURES])
        per_sample = 4 * len(keep)
    with_payload = int(max(1, min(members, thumbnail_bytes // max(1, n_units * per_sample))))
    payload_rows = np.concatenate([order[s:s + min(k, with_payload)] for s, k in zip(start, listed)])
    sample_rows = np.asarray(x[payload_rows], np.float32)

    page = {
        "title": title, "command": command or results.get("command"),
        "map": {"rows": rows, "cols": cols, "topology": model.topology, "toroidal": bool(model.toroidal)},
        "n_samples": n,
        "bmu": _packed(bmu, np.uint16 if n_units < 2**16 else np.uint32),
        "hits": hits.tolist(),
        "umatrix": [_finite(v) for v in model.umatrix()],
        "members": [[int(i) for i in order[s:s + k]] for s, k in zip(start, listed)],
        "distances": [[_finite(d, 4) for d in dist[order[s:s + k]]] for s, k in zip(start, listed)],
        "with_payload": with_payload,
    }
    if image_shape is not None:
        images = sample_rows.reshape(len(sample_rows), *shape)
        lo, hi = float(images.min()), float(images.max())  # the samples' range; prototypes are clipped to it
        thumbs = _uint8_images(images, lo, hi)
        page["images"] = dict(zip(("height", "width", "channels"), (int(s) for s in thumbs.shape[1:])))
        page["prototypes"] = _packed(_uint8_images(decoded.reshape(n_units, *shape), lo, hi), np.uint8)
        page["thumbnails"] = _packed(thumbs, np.uint8)
    else:
        names = list(feature_names) if feature_names is not None else [f"feature {k}" for k in
                                                                         range(decoded.shape[1])]
        values = scaler.inverse_transform(sample_rows) if scaler is not None else sample_rows
        page["features"] = [str(names[k]) for k in keep]
        page["features_total"] = int(decoded.shape[1])
        page["components"] = _packed(decoded[:, keep], np.float32)
        page["rows"] = _packed(values.reshape(len(values), -1)[:, keep], np.float32)

    summary = [["samples on this page", n]]
    if y is not None:
        names = label_names(y) or class_names  # before the cast: a file's labels carry their names
        y = np.asarray(y, np.int64)
        k = max(int(y.max()) + 1, len(names) if names is not None else 0)
        counts = np.bincount(bmu * k + y, minlength=n_units * k).reshape(n_units, k)
        names = [str(v) for v in (names or [])]
        page["labels"] = names + [str(c) for c in range(len(names), k)]  # unnamed classes by number
        page["label_counts"] = counts.tolist()
        page["sample_labels"] = _packed(y, np.uint8 if k <= 256 else np.uint16 if k <= 2**16 else np.uint32)
        summary += [["purity", _finite(purity(y, bmu), 4)], ["NMI", _finite(nmi(y, bmu), 4)]]
    summary += [["quantization error", _finite(qe, 4)], ["topographic error", _finite(te, 4)]]
    if results.get("iterations") is not None:
        summary.append(["training iterations", results["iterations"]])
    total = (results.get("timings") or {}).get("total_seconds")
    if total is not None:
        summary.append(["run time (s)", round(float(total), 1)])
    page["summary"] = summary
    return page


def render(page: dict) -> str:
    """The HTML text of a page from :func:`explorer_data`."""
    text = json.dumps(page, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    template = TEMPLATE.read_text(encoding="utf-8")
    title = (page.get("title") or "map").replace("&", "&amp;").replace("<", "&lt;")
    return template.replace("__TITLE__", title).replace("__EXPLORER_DATA__", text)


def write_explorer(path, model, x, y=None, **options) -> Path:
    """Write the explorer page of ``model`` on samples ``x`` to ``path``
    (atomically); ``options`` go to :func:`explorer_data`."""
    from common.results import atomic_path

    html = render(explorer_data(model, x, y, **options))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(html, encoding="utf-8")
    return path


def chromium_driver(width: int = 1400, height: int = 1000):
    """A headless Chromium under Selenium (the tests and ``desom-benchmark
    --explorer`` look at pages with it); :class:`~common.errors.UsageError`
    naming the packages when one is missing."""
    import shutil

    from common.errors import UsageError

    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")
                    if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise UsageError("selenium is not installed: pip install selenium") from None
    if browser is None or driver is None:
        raise UsageError("no Chromium or chromedriver found: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.binary_location = browser
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def open_page(driver, path, timeout: float = 60):
    """Load a page in ``driver`` and wait until its script has drawn the map."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(Path(path).resolve().as_uri())
    WebDriverWait(driver, timeout).until(
        lambda d: d.execute_script("return !!(window.explorer && explorer.ready)"))
    return driver
