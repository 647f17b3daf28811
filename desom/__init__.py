"""Deep Embedded Self-Organizing Maps in Keras 3.

Importing this package registers the layers and models with Keras, so
``keras.saving.load_model("model.keras")`` works in a fresh process.
"""

from common.runtime import quiet_tensorflow

quiet_tensorflow()  # before Keras imports TensorFlow: no C++ start-up chatter

from desom.layers import SOMLayer, map_distances, som_loss, temperature  # noqa: E402
from desom.models import DESOM, ConvDESOM, Kerasom, SOMModel, load_model  # noqa: E402

__all__ = ["SOMLayer", "map_distances", "som_loss", "temperature",
           "DESOM", "ConvDESOM", "Kerasom", "SOMModel", "load_model"]
