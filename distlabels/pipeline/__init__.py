"""Distributed runs on Dask: the only package that imports dask (lazily, inside functions)."""
from .partition import GridSpec, fit_partition
from .run import RunSummary, run_fit
from .verify import VerifyReport, verify_catalog

__all__ = ["GridSpec", "RunSummary", "VerifyReport", "fit_partition", "run_fit", "verify_catalog"]
