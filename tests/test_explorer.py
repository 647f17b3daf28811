"""The map explorer page: its data against numpy, its files, and the page itself in a real browser."""

import json
import os
import re

import numpy as np
import pytest

from common.data import Scaler, load_data
from common.metrics import purity
from desom.explorer import (
    MAX_FEATURES,
    THUMB_SIDE,
    chromium_driver,
    explorer_data,
    open_page,
    render,
    write_explorer,
)
from desom.models import Kerasom
from tests.helpers import explorer_page, run_in_process, unpack


def som_with(prototypes, map_size, topology="rectangular"):
    """A Kerasom whose prototypes are the given ones (no training)."""
    prototypes = np.asarray(prototypes, np.float32)
    som = Kerasom(input_dim=prototypes.shape[1], map_size=map_size, topology=topology)
    som.set_prototypes(prototypes)
    return som


def image_case(n=300, side=6, map_size=(3, 4), seed=0):
    rng = np.random.default_rng(seed)
    units = map_size[0] * map_size[1]
    prototypes = rng.random((units, side * side))
    y = rng.integers(0, 4, n)
    x = np.clip(prototypes[rng.integers(0, units, n)] + 0.2 * rng.normal(size=(n, side * side)), 0, 1)
    return som_with(prototypes, map_size), x.astype(np.float32), y


# ----------------------------------------------------------- the page's data
def test_page_data_match_a_numpy_reference():
    som, x, y = image_case()
    page = explorer_data(som, x, y, image_shape=(6, 6), members=5, class_names=list("abcd"))
    d = ((x[:, None, :] - som.prototypes[None]) ** 2).sum(axis=2)
    bmu = d.argmin(axis=1)
    dist = np.sqrt(d.min(axis=1))
    np.testing.assert_array_equal(unpack(page["bmu"]), bmu)
    np.testing.assert_array_equal(page["hits"], np.bincount(bmu, minlength=12))
    np.testing.assert_allclose(page["umatrix"], som.umatrix(), rtol=1e-5)
    for u in range(12):  # the nearest members, nearest first, with their distances
        mine = np.flatnonzero(bmu == u)
        nearest = mine[np.argsort(dist[mine], kind="stable")][:5]
        np.testing.assert_array_equal(page["members"][u], nearest)
        np.testing.assert_allclose(page["distances"][u], dist[nearest], rtol=1e-3, atol=1e-4)
    counts = np.array(page["label_counts"])
    assert counts.shape == (12, 4) and page["labels"] == list("abcd")
    np.testing.assert_array_equal(counts.sum(axis=1), page["hits"])
    np.testing.assert_array_equal(counts[bmu[0]], np.bincount(y[bmu == bmu[0]], minlength=4))
    np.testing.assert_array_equal(unpack(page["sample_labels"]), y)
    summary = dict(page["summary"])
    assert summary["samples on this page"] == 300
    assert summary["purity"] == pytest.approx(purity(y, bmu), abs=1e-4)
    # images: uint8 over the samples' range; thumbnails of the first members of every unit, in order
    assert page["images"] == {"height": 6, "width": 6, "channels": 1}
    lo, hi = x.min(), x.max()
    protos = unpack(page["prototypes"]).reshape(12, 6, 6, 1)
    expected = np.round(np.clip((som.prototypes - lo) / (hi - lo), 0, 1) * 255).reshape(12, 6, 6, 1)
    assert np.abs(protos.astype(int) - expected).max() <= 1
    assert page["with_payload"] == 5
    thumbs = unpack(page["thumbnails"]).reshape(-1, 6, 6)
    first = page["members"][0][0]
    expected = np.round((x[first] - lo) / (hi - lo) * 255).reshape(6, 6)
    assert np.abs(thumbs[0].astype(int) - expected).max() <= 1
    assert len(thumbs) == sum(len(m) for m in page["members"])
    fewer = explorer_data(som, x, y, image_shape=(6, 6), members=1, class_names=["a", "b"])
    assert fewer["labels"] == ["a", "b", "2", "3"]  # classes without a name go by their number


