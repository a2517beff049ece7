"""Distributed runs on Dask: the only package that imports dask (lazily, inside functions)."""
from .partition import GridSpec, fit_partition
from .run import RunSummary, run_fit

__all__ = ["GridSpec", "RunSummary", "fit_partition", "run_fit"]
