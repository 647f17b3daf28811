"""Deep clustering network: a Student-t clustering layer on an autoencoder's
embedding (DEC, IDEC, DCEC), image-folder pipelines, naming clusters from
reference images, and iterative pseudo-label refinement.
"""
