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

__all__ = ["CVAE", "METHODS", "MODELS", "VAE", "Autoencoder", "CodeModel", "SemiSupervisedAutoencoder",
           "build", "cluster_codes", "labeled_subset", "load_model"]