def test_thumbnails_are_shrunk_and_kept_within_the_budget():
    rng = np.random.default_rng(1)
    side = 2 * THUMB_SIDE + 4  # 68 pixels: block means of 3 -> 22
    x = rng.random((40, side * side * 3)).astype(np.float32)
    som = som_with(x[:4], (2, 2))
    page = explorer_data(som, x, image_shape=(side, side, 3), members=8)
    assert page["images"] == {"height": 22, "width": 22, "channels": 3}
    assert "labels" not in page and [k for k, _ in page["summary"]][1] == "quantization error"
    one_each = explorer_data(som, x, image_shape=(side, side, 3), members=8, thumbnail_bytes=10)
    assert one_each["with_payload"] == 1  # at least one per unit, whatever the budget
    assert len(unpack(one_each["thumbnails"])) == 4 * 22 * 22 * 3
    assert [len(m) for m in one_each["members"]] == [len(m) for m in page["members"]]  # all still listed


def test_tables_show_the_most_varied_features_in_the_data_units():
    rng = np.random.default_rng(2)
    raw = rng.normal(size=(200, 100)) * np.linspace(0.1, 10, 100) + 50
    scaler = Scaler("standard").fit(raw)
    x = scaler.transform(raw)
    som = som_with(x[:6] * np.linspace(0.1, 3, 100), (2, 3), topology="hexagonal")
    names = [f"col{k}" for k in range(100)]
    page = explorer_data(som, x, image_shape=None, scaler=scaler, feature_names=names, members=3)
    decoded = scaler.inverse_transform(som.prototypes)
    keep = np.sort(np.argsort(-decoded.std(axis=0))[:MAX_FEATURES])
    assert page["features"] == [names[k] for k in keep] and page["features_total"] == 100
    np.testing.assert_allclose(unpack(page["components"]).reshape(6, -1), decoded[:, keep], rtol=1e-5)
    rows = unpack(page["rows"]).reshape(-1, len(keep))
    first = page["members"][0][0]
    np.testing.assert_allclose(rows[0], raw[first, keep], rtol=1e-4)  # back in the file's units
    assert page["map"] == {"rows": 2, "cols": 3, "topology": "hexagonal", "toroidal": False}


def test_the_page_is_self_contained_and_text_cannot_break_out_of_it(tmp_path):
    som, x, y = image_case(n=60)
    evil = "</script><script>alert(1)</script>"
    path = write_explorer(tmp_path / "e.html", som, x, y, image_shape=(6, 6), title="a <b> & c",
                          class_names=[evil, "b", "c", "d"], command=f"bin/desom --data '{evil}'")
    html = path.read_text()
    assert html.count("</script>") == 2  # the data block and the script: nothing injected closes one early
    assert not re.search(r"(src|href)\s*=|https?://|@import|fetch\(", html)  # nothing loaded from anywhere
    assert "<title>a &lt;b> &amp; c</title>" in html
    page = explorer_page(path)
    assert page["labels"][0] == evil and page["command"].endswith(f"'{evil}'")
    assert render(page).count("</script>") == 2


# ------------------------------------------------------------------ commands
def desom(capsys, *args):
    """bin/desom's main in this process: its exit code and what it printed."""
    from desom.cli import main

    return run_in_process(main, capsys, *args)


@pytest.mark.slow
def test_bin_desom_writes_the_page_and_explore_rewrites_it(tmp_path, capsys):
    out = tmp_path / "run"
    # (--no_jit: XLA's compilation would take longer than these 40 steps; the page is the point here)
    args = ["--iterations", 40, "--map_size", 3, 3, "--batch_size", 128, "--no_jit", "--save_dir", out,
            "--verbose", 0]
    code, res = desom(capsys, *args)
    assert code == 0, res.err[-2000:]
    results = json.loads((out / "results.json").read_text())
    page = explorer_page(out / "explorer.html")
    assert page["command"] == results["command"] == "bin/desom " + " ".join(map(str, args))
    summary = dict(page["summary"])
    assert summary["training iterations"] == 40 and summary["samples on this page"] == 1797
    assert summary["purity"] == pytest.approx(results["purity"], abs=1e-4)
    assert summary["topographic error"] == pytest.approx(results["topographic_error"], abs=1e-4)
    assert page["labels"] == [str(d) for d in range(10)] and page["images"]["height"] == 8

    code, res = desom(capsys, "explore", "--model", out / "model.keras", "--dataset", "digits",
                      "--out", tmp_path / "again.html", "--members", 3)
    assert code == 0, res.err[-2000:]
    assert "map explorer of the 3x3 map on 1797 samples written to" in res.out
    again = explorer_page(tmp_path / "again.html")
    assert again["hits"] == page["hits"] and max(map(len, again["members"])) == 3
    flat = tmp_path / "flat.npz"  # images saved as rows: drawn as images with --image_shape
    np.savez(flat, x=load_data("digits")[0][0])
    code, res = desom(capsys, "explore", "--model", out / "model.keras", "--data", flat,
                      "--image_shape", 8, 8, "--out", tmp_path / "flat.html")
    assert code == 0, res.err[-2000:]
    assert explorer_page(tmp_path / "flat.html")["images"] == {"height": 8, "width": 8, "channels": 1}
    code, res = desom(capsys, "explore", "--model", out / "model.keras", "--data", flat,
                      "--image_shape", 8, 9)
    assert code == 2 and "H*W*C = 64" in res.err
    assert again["command"] == results["command"]  # the run's, from results.json beside the model

    np.savez(tmp_path / "wide.npz", x=np.zeros((5, 7), np.float32))
    code, res = desom(capsys, "explore", "--model", out / "model.keras", "--data", tmp_path / "wide.npz")
    assert code == 2 and len(res.err.strip().splitlines()) == 1
    assert res.err.strip().endswith(f"the model was trained on digits and expects samples of shape (64,); "
                                    f"{tmp_path / 'wide.npz'} has (7,)")

    code, res = desom(capsys, *args[:-4], "--save_dir", tmp_path / "none", "--no_explorer", "--verbose", 0)
    assert code == 0 and not (tmp_path / "none" / "explorer.html").exists()


