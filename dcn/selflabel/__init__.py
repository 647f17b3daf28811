"""Self-labelling (``bin/selflabel``): a CNN classifier trained on its own,
iteratively refined pseudo-labels.

No ground-truth label enters training or the choice of the model; labels,
where the data have them, are only scored against, after the fact.

1. **Initial pseudo-labels** (:func:`initial_features`): codes of an
   autoencoder (``ae``, DEC/DESOM size), of DESOM (``desom``), the
   randomly initialised CNN's own features (``random``, as in DeepCluster),
   or the CNN's convolutional features after contrastive pretraining
   (``contrastive``: SimCLR, Chen et al. 2020, as SCAN starts; the
   classifier then trains on from those weights);
   optionally reduced with UMAP (``manifold="umap"``: N2D, McConville et al.
   2020), then clustered by a Gaussian mixture or k-means. Each sample gets a
   label and a confidence (its posterior, or its k-means margin).
2. **Training** (:func:`refine`): the :class:`SelfLabelNet` classifier
   learns the pseudo-labels of the most confident share of each cluster
   (:func:`select_confident`; balanced by construction), with data
   augmentation and label smoothing, ``epochs_per_round`` epochs a
   round on the shared training loop.
   Then, with ``neighbours`` (:func:`nearest_neighbours` of the initial
   features), ``knn_epochs`` epochs of SCAN's clustering loss
   (:class:`NeighbourTask`, Van Gansbeke et al. 2020): every image and one
   of its nearest neighbours should get the same class, and the batch's mean
   prediction should stay spread over the classes. The neighbours carry
   what the first clustering lost (on Fashion-MNIST 81 % of the 20 nearest
   autoencoder codes share the image's class; the Gaussian mixture's labels
   of the same codes were 60-68 % right over three seeds).
3. **Relabelling** every ``recluster_interval`` rounds: the classifier's
   own predictions, made balanced with Sinkhorn-Knopp as in SeLa (Asano et
   al. 2020; :func:`balanced_labels`), or k-means on its L2-normalised
   features started from the previous clusters' centres (DeepCluster).
   New labels are aligned to the previous ones by the Hungarian method
   (:func:`align_labels`); the share that kept its label is the *aligned
   stability* (:func:`aligned_stability`). Training stops when it reaches
   ``convergence_threshold``.

The model kept at the end is the round with the highest aligned
stability (an unsupervised criterion; ties go to the later round).
``bin/selflabel`` then adds :func:`class_offsets` of its predictions on the
training images to its logits (:meth:`SelfLabelNet.shift_classes`), so that
it predicts the balanced partition step 3 would make of them.

Inside: :mod:`~dcn.selflabel.network` (the classifier, its training tasks,
augmentation), :mod:`~dcn.selflabel.labels` (pseudo-label algebra, numpy
only), :mod:`~dcn.selflabel.refine` (first features, the loop),
:mod:`~dcn.selflabel.cli` (``bin/selflabel``) and
:mod:`~dcn.selflabel.benchmark` (``bin/selflabel-benchmark``).
"""

from dcn.selflabel.labels import (
    align_labels,
    aligned_stability,
    balanced_labels,
    class_offsets,
    fraction_at,
    label_scores,
    nearest_neighbours,
    neighbour_agreement,
    select_confident,
)
from dcn.selflabel.network import (
    AUGMENT,
    AUGMENTATIONS,
    CONTRASTIVE_AUGMENT,
    ContrastiveTask,
    NeighbourTask,
    PseudoLabelTask,
    SelfLabelNet,
    augmenter,
    load_model,
    nt_xent,
)
from dcn.selflabel.refine import (
    FIT_ATTEMPTS,
    FIT_THRESHOLD,
    INIT_MODEL,
    INITS,
    MANIFOLDS,
    MIN_STEPS,
    RELABELS,
    SELECTIONS,
    best_round,
    initial_features,
    refine,
    relabel,
    round_stretch,
)

__all__ = ["fit", "AUGMENT", "AUGMENTATIONS", "CONTRASTIVE_AUGMENT", "ContrastiveTask", "FIT_ATTEMPTS",
           "FIT_THRESHOLD", "INITS", "INIT_MODEL", "MANIFOLDS", "MIN_STEPS", "NeighbourTask",
           "PseudoLabelTask", "RELABELS", "SELECTIONS", "SelfLabelNet", "align_labels",
           "aligned_stability", "augmenter", "balanced_labels", "best_round", "class_offsets",
           "fraction_at", "initial_features", "round_stretch", "label_scores", "load_model",
           "nearest_neighbours", "neighbour_agreement", "nt_xent", "refine", "relabel", "select_confident"]


def fit(x=None, y=None, **flags):
    """Train as ``bin/selflabel`` does, from Python: its flags as keyword
    arguments, e.g. ``dcn.selflabel.fit(images, n_clusters=10, save_dir="results/x")``.
    ``x`` (and labels ``y``, for the reports) are samples in memory; or give
    ``data=`` or ``dataset=``. Returns the run: ``run.model``, ``run.results``,
    ``run.save_dir`` (see :meth:`common.command.TrainingCommand.fit`)."""
    from dcn.selflabel.cli import SelfLabelCommand

    return SelfLabelCommand().fit(x, y, **flags)
