"""Name mapping as data: rules that map source tensor names to canonical names.

A :class:`SourceFormat` is a table of :class:`Rule` rows (source template ->
canonical template, plus the name of a numeric transform) and an explicit list
of source keys that are dropped. Templates use ``{i}`` for the layer index.
Every source key must be consumed by exactly one rule or be explicitly dropped;
leftovers, missing tensors and shape mismatches are errors that name the keys. A tensor
stored under several names (tied, saved more than once) has one rule per further name,
marked ``copy``: each must be there, and is written back.
The same table read backwards writes the unified model back to the source
format, so a round trip is exact.

Numeric transforms are small named functions in :data:`TRANSFORMS`, each with its
inverse and the shape change it makes.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from ..errors import StatecastError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Transform:
    """A numeric transform applied to a source tensor on its way to the canonical layout.

    ``parts > 1`` splits one source tensor into that many canonical tensors (GPT-2's fused
    ``c_attn`` -> q, k, v): ``forward`` returns a tuple, ``inverse`` takes one, ``shape``
    maps the source shape to a tuple of canonical shapes. Otherwise they take and return
    single tensors and shapes.

    ``stacked`` is the other direction: the source keys ``...experts.{j}...`` for j = 0..J-1
    become one canonical tensor, their stack along a new first axis (an MoE layer's experts).
    ``forward`` takes the list of pieces in j order, ``inverse`` returns it.
    """

    forward: Callable
    inverse: Callable
    shape: Callable
    parts: int = 1
    stacked: bool = False  # many source tensors (``{j}`` in the source template) -> one [J, ...] tensor

    def pieces(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.forward(t)) if self.parts > 1 else (self.forward(t),)

    def piece_shapes(self, s: Shape) -> tuple[Shape, ...]:
        return tuple(self.shape(s)) if self.parts > 1 else (self.shape(s),)

    def join(self, ts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.inverse(ts) if self.parts > 1 else self.inverse(ts[0])


BAD: Shape = (-1,)  # an impossible shape: the tensor is reported as mis-shaped


def _squeeze_shape(s: Shape) -> Shape:
    if len(s) < 1 or any(d != 1 for d in s[:-1]):
        return BAD + s
    return (s[-1],)


def _transpose(t: torch.Tensor) -> torch.Tensor:
    return t.T.contiguous()


def _transposed_shape(s: Shape) -> Shape:
    return (s[1], s[0]) if len(s) == 2 else BAD + s


def _split3(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(p.contiguous() for p in t.chunk(3, dim=0))


def _split3_shape(s: Shape) -> tuple[Shape, ...]:
    if not s or s[0] % 3:
        return (BAD + s,) * 3
    return ((s[0] // 3, *s[1:]),) * 3


def _deinterleave(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, 2, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _interleave(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(2, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _even_rows(s: Shape) -> Shape:
    return s if s and s[0] % 2 == 0 else BAD + s


def _split2_shape(s: Shape) -> tuple[Shape, ...]:
    if not s or s[0] % 2:
        return (BAD + s,) * 2
    return ((s[0] // 2, *s[1:]),) * 2


def _head_axis(rank: int) -> Transform:
    """A per-head tensor whose source always has a leading head axis ([H, ...], ``rank`` dims)
    and whose canonical form drops it when H = 1 (the one-head Mamba mixer's shapes); the
    inverse restores it by the rank."""
    return Transform(
        forward=lambda t: t[0] if t.dim() == rank and t.shape[0] == 1 else t,
        inverse=lambda t: t.unsqueeze(0) if t.dim() == rank - 1 else t,
        shape=lambda s: s[1:] if len(s) == rank and s[0] == 1 else s,
    )


TRANSFORMS: dict[str, Transform] = {
    "identity": Transform(forward=lambda t: t, inverse=lambda t: t, shape=lambda s: s),
    # RWKV time-mix coefficients are stored as [1, 1, C] for broadcasting; canonical is [C].
    "squeeze_1_1_c": Transform(
        forward=lambda t: t.reshape(t.shape[-1]),
        inverse=lambda t: t.reshape(1, 1, t.shape[-1]),
        shape=_squeeze_shape,
    ),
    # GPT-2's Conv1D stores weights [in, out]; canonical is nn.Linear's [out, in].
    "conv1d": Transform(forward=_transpose, inverse=_transpose, shape=_transposed_shape),
    # GPT-2's fused attention input projection: Conv1D [C, 3*H*D] -> q, k, v as [H*D, C] each.
    "conv1d_qkv": Transform(
        forward=lambda t: _split3(t.T),
        inverse=lambda ts: torch.cat(ts, 0).T.contiguous(),
        shape=lambda s: _split3_shape(_transposed_shape(s)),
        parts=3,
    ),
    # ... and its bias [3*H*D] -> three [H*D].
    "split_qkv": Transform(forward=_split3, inverse=lambda ts: torch.cat(ts, 0), shape=_split3_shape, parts=3),
    # Per-expert tensors of a mixture of experts (Jamba's ``experts.{j}.gate_proj.weight``
    # [F, C]) -> one [J, F, C] stack; ``shape`` gives the shape of one piece.
    "stack": Transform(forward=torch.stack, inverse=lambda t: list(t.unbind(0)), shape=lambda s: s, stacked=True),
    # Zamba's Mamba in_proj interleaves its two halves row by row (x0, z0, x1, z1, ...: its
    # ``view(B, -1, 2, T)``); canonical is [x | z] as in every other Mamba mixer. A permutation: exact.
    "deinterleave": Transform(forward=_deinterleave, inverse=_interleave, shape=_even_rows),
    # Zamba's per-head mixer tensors: D / dt_proj_bias [H, Eh], x_proj / dt_proj / A_log [H, ., .]
    "heads_2d": _head_axis(2),
    "heads_3d": _head_axis(3),
    # a fused gated-MLP input projection (Zamba2's gate_up_proj [2F, C], bias [2F]) -> gate, up
    "split_gate_up": Transform(forward=lambda t: tuple(p.contiguous() for p in t.chunk(2, dim=0)),
                               inverse=lambda ts: torch.cat(ts, 0), shape=_split2_shape, parts=2),
}


@dataclass(frozen=True)
class Rule:
    """``source`` -> ``canonical`` (a tuple of names for a transform with several parts).

    ``copy``: one more stored copy of tensors that another rule maps (a tied tensor saved
    under several names): the source must hold it, bitwise equal to the other rule's key
    (``convert pull`` checks), and the format written back holds it again."""

    source: str
    canonical: str | tuple[str, ...]
    transform: str = "identity"
    copy: bool = False

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r} in rule {self.source}")
        n = len(self.canonical) if isinstance(self.canonical, tuple) else 1
        if n != TRANSFORMS[self.transform].parts:
            raise ValueError(f"rule {self.source}: transform {self.transform} makes {TRANSFORMS[self.transform].parts} tensors, {n} named")
        if TRANSFORMS[self.transform].stacked != ("{j}" in self.source):
            raise ValueError(f"rule {self.source}: a stacking transform needs {{j}} in the source template, and only it")
        if self.copy and TRANSFORMS[self.transform].stacked:
            raise ValueError(f"rule {self.source}: a copy cannot be a stacked tensor's piece")

    @property
    def targets(self) -> tuple[str, ...]:
        return self.canonical if isinstance(self.canonical, tuple) else (self.canonical,)


# template fields: {i} the layer index, {j} the index of a stacked piece (an expert)
_FIELDS = {"i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)"}


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name, group in _FIELDS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), group)
    return re.compile("^" + pattern + "$")


def stack_key(target: "Target", j: int) -> str:
    """The source key of piece ``j`` of a stacked canonical tensor."""
    return target.source.format(j=j)


@dataclass(frozen=True)
class Target:
    """Where one canonical tensor comes from: a source key, a transform, and which of its parts."""

    name: str
    source: str  # for a stacked tensor: the template with {j} left in (see stack_key)
    transform: str
    part: int = 0  # which part of a split source; for a stacked tensor, the piece's j
    stack: tuple[str, ...] = ()  # a stacked tensor's source keys in j order (set by map_keys)
    copies: tuple[str, ...] = ()  # further source keys holding the same tensor (``Rule.copy``), bitwise equal
    copy: bool = False  # (to_canonical) this source key is such a further copy


@dataclass(frozen=True)
class SourceFormat:
    """A checkpoint format: its name and name table.

    ``dropped`` source keys are ignored (non-persistent buffers some versions saved).
    ``optional`` canonical names are dropped when the model does not have them: a tied
    head saved as its own key (``lm_head.weight`` beside the embedding) maps onto nothing.

    ``layout(unified config)`` gives the rules whose names depend on the model's layout and
    that templates cannot express (Zamba: a shared block stored under one or more of the
    layers that run it, a hybrid layer's Mamba under ``mamba_decoder``): :meth:`for_config` adds them,
    and pull and ``export --format hf`` map through that. Without ``layout`` the format
    is the same for every config.

    ``placement(unified config, source keys)`` gives the unified config fields that record
    where a source stored what its layout leaves open (Zamba: under which layers a shared
    block was saved), which ``layout`` then reads; ``families.unified_config`` adds them when
    pulling, so they travel with the model into ``export --format hf``.
    """

    name: str
    rules: tuple[Rule, ...]
    dropped: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    layout: Callable[[dict], tuple[Rule, ...]] | None = field(default=None, compare=False)
    placement: Callable[[dict, Collection[str]], dict] | None = field(default=None, compare=False)
    _fwd: list = field(default_factory=list, compare=False, repr=False)
    _rev: list = field(default_factory=list, compare=False, repr=False)
    _rev_copies: list = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._fwd.extend((_compile(r.source), r) for r in self.rules)
        for r in self.rules:
            rev = self._rev_copies if r.copy else self._rev
            rev.extend((_compile(name), r, part) for part, name in enumerate(r.targets))
        self._fwd.extend((_compile(d), None) for d in self.dropped)

    def for_config(self, ucfg: dict) -> "SourceFormat":
        """This format for a model of unified config ``ucfg``: its rules plus ``layout(ucfg)``'s
        (the format itself when it has no ``layout``)."""
        if self.layout is None:
            return self
        return SourceFormat(self.name, tuple(self.layout(ucfg)) + self.rules, self.dropped, self.optional)

    def to_canonical(self, key: str) -> list[Target] | None | bool:
        """The canonical tensors a source key becomes; False if dropped; None if unknown."""
        for pattern, rule in self._fwd:
            m = pattern.match(key)
            if m:
                if rule is None:
                    return False
                g = m.groupdict()
                if TRANSFORMS[rule.transform].stacked:
                    return [Target(rule.canonical.format(**g), rule.source.format(i=g["i"], j="{j}"), rule.transform,
                                   int(g["j"]))]
                return [Target(n.format(**g), key, rule.transform, part, copy=rule.copy)
                        for part, n in enumerate(rule.targets)]
        return None

    @property
    def has_copies(self) -> bool:
        return bool(self._rev_copies)

    def from_canonical(self, name: str) -> Target:
        """Target.source is the source key a canonical name comes from (Target.copies: the
        further keys holding it, ``Rule.copy``); unknown names are an error."""
        for pattern, rule, part in self._rev:
            m = pattern.match(name)
            if m:
                copies = tuple(r.source.format(**c.groupdict(), j="{j}") for p, r, _ in self._rev_copies
                               if (c := p.match(name)))
                return Target(name, rule.source.format(**m.groupdict(), j="{j}"), rule.transform, part, copies=copies)
        raise StatecastError(f"format {self.name} has no name for canonical tensor {name!r}")

    def siblings(self, target: Target) -> list[str]:
        """All canonical names made from ``target.source`` (in part order)."""
        hits = self.to_canonical(target.source)
        return [t.name for t in hits] if hits else [target.name]


def _listing(names, limit: int = 8) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


@dataclass
class Mapping:
    """The checked plan: canonical name -> (Target, canonical shape)."""

    entries: dict[str, tuple[Target, Shape]]
    dropped: list[str]


def map_keys(fmt: SourceFormat, source_shapes: dict[str, Shape], expected: dict[str, Shape], where: str) -> Mapping:
    """Check a source's keys and shapes against the family's expected canonical tensors.

    Raises one error naming every unexpected, missing or mis-shaped tensor.
    """
    entries: dict[str, tuple[Target, Shape]] = {}
    pieces: dict[str, dict[int, tuple[Target, Shape]]] = {}  # stacked name -> j -> piece
    copied: dict[str, list[str]] = {}  # canonical name -> the further copies' keys present
    unknown, dropped, duplicate = [], [], []
    for key, shape in source_shapes.items():
        hits = fmt.to_canonical(key)
        if hits is None:
            unknown.append(key)
            continue
        if hits is False or all(t.name in fmt.optional and t.name not in expected for t in hits):
            dropped.append(key)
            continue
        shapes = TRANSFORMS[hits[0].transform].piece_shapes(tuple(shape))
        for t, s in zip(hits, shapes):
            if TRANSFORMS[t.transform].stacked:
                pieces.setdefault(t.name, {})[t.part] = (t, s)
                continue
            if t.copy:
                copied.setdefault(t.name, []).append(key)
                continue
            if t.name in entries:
                duplicate.append(key)
            entries[t.name] = (t, s)
    missing = [fmt.from_canonical(n).source for n in expected if n not in entries and n not in pieces]
    for name, got in pieces.items():
        t0 = next(iter(got.values()))[0]
        n = expected[name][0] if name in expected else 0
        unknown += [stack_key(t0, j) for j in got if j >= n]
        missing += [stack_key(t0, j) for j in range(n) if j not in got]
        if name in expected and all(j in got for j in range(n)):
            keys = tuple(stack_key(t0, j) for j in range(n))
            shapes = {got[j][1] for j in range(n)}
            shape = (n, *got[0][1]) if len(shapes) == 1 else BAD
            entries[name] = (Target(name, t0.source, t0.transform, 0, keys), shape)
    unexpected = [entries[n][0].source for n in entries if n not in expected] + unknown + duplicate
    unexpected += [k for n, keys in copied.items() if n not in expected for k in keys]
    misfit = []  # (copy key, its shape, the shape of the key it copies)
    if fmt.has_copies:  # every copy the format names is there, shaped as the tensor it copies
        for n in expected:
            target = fmt.from_canonical(n)
            missing += [k for k in target.copies if k not in source_shapes]
            if n in entries and target.copies:
                entries[n] = (replace(entries[n][0], copies=target.copies), entries[n][1])
                have = tuple(source_shapes[entries[n][0].source])
                misfit += [(k, tuple(source_shapes[k]), have) for k in target.copies
                           if k in source_shapes and tuple(source_shapes[k]) != have]
    problems = []
    if unexpected:
        problems.append(f"unexpected tensors {_listing(set(unexpected))}")
    if missing:
        problems.append(f"missing tensors {_listing(set(missing))}")
    if not problems:
        bad = sorted(_misshaped(fmt, n, entries[n][0], source_shapes, expected) for n, s in expected.items() if entries[n][1] != tuple(s))
        bad += sorted({f"{k} has shape {got}, expected {want} (a copy)" for k, got, want in misfit})
        if bad:
            problems.append("mis-shaped tensors: " + "; ".join(bad[:6]) + (f" (+{len(bad) - 6} more)" if len(bad) > 6 else ""))
    if problems:
        raise StatecastError(f"{where} ({fmt.name}): " + "; ".join(problems))
    return Mapping(entries={n: entries[n] for n in expected}, dropped=dropped)


def _misshaped(fmt: SourceFormat, name: str, target: Target, source_shapes: dict[str, Shape], expected: dict[str, Shape]) -> str:
    if target.stack:  # name the first piece whose shape is off
        want = tuple(expected[name][1:])
        key = next((k for k in target.stack if tuple(source_shapes[k]) != want), target.stack[0])
        return f"{key} has shape {tuple(source_shapes[key])}, expected {want}"
    return f"{target.source} has shape {tuple(source_shapes[target.source])}, expected {_source_shape(fmt, name, expected)}"


def _source_shape(fmt: SourceFormat, name: str, expected: dict[str, Shape]) -> Shape:
    """The source-side shape matching the expected canonical shapes (for error messages)."""
    target = fmt.from_canonical(name)
    parts = tuple(torch.empty(expected[n], device="meta") for n in fmt.siblings(target))
    return tuple(TRANSFORMS[target.transform].join(parts).shape)


def to_canonical_state(fmt: SourceFormat, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An in-memory source state dict (e.g. ``hf_model.state_dict()``) -> canonical names.

    Same table and transforms as ``convert pull``; unknown keys are an error. Tied
    aliases (``optional`` names) are kept; pass the result to ``load_state_dict(strict=False)``
    or drop them when the model ties its head.
    """
    out: dict[str, torch.Tensor] = {}
    stacks: dict[str, dict[int, torch.Tensor]] = {}
    unknown, copies = [], []
    for key, t in state.items():
        hits = fmt.to_canonical(key)
        if hits is None:
            unknown.append(key)
        elif hits is not False and hits[0].copy:
            copies.append((key, hits, t))
        elif hits is not False and TRANSFORMS[hits[0].transform].stacked:
            stacks.setdefault(hits[0].name, {})[hits[0].part] = t
        elif hits is not False:
            for target, piece in zip(hits, TRANSFORMS[hits[0].transform].pieces(t)):
                out[target.name] = piece
    if unknown:
        raise StatecastError(f"{fmt.name}: unexpected tensors {_listing(unknown)}")
    for name, got in stacks.items():
        if sorted(got) != list(range(len(got))):
            raise StatecastError(f"{fmt.name}: the pieces of {name} are not numbered 0..{len(got) - 1}: {sorted(got)}")
        out[name] = TRANSFORMS["stack"].forward([got[j] for j in range(len(got))])
    for key, hits, t in copies:  # a further copy of a tied tensor: equal to the first, or its only holder
        for target, piece in zip(hits, TRANSFORMS[hits[0].transform].pieces(t)):
            if target.name in out and not same_bits(out[target.name], piece):
                raise StatecastError(f"{fmt.name}: {key} differs from {fmt.from_canonical(target.name).source}, "
                                     f"of which it is a copy")
            out.setdefault(target.name, piece)
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality: same dtype, shape and bytes (NaNs included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def from_canonical_state(fmt: SourceFormat, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical names -> the source format's names (the inverse of :func:`to_canonical_state`)."""
    out = {}
    for source, names, transform in group_by_source(fmt, state):
        t = TRANSFORMS[transform]
        if t.stacked:
            out.update(unstack(source, t, state[names[0]]))
        else:
            out[source] = t.join(tuple(state[n] for n in names))
    return out


def unstack(source: str, transform: Transform, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """A stacked canonical tensor -> {source key of piece j: piece j}."""
    return {source.format(j=j): piece for j, piece in enumerate(transform.inverse(t))}


def group_by_source(fmt: SourceFormat, names) -> list[tuple[str, list[str], str]]:
    """(source key, its canonical names in part order, transform) for every canonical name,
    in first-seen order, and again for each further copy of it (``Rule.copy``); a split tensor
    whose parts are not all present is an error. For a stacked tensor the source key is the
    template with ``{j}`` left in."""
    groups: dict[str, tuple[list[str], str]] = {}
    for name in names:
        target = fmt.from_canonical(name)
        if target.source not in groups:
            groups[target.source] = (fmt.siblings(target), target.transform)
            groups.update((c, groups[target.source]) for c in target.copies)
    present = set(names)
    for source, (parts, _) in groups.items():
        lacking = [p for p in parts if p not in present]
        if lacking:
            raise StatecastError(f"{fmt.name}: {source} needs {_listing(lacking)} as well")
    return [(s, p, t) for s, (p, t) in groups.items()]