@pytest.mark.parametrize("argv, message", [
    (["--model", "missing.keras", "--dataset", "digits"], "model file missing.keras not found"),
    (["--dataset", "digits"], "the following arguments are required: --model"),
    (["--model", "m.keras"], "one of the arguments --dataset --data is required"),
    (["--model", "m.keras", "--dataset", "digits", "--members", "0"], "argument --members: must be in"),
    (["--model", "m.keras", "--dataset", "digits", "--image_shape", "0", "8"],
     "argument --image_shape: must be in [1, inf)"),
])
def test_explore_errors_are_one_line(argv, message, capsys):
    from desom.cli import main
    from tests.helpers import assert_one_line_error

    assert_one_line_error(main, ["explore", *argv], message, capsys)


# ------------------------------------------------------------- in a browser
@pytest.fixture(scope="module")
def browser():
    """Headless Chromium; skip without one (fail in CI, where .ci/run installs it)."""
    from common.errors import UsageError

    try:
        driver = chromium_driver()
    except UsageError as e:
        if os.environ.get("DESOM_REQUIRE_BROWSER") == "1":
            pytest.fail(str(e))
        pytest.skip(str(e))
    yield driver
    driver.quit()


def errors(driver):
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def at_unit(driver, u, click=False):
    """Move the mouse to unit u's centre (and click)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    canvas = driver.find_element(By.ID, "map")
    # Selenium's offsets start at the centre of the element's visible part: scroll the unit into
    # view, then measure from there.
    dx, dy = driver.execute_script(VISIBLE_OFFSET, canvas, u)
    chain = ActionChains(driver).move_to_element_with_offset(canvas, round(dx), round(dy))
    (chain.click() if click else chain).perform()


VISIBLE_OFFSET = """
const [canvas, u] = arguments, [x, y] = explorer.unitCenter(u);
let r = canvas.getBoundingClientRect();
window.scrollBy(r.left + x - window.innerWidth / 2, r.top + y - window.innerHeight / 2);
r = canvas.getBoundingClientRect();
const left = Math.max(r.left, 0), right = Math.min(r.right, window.innerWidth);
const top = Math.max(r.top, 0), bottom = Math.min(r.bottom, window.innerHeight);
return [r.left + x - (left + right) / 2, r.top + y - (top + bottom) / 2];
"""


def text(driver, element_id):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def search(driver, query):
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "search")
    box.clear()
    box.send_keys(query)
    return text(driver, "found")


@pytest.mark.slow
def test_image_page_in_a_browser_hover_click_search_and_layers(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    som, x, y = image_case(n=400, map_size=(4, 5))
    names = ["T-shirt", "Trouser", "Bag", "Sandal"]
    path = write_explorer(tmp_path / "e.html", som, x, y, image_shape=(6, 6), members=6, class_names=names,
                          command="bin/desom --dataset x")
    page = explorer_page(path)
    d = open_page(browser, path)
    assert errors(d) == []
    layers = ["prototypes", "umatrix", "hits", "majority", "purity"]
    assert d.execute_script("return explorer.layers") == layers
    assert "bin/desom --dataset x" in text(d, "command") and "purity" in text(d, "summary")

    u = int(np.argmax(page["hits"]))
    counts = np.array(page["label_counts"][u])
    at_unit(d, u)
    tip = text(d, "tip")
    assert f"unit {u} (row {u // 5}, col {u % 5})" in tip and f"hits {page['hits'][u]}" in tip
    assert names[counts.argmax()] in tip

    at_unit(d, u, click=True)
    title = f"Unit {u} (row {u // 5}, col {u % 5}): {page['hits'][u]} samples"
    assert text(d, "unit-title").startswith(title)
    shown = d.find_elements(By.CSS_SELECTOR, "#members .member")
    assert [int(e.get_attribute("data-row")) for e in shown] == page["members"][u]  # nearest first
    assert len(d.find_elements(By.CSS_SELECTOR, "#members .member canvas")) == len(page["members"][u])

    bmu = unpack(page["bmu"])
    found = search(d, "123")
    assert d.execute_script("return explorer.state.selected") == bmu[123]
    assert d.execute_script("return [...explorer.state.highlight.keys()]") == [bmu[123]]
    assert f"unit {bmu[123]}" in found and names[y[123]] in found
    found = search(d, "trouser")  # a label, any case
    holding = sorted(int(v) for v in np.flatnonzero(np.array(page["label_counts"])[:, 1]))
    assert sorted(d.execute_script("return [...explorer.state.highlight.keys()]")) == holding
    assert found.startswith(f"Trouser: {int((y == 1).sum())} samples in {len(holding)} units")
    assert "no row 400" in search(d, "400")
    assert 'no sample row or label "shoe"' in search(d, "shoe")
    search(d, "")
    assert d.execute_script("return explorer.state.highlight.size") == 0

    for layer in layers[1:] + layers[:1]:
        Select(d.find_element(By.ID, "layer")).select_by_value(layer)
        assert d.execute_script("return explorer.state.layer") == layer
    assert errors(d) == []


@pytest.mark.slow
def test_table_page_on_a_hexagonal_map_in_a_browser(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    rng = np.random.default_rng(3)
    x = rng.normal(size=(150, 4)).astype(np.float32)
    som = som_with(rng.normal(size=(15, 4)), (3, 5), topology="hexagonal")
    path = write_explorer(tmp_path / "t.html", som, x, None, image_shape=None, members=4,
                          feature_names=["w", "x", "y", "z"])
    page = explorer_page(path)
    d = open_page(browser, path)
    assert d.execute_script("return explorer.layers") == ["component", "umatrix", "hits"]
    for u in range(15):  # every hexagon is where the page says, offset rows included
        at_unit(d, u, click=True)
        assert d.execute_script("return explorer.state.selected") == u
    assert d.find_element(By.ID, "component").is_displayed()
    Select(d.find_element(By.ID, "component")).select_by_visible_text("z")
    at_unit(d, 7)
    assert "\nz " in text(d, "tip")
    at_unit(d, 7, click=True)
    rows = d.find_elements(By.CSS_SELECTOR, "#rows tr[data-row]")
    assert [int(r.get_attribute("data-row")) for r in rows] == page["members"][7]
    if rows:
        cells = rows[0].find_elements(By.TAG_NAME, "td")
        assert float(cells[-1].text) == pytest.approx(x[page["members"][7][0], 3], rel=1e-3)
    assert "no labels on this page" in search(d, "cat")
    assert errors(d) == []


@pytest.mark.slow
def test_a_40x40_map_of_70000_samples_stays_small_and_usable(browser, tmp_path):
    rng = np.random.default_rng(4)
    x = rng.random((70000, 784), dtype=np.float32)
    y = rng.integers(0, 10, 70000)
    som = som_with(rng.random((1600, 784)), (40, 40))
    path = write_explorer(tmp_path / "big.html", som, x, y, image_shape=(28, 28),
                          class_names=list("abcdefghij"))
    assert path.stat().st_size < 12 * 2**20
    page = explorer_page(path)
    assert page["with_payload"] == 3  # 4 MiB of 784-byte thumbnails over 1,600 units
    d = open_page(browser, path)
    at_unit(d, 1234, click=True)
    assert d.execute_script("return explorer.state.selected") == 1234
    search(d, "69999")
    assert d.execute_script("return explorer.state.selected") == int(unpack(page["bmu"])[69999])
    assert errors(d) == []
