"""Emulator training: The Cannon (data-driven, quadratic in labels) and The Payne (MLP on a grid).

Layer: after ``fit``, before ``catalog``; imports io, models and fit, never Dask. Trainers return
models of the registered kinds, saved with :meth:`distlabels.models.Emulator.save` and loaded with
:func:`distlabels.models.load`, so a trained model goes straight into ``distlabels fit``.
"""
