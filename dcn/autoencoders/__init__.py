"""The autoencoder family and two-stage clustering of its codes (``bin/ae``).

* :mod:`~dcn.autoencoders.models`: :class:`Autoencoder`,
  :class:`SemiSupervisedAutoencoder`, :class:`VAE`, :class:`CVAE` (each keeps
  one Gaussian per cluster of its codes, to generate from);
* :mod:`~dcn.autoencoders.twostage`: the codes clustered by UMAP + a
  Gaussian mixture, k-means, DBSCAN or a SOM, scored in one table;
* :mod:`~dcn.autoencoders.cli` (``bin/ae``) and
  :mod:`~dcn.autoencoders.benchmark` (``bin/ae-benchmark``).
"""

from dcn.autoencoders.models import (
    CVAE,
    MODELS,
    VAE,
    Autoencoder,
    CodeModel,
    SemiSupervisedAutoencoder,
    build,
    labeled_subset,
    load_model,
)
from dcn.autoencoders.twostage import METHODS, cluster_codes

__all__ = ["fit", "CVAE", "METHODS", "MODELS", "VAE", "Autoencoder", "CodeModel", "SemiSupervisedAutoencoder",
           "build", "cluster_codes", "labeled_subset", "load_model"]


def fit(x=None, y=None, **flags):
    """Train as ``bin/ae`` does, from Python: its flags as keyword
    arguments, e.g. ``dcn.autoencoders.fit(x, model="vae", epochs=20, save_dir="results/vae")``.
    ``x`` (and labels ``y``, for the reports) are samples in memory; or give
    ``data=`` or ``dataset=``. Returns the run: ``run.model``, ``run.results``,
    ``run.save_dir`` (see :meth:`common.command.TrainingCommand.fit`)."""
    from dcn.autoencoders.cli import AeCommand

    return AeCommand().fit(x, y, **flags)
