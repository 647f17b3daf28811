"""Shared by every model of the toolkit: data sets, metrics, networks, the
training loop, plots and command-line helpers.

``common`` imports nothing from ``desom``, ``dcn`` or ``rswnet``.
"""
