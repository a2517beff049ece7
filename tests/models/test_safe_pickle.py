"""The allow-listed unpickler: reads bossbrain's dill pickles, refuses everything else unexecuted."""
from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distlabels.errors import ModelFormatError, UnsafePickleError
from distlabels.models.safe_pickle import PickledRecord, safe_load, safe_loads


def _bossbrain_pkl(name: str = "ann_22pars_4000-5000.pkl") -> Path:
    pytest.importorskip("bossbrain")
    import importlib.resources

    p = Path(str(importlib.resources.files("bossbrain").joinpath("data", name)))
    if not p.is_file():
        pytest.skip(f"bossbrain has no data/{name}")
    return p


class _Reduce:
    """Pickles as ``func(*args)``: the classic code-execution gadget."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _assert_refused(data: bytes, marker: Path, *, match: str | None = None) -> UnsafePickleError:
    with pytest.raises(UnsafePickleError, match=match) as ei:
        safe_loads(data, source="evil.pkl")
    assert not marker.exists(), "the refused pickle still ran its payload"
    return ei.value


# ----- the real bossbrain pickle ---------------------------------------------------------------
def test_reads_bossbrain_pickle_as_inert_records():
    em = safe_load(_bossbrain_pkl())
    assert isinstance(em, PickledRecord) and (em.module, em.name) == ("theborg.emulator", "Emulator")
    model = em.state["model"]
    assert model.name == "MultiEmulatorModel" and not isinstance(model, torch.nn.Module)
    seq = model.state["_modules"]["features"].state["_modules"]
    assert [seq[k].name for k in "01234"] == ["Linear", "LeakyReLU", "Linear", "LeakyReLU", "Linear"]
    shapes = [tuple(seq[k].state["_parameters"]["weight"].shape) for k in "024"]
    assert shapes == [(300, 22), (300, 300), (14001, 300)]
    w = seq["0"].state["_parameters"]["weight"]
    assert type(w) is torch.Tensor and not w.requires_grad and not isinstance(w, torch.nn.Parameter)
    assert seq["1"].state["negative_slope"] == pytest.approx(0.01)
    assert em.state["xmin"].shape == (22,) and em.state["xmin"].dtype == np.float64
    assert em.state["training_labels"].shape == (19978, 22)
    assert len(em.state["label_names"]) == 22 and em.state["label_names"][:2] == ["teff", "logg"]


def test_reading_imports_neither_dill_nor_theborg():
    p = _bossbrain_pkl()
    # torch itself may import dill (torch.utils.data); what matters is what safe_load adds.
    code = ("import sys; from distlabels.models.safe_pickle import safe_load; before = set(sys.modules); "
            "safe_load(sys.argv[1]); new = set(sys.modules) - before; "
            "bad = [m for m in new if m.split('.')[0] in ('theborg', 'bossbrain', 'dill')]; "
            "assert not any(m.split('.')[0] in ('theborg', 'bossbrain') for m in sys.modules); "
            "print(bad); assert not bad")
    r = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# ----- refusals ----------------------------------------------------------------------------------
@pytest.mark.parametrize("gadget", ["os.system", "builtins.eval", "builtins.exec", "subprocess.call"])
def test_code_execution_gadgets_are_refused_unexecuted(tmp_path, gadget):
    marker = tmp_path / "pwned"
    cmd = f"touch {marker}"
    py = f"open({str(marker)!r}, 'w').write('x')"
    obj = {"os.system": _Reduce(os.system, cmd), "builtins.eval": _Reduce(eval, py),
           "builtins.exec": _Reduce(exec, py), "subprocess.call": _Reduce(subprocess.call, ["touch", str(marker)])}[gadget]
    data = pickle.dumps({"weights": [1.0, 2.0], "payload": obj}, protocol=4)
    err = _assert_refused(data, marker)
    msg = str(err)
    assert "evil.pkl" in msg and "allow-list" in msg
    assert msg.count(".") >= 1 and "\n" not in msg
    # Control: plain pickle really would have run it (proves the gadget is live).
    if gadget == "builtins.eval":
        pickle.loads(data)
        assert marker.exists()


def test_torch_load_reference_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save(torch.zeros(2), buf)
    data = pickle.dumps(_Reduce(torch.load, buf.getvalue()), protocol=2)
    _assert_refused(data, marker, match=r"torch\.serialization\.load")
    # Hand-written protocol-0 pickle naming torch.load by its public path.
    _assert_refused(b"ctorch\nload\n(S'x'\ntR.", marker, match=r"torch\.load")


def test_allow_listed_helpers_refuse_unsafe_arguments(tmp_path):
    marker = tmp_path / "pwned"
    # dill's _create_array must only call numpy's _reconstruct.
    _assert_refused(b"cdill._dill\n_create_array\n(ccollections\nOrderedDict\n)NNtR.", marker,
                    match="_reconstruct")
    # BUILD cannot tamper with the allow-listed functions (e.g. their __defaults__).
    _assert_refused(b"cdill._dill\n_create_array\n(N(S'__defaults__'\n(I1\ntdtb.", marker, match="modify")
    # _rebuild_tensor_v2 on something that is not a storage.
    _assert_refused(b"ctorch._utils\n_rebuild_tensor_v2\n(I0\nI0\n)N(dN(dtR.", marker, match="storage")


def test_persistent_ids_and_garbage_are_format_errors(tmp_path):
    with pytest.raises(ModelFormatError):
        safe_loads(b"P0\n.")  # PERSID without persistent_load
    with pytest.raises(ModelFormatError):
        safe_loads(b"\x80\x04garbage")
    bad = tmp_path / "x.pkl"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(ModelFormatError, match="x.pkl"):
        safe_load(bad)
    with pytest.raises(ModelFormatError, match="does not exist"):
        safe_load(tmp_path / "missing.pkl")


# ----- torch.storage._load_from_bytes runs torch.load(weights_only=True) -----------------------------
def test_load_from_bytes_shim_refuses_malicious_payload(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(3), "evil": _Reduce(os.system, f"touch {marker}")}, buf)
    data = pickle.dumps(_Reduce(torch.storage._load_from_bytes, buf.getvalue()), protocol=4)
    assert b"_load_from_bytes" in data
    with pytest.raises((UnsafePickleError, ModelFormatError), match="weights_only"):
        safe_loads(data, source="evil.pkl")
    assert not marker.exists()


def test_load_from_bytes_shim_accepts_storages_only():
    buf = io.BytesIO()
    torch.save(torch.arange(4, dtype=torch.float32).untyped_storage(), buf)
    ok = safe_loads(pickle.dumps(_Reduce(torch.storage._load_from_bytes, buf.getvalue())))
    assert isinstance(ok, (torch.UntypedStorage, torch.TypedStorage))
    buf = io.BytesIO()
    torch.save({"a": 1}, buf)
    with pytest.raises(UnsafePickleError, match="not a storage"):
        safe_loads(pickle.dumps(_Reduce(torch.storage._load_from_bytes, buf.getvalue())))
