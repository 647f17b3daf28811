"""RSWNet: an ImageNet ResNet50 encoder with a decoder and a clustering head,
compared fairly with a self-organizing map on the same features.

The models arrive with their own issue; this package reuses the SOM layer of
``desom`` and the clustering layer of ``dcn``.
"""
