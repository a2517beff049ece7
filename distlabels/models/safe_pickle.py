"""Read bossbrain's dill pickles without dill, theborg, or executing anything outside an allow-list.

bossbrain ships its networks as ``dill`` pickles of ``theborg.emulator.Emulator`` objects that hold
torch modules. Unpickling them the ordinary way imports theborg and dill and lets the file call any
importable function. :class:`SafeUnpickler` instead resolves every global the file names through
a fixed table (:data:`_ALLOWED`); anything else raises :class:`~distlabels.errors.UnsafePickleError`
before it is imported, so REDUCE / NEWOBJ / BUILD can only ever reach the callables listed here:

* ``theborg.*`` and ``torch.nn.modules.*`` classes become inert :class:`PickledRecord` subclasses
  that only keep their ``__setstate__`` dict (no torch module or theborg object is ever built);
* ``torch.storage._load_from_bytes`` becomes a shim calling ``torch.load(..., weights_only=True)``
  and accepting only a storage back;
* ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter`` are wrapped to refuse serialized
  hooks and return plain tensors;
* ``dill._dill._create_array`` is re-implemented and only accepts numpy's ``_reconstruct``;
* ``numpy.core.*`` names are mapped to ``numpy._core`` on numpy 2.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ModelFormatError, UnsafePickleError

__all__ = ["PickledRecord", "SafeUnpickler", "safe_load"]


def _numpy_multiarray():
    """numpy's multiarray module under its numpy 2 name, falling back to numpy 1's."""
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.26
        from numpy.core import multiarray
    return multiarray


class PickledRecord:
    """Inert stand-in for a pickled class: keeps the state dict that BUILD hands to ``__setstate__``.

    ``module`` / ``name`` say which class the pickle asked for; ``state`` is whatever the pickle
    stored (for torch modules and theborg objects, their ``__dict__``).
    """

    __slots__ = ("state",)
    module: str = ""
    name: str = ""

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def get(self, key: str, default: Any = None) -> Any:
        """``state[key]`` when the state is a dict, else ``default``."""
        st = getattr(self, "state", None)
        return st.get(key, default) if isinstance(st, dict) else default

    def __repr__(self) -> str:
        return f"<PickledRecord {self.module}.{self.name}>"


def _record_class(module: str, name: str) -> type[PickledRecord]:
    return type(name, (PickledRecord,), {"__slots__": (), "module": module, "name": name})


_RECORD_CLASSES: dict[tuple[str, str], type[PickledRecord]] = {
    key: _record_class(*key) for key in [
        ("theborg.emulator", "Emulator"),
        ("theborg.emulator", "MultiEmulatorModel"),
        ("torch.nn.modules.container", "Sequential"),
        ("torch.nn.modules.linear", "Linear"),
        ("torch.nn.modules.activation", "LeakyReLU"),
        ("torch.nn.modules.activation", "Sigmoid"),
        ("torch.nn.modules.activation", "ReLU"),
        ("torch.nn.modules.activation", "Tanh"),
    ]
}


def _one_line(e: BaseException) -> str:
    return f"{e.__class__.__name__}: {' '.join(str(e).split())}".rstrip(".")


def _check_no_hooks(hooks: Any, what: str) -> None:
    # Serialized backward hooks would be callables run during autograd: only empty ones are data.
    if hooks is not None and (not isinstance(hooks, dict) or len(hooks) > 0):
        raise UnsafePickleError(f"the pickle attaches backward hooks to a {what}, which is refused.")


def _load_from_bytes(b: bytes) -> Any:
    """``torch.storage._load_from_bytes`` with ``weights_only=True`` and a storage-only result."""
    if not isinstance(b, (bytes, bytearray)):
        raise UnsafePickleError("torch.storage._load_from_bytes was called on something that is not bytes.")
    try:
        obj = torch.load(io.BytesIO(bytes(b)), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        # torch's message opens with boilerplate about the 2.6 default; keep the line naming the cause.
        lines = [ln.strip().rstrip(".") for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "GLOBAL" in ln or "nsupported" in ln), lines[0] if lines else "")
        raise UnsafePickleError(f"an embedded torch payload was refused by torch.load(weights_only=True) "
                                f"({why}).") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise ModelFormatError(f"an embedded torch payload could not be read ({_one_line(e)}).") from None
    if not isinstance(obj, (torch.UntypedStorage, torch.TypedStorage)):
        raise UnsafePickleError(f"an embedded torch payload holds a {type(obj).__name__}, not a storage.")
    return obj


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    """torch's ``_rebuild_tensor_v2``, refusing hooks and non-storage inputs; no autograd."""
    from torch._utils import _rebuild_tensor_v2 as real

    if not isinstance(storage, (torch.UntypedStorage, torch.TypedStorage)):
        raise UnsafePickleError("torch._utils._rebuild_tensor_v2 was called on something that is not a storage.")
    _check_no_hooks(backward_hooks, "tensor")
    if metadata is not None and not isinstance(metadata, dict):
        raise UnsafePickleError("torch._utils._rebuild_tensor_v2 was given metadata that is not a dict.")
    return real(storage, storage_offset, size, stride, False, collections.OrderedDict(), metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    """torch's ``_rebuild_parameter`` reduced to its data: a plain tensor, no hooks."""
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError("torch._utils._rebuild_parameter was called on something that is not a tensor.")
    _check_no_hooks(backward_hooks, "parameter")
    return data.detach()


def _create_array(f, args, state, npdict=None):
    """dill's ``_create_array``: ``f(*args).__setstate__(state)`` with ``f`` numpy's ``_reconstruct``."""
    if f is not _numpy_multiarray()._reconstruct:
        raise UnsafePickleError("dill._dill._create_array was asked to call something other than "
                                "numpy's _reconstruct.")
    if npdict:
        raise UnsafePickleError("dill._dill._create_array was given an array __dict__, which is refused.")
    arr = f(*args)
    if not isinstance(arr, np.ndarray) or arr.dtype.hasobject:
        raise UnsafePickleError("dill._dill._create_array produced an object array, which is refused.")
    arr.__setstate__(state)
    if arr.dtype.hasobject:
        raise UnsafePickleError("dill._dill._create_array produced an object array, which is refused.")
    return arr


class _Guarded:
    """An allow-listed Python function as the pickle sees it: callable, but BUILD cannot modify it.

    (BUILD on a bare function would set attributes such as ``__defaults__`` on our own module's
    functions, persisting into later loads.)
    """

    __slots__ = ("_fn",)

    def __init__(self, fn: Any):
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __setstate__(self, state: Any) -> None:
        raise UnsafePickleError(f"the pickle tries to modify the allow-listed function {self._fn.__name__}.")


def _allowed() -> dict[tuple[str, str], Any]:
    ma = _numpy_multiarray()
    table: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("dill._dill", "_create_array"): _Guarded(_create_array),
        ("numpy", "dtype"): np.dtype,
        ("numpy", "ndarray"): np.ndarray,
        ("torch._utils", "_rebuild_parameter"): _Guarded(_rebuild_parameter),
        ("torch._utils", "_rebuild_tensor_v2"): _Guarded(_rebuild_tensor_v2),
        ("torch.storage", "_load_from_bytes"): _Guarded(_load_from_bytes),
        **_RECORD_CLASSES,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(mod, "scalar")] = ma.scalar
        table[(mod, "_reconstruct")] = ma._reconstruct
    return table


