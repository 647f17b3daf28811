"""Deep Embedded Self-Organizing Maps in Keras 3.

Importing this package registers the layers and models with Keras, so
``keras.saving.load_model("model.keras")`` works in a fresh process.
"""

from common.runtime import quiet_tensorflow

quiet_tensorflow()  # before Keras imports TensorFlow: no C++ start-up chatter

from desom.layers import SOMLayer, map_distances, som_loss, temperature  # noqa: E402
from desom.models import DESOM, ConvDESOM, Kerasom, SOMModel, load_model  # noqa: E402

__all__ = ["fit", "SOMLayer", "map_distances", "som_loss", "temperature",
           "DESOM", "ConvDESOM", "Kerasom", "SOMModel", "load_model"]


def fit(x=None, y=None, **flags):
    """Train as ``bin/desom`` does, from Python: its flags as keyword
    arguments, e.g. ``desom.fit(x, map_size=(8, 8), iterations=2000, save_dir="results/x")``.
    ``x`` (and labels ``y``, for the reports) are samples in memory; or give
    ``data=`` or ``dataset=``. Returns the run: ``run.model``, ``run.results``,
    ``run.save_dir`` (see :meth:`common.command.TrainingCommand.fit`)."""
    from desom.cli import DesomCommand

    return DesomCommand().fit(x, y, **flags)
