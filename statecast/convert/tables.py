"""Name mapping as data: rules that map source tensor names to canonical names.

A :class:`SourceFormat` is a table of :class:`Rule` rows (source template ->
canonical template, plus the name of a numeric transform) and an explicit list
of source keys that are dropped. Templates use ``{i}`` for the layer index.
Every source key must be consumed by exactly one rule or be explicitly dropped;
leftovers, missing tensors and shape mismatches are errors that name the keys.
The same table read backwards writes the unified model back to the source
format, so a round trip is exact.

Numeric transforms are small named functions in :data:`TRANSFORMS`, each with its
inverse and the shape change it makes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import StatecastError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Transform:
    """A numeric transform applied to a tensor on its way to the canonical layout."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    inverse: Callable[[torch.Tensor], torch.Tensor]
    shape: Callable[[Shape], Shape]


def _squeeze_shape(s: Shape) -> Shape:
    if len(s) < 1 or any(d != 1 for d in s[:-1]):
        return (-1,) + s  # impossible shape: reported as mis-shaped
    return (s[-1],)


TRANSFORMS: dict[str, Transform] = {
    "identity": Transform(forward=lambda t: t, inverse=lambda t: t, shape=lambda s: s),
    # RWKV time-mix coefficients are stored as [1, 1, C] for broadcasting; canonical is [C].
    "squeeze_1_1_c": Transform(
        forward=lambda t: t.reshape(t.shape[-1]),
        inverse=lambda t: t.reshape(1, 1, t.shape[-1]),
        shape=_squeeze_shape,
    ),
}


@dataclass(frozen=True)
class Rule:
    source: str
    canonical: str
    transform: str = "identity"

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r} in rule {self.source}")


def _compile(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


@dataclass(frozen=True)
class SourceFormat:
    """A checkpoint format: its name, family and name table."""

    name: str
    family: str
    rules: tuple[Rule, ...]
    dropped: tuple[str, ...] = ()
    _fwd: list = field(default_factory=list, compare=False, repr=False)
    _rev: list = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._fwd.extend((_compile(r.source), r) for r in self.rules)
        self._rev.extend((_compile(r.canonical), r) for r in self.rules)
        self._fwd.extend((_compile(d), None) for d in self.dropped)

    def to_canonical(self, key: str) -> tuple[str, str] | None | bool:
        """(canonical name, transform) for a source key; False if dropped; None if unknown."""
        for pattern, rule in self._fwd:
            m = pattern.match(key)
            if m:
                if rule is None:
                    return False
                return rule.canonical.format(**m.groupdict()), rule.transform
        return None

    def from_canonical(self, name: str) -> tuple[str, str]:
        """(source key, transform) for a canonical name; unknown names are an error."""
        for pattern, rule in self._rev:
            m = pattern.match(name)
            if m:
                return rule.source.format(**m.groupdict()), rule.transform
        raise StatecastError(f"format {self.name} has no name for canonical tensor {name!r}")


def _listing(names, limit: int = 8) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


@dataclass
class Mapping:
    """The checked plan: canonical name -> (source key, transform, canonical shape)."""

    entries: dict[str, tuple[str, str, Shape]]
    dropped: list[str]


def map_keys(fmt: SourceFormat, source_shapes: dict[str, Shape], expected: dict[str, Shape], where: str) -> Mapping:
    """Check a source's keys and shapes against the family's expected canonical tensors.

    Raises one error naming every unexpected, missing or mis-shaped tensor.
    """
    entries: dict[str, tuple[str, str, Shape]] = {}
    unknown, dropped, duplicate = [], [], []
    for key, shape in source_shapes.items():
        hit = fmt.to_canonical(key)
        if hit is None:
            unknown.append(key)
        elif hit is False:
            dropped.append(key)
        else:
            name, transform = hit
            if name in entries:
                duplicate.append(key)
            entries[name] = (key, transform, TRANSFORMS[transform].shape(shape))
    unexpected = [entries[n][0] for n in entries if n not in expected] + unknown + duplicate
    missing = [fmt.from_canonical(n)[0] for n in expected if n not in entries]
    problems = []
    if unexpected:
        problems.append(f"unexpected tensors {_listing(unexpected)}")
    if missing:
        problems.append(f"missing tensors {_listing(missing)}")
    if not problems:
        bad = [
            f"{entries[n][0]} has shape {tuple(source_shapes[entries[n][0]])}, expected {_source_shape(fmt, n, s)}"
            for n, s in expected.items()
            if entries[n][2] != tuple(s)
        ]
        if bad:
            problems.append("mis-shaped tensors: " + "; ".join(bad[:6]) + (f" (+{len(bad) - 6} more)" if len(bad) > 6 else ""))
    if problems:
        raise StatecastError(f"{where} ({fmt.name}): " + "; ".join(problems))
    return Mapping(entries={n: entries[n] for n in expected}, dropped=dropped)


def _source_shape(fmt: SourceFormat, name: str, canonical: Shape) -> Shape:
    """The source-side shape matching a canonical shape (for error messages)."""
    transform = fmt.from_canonical(name)[1]
    return tuple(TRANSFORMS[transform].inverse(torch.empty(canonical, device="meta")).shape)


def to_canonical_state(fmt: SourceFormat, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An in-memory source state dict (e.g. ``hf_model.state_dict()``) -> canonical names.

    Same table and transforms as ``convert pull``; unknown keys are an error.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, t in state.items():
        hit = fmt.to_canonical(key)
        if hit is None:
            unknown.append(key)
        elif hit is not False:
            name, transform = hit
            out[name] = TRANSFORMS[transform].forward(t)
    if unknown:
        raise StatecastError(f"{fmt.name}: unexpected tensors {_listing(unknown)}")
    return out


def from_canonical_state(fmt: SourceFormat, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical names -> the source format's names (the inverse of :func:`to_canonical_state`)."""
    out = {}
    for name, t in state.items():
        key, transform = fmt.from_canonical(name)
        out[key] = TRANSFORMS[transform].inverse(t)
    return out
