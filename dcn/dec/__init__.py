"""DEC, IDEC and DCEC (``bin/dcn``): a Student-t clustering layer on an
autoencoder's embedding, trained towards its own sharpened target.

* :mod:`~dcn.dec.layers`: :class:`ClusteringLayer` (Student-t soft
  assignment), the target distribution, the KL divergence;
* :mod:`~dcn.dec.models`: :class:`DCN` (dense or convolutional autoencoder +
  clustering layer; DEC without, IDEC/DCEC with the reconstruction loss), its
  training task and schedule;
* :mod:`~dcn.dec.naming`: names for clusters from reference images or labels;
* :mod:`~dcn.dec.cli` (``bin/dcn``), :mod:`~dcn.dec.benchmark`
  (``bin/dcn-benchmark``), :mod:`~dcn.dec.deckeras_reference`
  (``bin/dcn-deckeras``, the original DEC-keras code run as published) and
  :mod:`~dcn.dec.published` (the published figures they stand beside).
"""

from dcn.dec.layers import ClusteringLayer, kl_divergence, target_distribution
from dcn.dec.models import DCN, ClusteringModel, load_model

__all__ = ["DCN", "ClusteringLayer", "ClusteringModel", "fit", "kl_divergence", "load_model",
           "target_distribution"]


def fit(x=None, y=None, **flags):
    """Train as ``bin/dcn`` does, from Python: its flags as keyword
    arguments, e.g. ``dcn.dec.fit(data="photos/", image_size=64, save_dir="results/photos")``.
    ``x`` (and labels ``y``, for the reports) are samples in memory; or give
    ``data=`` or ``dataset=``. Returns the run: ``run.model``, ``run.results``,
    ``run.save_dir`` (see :meth:`common.command.TrainingCommand.fit`)."""
    from dcn.dec.cli import DcnCommand

    return DcnCommand().fit(x, y, **flags)
