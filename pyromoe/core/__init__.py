"""The maths, in torch only: links, parameters, likelihood, moments, tensor decomposition, EM, labels.

Nothing here imports Pyro, ArviZ, matplotlib or does I/O.
"""
