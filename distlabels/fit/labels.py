"""Which labels a fit moves: a subset, fixed values and ties, as one affine map.

The fit's label parameters ``theta`` (n_theta,) give the emulator's scaled labels (n_labels,) as::

    x = offset + matrix @ theta

* a fitted label on its own is one column of ``matrix`` with a single 1;
* a tie group (e.g. every [X/M] moves together) is one column whose entries convert the group's
  common physical value into each member's scaled value (members may have slightly different
  training ranges);
* a fixed label (``fix``), or a label left out of ``labels``, has a zero row and its scaled value
  in ``offset``. A label neither fitted nor fixed is held at the median of the model's training
  labels (the box centre when the model stores none).

The map is folded into the emulator's first layer where the kind allows it
(:meth:`distlabels.models.base.Emulator.with_inputs`), so a fit of 5 labels costs a Jacobian of 5
columns, not 22. Bounds on ``theta`` are the intersection of its members' training boxes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DistlabelsError


@dataclass(frozen=True)
class LabelMap:
    names: tuple[str, ...]              # model label names (n_labels)
    groups: tuple[tuple[int, ...], ...]  # per theta: indices of the labels it moves
    matrix: np.ndarray                   # (n_labels, n_theta)
    offset: np.ndarray                   # (n_labels,) scaled values of held labels (0 where fitted)
    lo: np.ndarray                       # (n_theta,) bounds on theta
    hi: np.ndarray
    ref: np.ndarray                      # (n_theta,) the label whose scaled value theta is

    @property
    def n_theta(self) -> int:
        return len(self.groups)

    @property
    def fitted(self) -> np.ndarray:
        """(n_labels,) bool: the label moves in the fit (alone or in a tie)."""
        out = np.zeros(len(self.names), bool)
        for g in self.groups:
            out[list(g)] = True
        return out

    def to_x(self, theta: np.ndarray) -> np.ndarray:
        """theta (..., n_theta) -> scaled labels (..., n_labels)."""
        return self.offset + np.asarray(theta) @ self.matrix.T

    def from_x(self, x: np.ndarray) -> np.ndarray:
        """Scaled labels (..., n_labels) -> theta (..., n_theta): each group's reference label."""
        return np.asarray(x)[..., self.ref]


def build_label_map(label_names, label_span, x_min, *, labels=None, fix=(), ties=(), default_x=None) -> LabelMap:
    """The LabelMap for a model and FitConfig's ``labels``, ``fix`` and ``ties``.

    label_span, x_min: (n_labels,) physical scaling of the model (x = (label - x_min)/span - 0.5);
    default_x: (n_labels,) scaled values for labels neither fitted nor fixed (default 0).
    """
    names = tuple(label_names)
    L = len(names)
    span = np.asarray(label_span, np.float64)
    x_min = np.asarray(x_min, np.float64)
    index = {n: i for i, n in enumerate(names)}

    def idx(name, what):
        if name not in index:
            raise DistlabelsError(f"{what} names unknown label {name!r} (labels: {', '.join(names)}).")
        return index[name]

    fitted = np.ones(L, bool) if labels is None else np.zeros(L, bool)
    if labels is not None:
        for n in labels:
            fitted[idx(n, "labels")] = True
    fixed = {}
    for n, v in dict(fix).items():
        fixed[idx(n, "fix")] = float(v)
    groups: list[tuple[int, ...]] = []
    seen: set[int] = set()
    for tie in ties:
        members = tuple(idx(n, "tie") for n in tie)
        if len(members) < 2:
            raise DistlabelsError(f"a tie needs at least two labels, got {tuple(tie)!r}.")
        if seen & set(members):
            raise DistlabelsError(f"label(s) {', '.join(names[i] for i in sorted(seen & set(members)))} appear in "
                                  "more than one tie.")
        seen |= set(members)
        held = [i for i in members if i in fixed]
        if held:
            # A tie with a fixed member fixes the whole group at that value.
            values = {fixed[i] for i in held}
            if len(values) > 1:
                raise DistlabelsError(f"tied labels {', '.join(names[i] for i in members)} are fixed at different values.")
            for i in members:
                fixed[i] = fixed[held[0]]
            continue
        groups.append(members)
    for i in range(L):
        if i in seen or i in fixed or not fitted[i]:
            continue
        groups.append((i,))
    # Keep the model's label order (by first member) so theta reads like the labels.
    groups.sort(key=lambda g: g[0])
    if not groups:
        raise DistlabelsError("no label is left to fit (every label is fixed or excluded).")

    base = np.zeros(L) if default_x is None else np.clip(np.asarray(default_x, np.float64), -0.5, 0.5)
    offset = base.copy()
    for i, v in fixed.items():
        offset[i] = (v - x_min[i]) / span[i] - 0.5
    K = len(groups)
    matrix = np.zeros((L, K))
    lo, hi = np.full(K, -0.5), np.full(K, 0.5)
    ref = np.array([g[0] for g in groups])
    for k, g in enumerate(groups):
        r = g[0]
        for i in g:
            # x_i = ((theta + 0.5) span_r + min_r - min_i) / span_i - 0.5
            a = span[r] / span[i]
            b = (0.5 * span[r] + x_min[r] - x_min[i]) / span[i] - 0.5
            matrix[i, k] = a
            offset[i] = b
            lo[k] = max(lo[k], (-0.5 - b) / a)
            hi[k] = min(hi[k], (0.5 - b) / a)
        if not hi[k] > lo[k]:
            raise DistlabelsError(f"tied labels {', '.join(names[i] for i in g)} have training ranges that do not overlap.")
    return LabelMap(names, tuple(groups), matrix, offset, lo, hi, ref)


def check_label_options(label_names, *, labels=None, fix=(), ties=(), start_labels=None) -> None:
    """Raise DistlabelsError (one sentence) if the fit options name labels the model does not have."""
    names = set(label_names)
    known = ", ".join(label_names)
    checks = [("labels", labels or ()), ("fix", [n for n, _ in (fix.items() if isinstance(fix, dict) else fix)]),
              ("tie", [n for grp in ties for n in grp]), ("start_labels", start_labels or ())]
    for what, items in checks:
        for n in items:
            if n not in names:
                raise DistlabelsError(f"{what} names unknown label {n!r} (labels: {known}).")