_ALLOWED: dict[tuple[str, str], Any] = _allowed()


class SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves globals only through :data:`_ALLOWED`.

    ``source`` names the file in error messages. Persistent ids (PERSID) are refused by the base
    class, since no ``persistent_load`` is defined.
    """

    def __init__(self, file: io.BufferedIOBase, *, source: str = "<pickle>"):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise UnsafePickleError(f"{self.source} asks for {module}.{name}, which is not on the allow-list "
                                    f"of safe pickle globals, so it was not loaded.")
        return obj


def safe_loads(data: bytes, *, source: str = "<bytes>") -> Any:
    """Unpickle ``data`` with :class:`SafeUnpickler`; errors as in :func:`safe_load`."""
    return _run(SafeUnpickler(io.BytesIO(data), source=source), source)


def safe_load(path: str | os.PathLike) -> Any:
    """Unpickle the file at ``path`` with :class:`SafeUnpickler`.

    Raises :class:`UnsafePickleError` for a global outside the allow-list (nothing of it is run)
    and :class:`ModelFormatError` for a missing, truncated or malformed pickle.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelFormatError(f"pickle file {p} does not exist.")
    with open(p, "rb") as f:
        return _run(SafeUnpickler(f, source=str(p)), str(p))


def _run(unpickler: SafeUnpickler, source: str) -> Any:
    try:
        return unpickler.load()
    except ModelFormatError as e:
        msg = str(e)
        if source in msg:
            raise
        # Refusals raised inside the allow-listed helpers do not know the file: name it.
        raise type(e)(f"{source} was refused: {msg[0].lower()}{msg[1:]}" if msg else f"{source} was refused.") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            RuntimeError) as e:
        raise ModelFormatError(f"{source} is not a readable pickle ({_one_line(e)}).") from None

