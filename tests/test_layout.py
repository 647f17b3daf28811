"""The package layout: dependencies only downward, no import cycle, one loader."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Each package may import those before it, never one after it: rswnet builds on dcn's clustering
#: layer and desom's SOM layer, dcn's two-stage clustering and self-labelling on desom's SOM.
LAYERS = ("common", "desom", "dcn", "rswnet")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict:
    """Module -> the toolkit's modules it imports, at the top or inside functions."""
    modules = {module_name(p): p for layer in LAYERS for p in (ROOT / layer).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # "from pkg import sub" imports the submodule when there is one
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            else:
                continue
            found |= {t for t in targets if t.split(".")[0] in LAYERS and t != name}
        graph[name] = found
    return graph


def test_packages_import_only_the_packages_below_them():
    upward = [f"{m} imports {t}" for m, targets in imports().items() for t in targets
              if LAYERS.index(t.split(".")[0]) > LAYERS.index(m.split(".")[0])]
    assert not upward, upward


def test_no_import_cycle_even_through_imports_inside_functions():
    graph = imports()
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


@pytest.mark.parametrize("package", LAYERS[1:])
def test_every_subpackage_says_what_is_inside(package):
    for init in (ROOT / package).rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 80, init


CHILD = """
import sys, numpy as np, keras
how, folder = sys.argv[1], sys.argv[2]
inputs = np.load(folder + "/inputs.npz")
for name, expected in np.load(folder + "/outputs.npz").items():
    path = f"{folder}/{name}.keras"
    if how == "keras":  # the top package imported, then Keras' own loader
        if name.startswith("rswnet"):
            continue  # (two ResNet50s: loaded once, by the toolkit's loader)
        __import__(name.split("-")[0])
        model = keras.saving.load_model(path)
    else:  # the toolkit's loader, nothing imported before
        from common.networks import load_model
        model = load_model(path)
    x = inputs[name] if name + "-y" not in inputs else (inputs[name], inputs[name + "-y"])
    got = np.concatenate([np.ravel(a) for a in keras.tree.flatten(model(x, training=False))])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=name)
    print(name, type(model).__name__, "ok")
"""


@pytest.mark.slow
def test_every_model_type_loads_in_a_fresh_process_with_one_loader(tmp_path):
    """Every model the toolkit saves predicts the same in a new process, with
    keras.saving.load_model after importing its top package and with
    common.networks.load_model alone."""
    import os
    import subprocess
    import sys

    import keras
    import numpy as np

    from common.networks import save_keras_model
    from dcn.autoencoders.models import build
    from dcn.dec.models import DCN
    from dcn.selflabel.network import SelfLabelNet
    from desom.models import DESOM, ConvDESOM, Kerasom
    from rswnet.models import RSWNet, RSWNetSOM

    x = np.random.default_rng(0).random((4, 28, 28, 1)).astype("float32")
    flat = x.reshape(4, -1)
    models = {
        "desom-DESOM": (DESOM(784, (2, 2), hidden=(16,)), flat),
        "desom-ConvDESOM": (ConvDESOM((28, 28, 1), (2, 2), filters=(4,)), x),
        "desom-Kerasom": (Kerasom(784, (2, 2)), flat),
        "dcn-DCN": (DCN((28, 28, 1), 3, architecture="conv", filters=(4, 4, 4)), x),
        "dcn-SelfLabelNet": (SelfLabelNet((28, 28, 1), 3, filters=(4,), dense=(8,), head=(8,)), x),
        "rswnet-RSWNet": (RSWNet((28, 28, 1), 3, input_size=32), x),
        "rswnet-RSWNetSOM": (RSWNetSOM((28, 28, 1), (2, 2), input_size=32), x),
    }
    for kind in ("ae", "semisupervised", "vae", "cvae"):
        models[f"dcn-{kind}"] = (build(kind, (28, 28, 1), 3, hidden=(8,), latent_dim=2), x)
    inputs, outputs = {}, {}
    for name, (model, xin) in models.items():
        inputs[name] = xin
        call_input = xin
        if name == "dcn-cvae":  # with each sample's label
            inputs[name + "-y"] = labels = np.array([0, 1, 2, 0], "int32")
            call_input = (xin, labels)
        out = keras.tree.flatten(model(call_input, training=False))
        outputs[name] = np.concatenate([np.ravel(a) for a in out])
        save_keras_model(model, tmp_path / f"{name}.keras")
    np.savez(tmp_path / "inputs.npz", **inputs)
    np.savez(tmp_path / "outputs.npz", **outputs)
    root = Path(__file__).resolve().parent.parent
    for how in ("keras", "toolkit"):
        done = subprocess.run([sys.executable, "-c", CHILD, how, str(tmp_path)], capture_output=True,
                              text=True, cwd=root, timeout=600, env={**os.environ, "PYTHONPATH": str(root)})
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count(" ok") == len(models) - 2 * (how == "keras"), done.stdout
