"""The fitting kernel: pure torch, no I/O, no Dask; CPU and CUDA alike."""
from .crb import crb
from .flags import NOT_FITTED, Flag
from .kernel import FitResult, SpectrumFitter, fit_spectra

__all__ = ["FitResult", "Flag", "NOT_FITTED", "SpectrumFitter", "crb", "fit_spectra"]
