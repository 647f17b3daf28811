"""RSWNet: a ResNet50 application encoder and a decoder with a clustering head
(the published Fashion-MNIST model) or a self-organizing-map head, and the
honest comparison with k-means, SOMs and DESOM (``bin/rswnet``).

Importing this package registers the layers and models with Keras, so
``keras.saving.load_model("model.keras")`` works in a fresh process.
"""

from common.runtime import quiet_tensorflow

quiet_tensorflow()  # before Keras imports TensorFlow: no C++ start-up chatter

from rswnet.models import HEADS, RSWNet, RSWNetSOM, load_model  # noqa: E402
from rswnet.networks import ResNetInput, resnet_decoder, resnet_encoder  # noqa: E402

__all__ = ["HEADS", "RSWNet", "RSWNetSOM", "ResNetInput", "fit", "load_model", "resnet_decoder",
           "resnet_encoder"]


def fit(x=None, y=None, **flags):
    """Train as ``bin/rswnet`` does, from Python: its flags as keyword
    arguments, e.g. ``rswnet.fit(data="photos/", weights="none", save_dir="results/r")``.
    ``x`` (and labels ``y``, for the reports) are samples in memory; or give
    ``data=`` or ``dataset=``. Returns the run: ``run.model``, ``run.results``,
    ``run.save_dir`` (see :meth:`common.command.TrainingCommand.fit`)."""
    from rswnet.cli import RswnetCommand

    return RswnetCommand().fit(x, y, **flags)
