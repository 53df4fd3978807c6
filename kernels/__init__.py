"""Triton kernels of protokern (installed as the subpackage ``protokern.kernels``)."""
