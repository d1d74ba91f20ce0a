"""Reports: the verdicts, a row per parameter leaf, the report of a check and of a chain, merging and renaming of
reports, and their text, JSON and Markdown forms. Plain Python: no JAX here."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections.abc import Sequence
from typing import Any


class Verdict(enum.StrEnum):
    """A check's verdict, from the mildest to the most severe (see :class:`GradReport`). Each member is its own
    name as a string: ``Verdict.KINK == "kink"``, and JSON and formatted text show the plain name."""

    OK = "ok"
    KINK = "kink"
    SINGULAR = "singular"
    FD_UNRELIABLE = "fd_unreliable"
    HAND_WRONG = "hand_wrong"
    AUTODIFF_WRONG = "autodiff_wrong"
    BOTH_WRONG = "both_wrong"
    MISMATCH = "mismatch"


#: Every verdict, from the mildest to the most severe.
VERDICTS = tuple(Verdict)
#: The verdicts that pass.
PASSING = (Verdict.OK, Verdict.KINK, Verdict.SINGULAR, Verdict.FD_UNRELIABLE)
_SEVERITY: dict[str, int] = {v: i for i, v in enumerate(VERDICTS)}  # keyed by verdict strings too (a StrEnum)
_FAILING = (Verdict.HAND_WRONG, Verdict.AUTODIFF_WRONG, Verdict.BOTH_WRONG, Verdict.MISMATCH)
_BLAMES = (Verdict.HAND_WRONG, Verdict.AUTODIFF_WRONG, Verdict.BOTH_WRONG)
_LIST = 8  # paths listed in a note before "and N more"


def _fmt(x: float | None, width: int = 11) -> str:
    if x is None:
        return "—".rjust(width)
    if isinstance(x, float) and not math.isfinite(x):
        return str(x).rjust(width)
    return f"{x:.4e}".rjust(width)


def _json_float(x: float | None) -> float | str | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else str(x)


@dataclasses.dataclass(frozen=True)
class Row:
    """The check of one parameter leaf.

    Attributes:
        path: the leaf's pytree path in `jax.tree_util.keystr` form, e.g. ``['dense1']['W']``.
        verdict: a :class:`Verdict`, one of :data:`VERDICTS` (equal to its name: ``row.verdict == "kink"``).
        worst_index: index into the leaf of the element that decided the verdict (None when the leaf was
            checked by projections only and nothing was wrong, or no element could be singled out).
        max_abs_err: the largest difference among the three values shown (``autodiff``, ``hand``,
            ``numeric``), i.e. at ``worst_index``.
        max_rel_err: the same relative to the largest of those values.
        autodiff, hand, numeric: the three values at ``worst_index`` (numeric: the finite-difference estimate).
        method: ``"exact"`` (every element by finite differences) or ``"projection"``.
        size: the leaf's number of elements.
        checked: the number of elements checked one by one with finite differences.
        directions: the number of random directions checked with finite differences.
        note: why the verdict was given, in words.
    """

    path: str
    verdict: Verdict
    worst_index: tuple[int, ...] | None
    max_abs_err: float
    max_rel_err: float
    autodiff: float | None
    hand: float | None
    numeric: float | None
    method: str
    size: int
    checked: int
    directions: int = 0
    note: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "verdict", Verdict(self.verdict))  # a plain name becomes its member

    @property
    def ok(self) -> bool:
        return self.verdict in PASSING

    @property
    def where(self) -> str:
        """The leaf path and, when known, the element: ``['dense1']['W'][3, 1]``."""
        return self.path + (str(list(self.worst_index)) if self.worst_index is not None else "")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["verdict"] = str(self.verdict)
        d["worst_index"] = list(self.worst_index) if self.worst_index is not None else None
        for k in ("max_abs_err", "max_rel_err", "autodiff", "hand", "numeric"):
            d[k] = _json_float(d[k])
        d["ok"] = self.ok
        return d


def _combine_verdicts(verdicts: Sequence[str]) -> Verdict:
    """The verdict over several: one kind of blame (with or without unattributed disagreements) is that
    blame; different blames together are a mismatch; else the most severe passing verdict."""
    blamed = {v for v in verdicts if v in _BLAMES}
    if len(blamed) == 1:
        return Verdict(blamed.pop())
    if blamed or Verdict.MISMATCH in verdicts:
        return Verdict.MISMATCH
    return Verdict(max(verdicts, key=_SEVERITY.__getitem__, default=Verdict.OK))


def _err_key(x: float) -> float:
    return x if math.isfinite(x) else 1e308


def _worst_row(rows: Sequence[Row], verdict: str) -> Row | None:
    """The row that decided ``verdict``: failing rows first (the blamed kind when one is blamed), then the
    most severe passing verdict, then the largest error."""
    if not rows:
        return None
    deciding = [r for r in rows if r.verdict == verdict] or [r for r in rows if not r.ok] or list(rows)
    return max(deciding, key=_severity)


def _severity(row: Row) -> tuple[int, float]:
    """How bad a row is: its verdict's severity, then its error."""
    return _SEVERITY[row.verdict], _err_key(row.max_abs_err)


@dataclasses.dataclass(frozen=True)
class GradReport:
    """The result of :func:`check_grad` (and of :func:`check_vjp`, :func:`check_jacobian`).

    ``verdict`` is one of :data:`VERDICTS`; ``ok`` is True for the passing ones (:data:`PASSING`):

    - ``ok``: autodiff, hand and finite differences agree.
    - ``kink``: not differentiable there (ReLU at 0, max at a tie, |x| at 0); the values lie between the
      one-sided derivatives, so each is a valid subgradient.
    - ``singular``: the derivative is infinite or undefined there (``sqrt`` at 0), and autodiff and hand
      describe it alike.
    - ``fd_unreliable``: autodiff and hand agree; finite differences cannot decide (the note says why).
    - ``hand_wrong`` / ``autodiff_wrong``: that side disagrees with the other two (a wrong ``custom_vjp`` is
      ``autodiff_wrong``).
    - ``both_wrong``: autodiff and hand agree with each other, and confident finite differences disagree
      with both: a mistake they share.
    - ``mismatch``: a disagreement no single side can be blamed for.

    ``str(report)`` is a table, a line per leaf; :meth:`to_dict` is JSON-able (with an ``environment``
    block), :meth:`to_markdown` is for pasting into a bug report; :meth:`assert_ok` raises an AssertionError
    carrying the table.
    """

    rows: tuple[Row, ...]
    verdict: Verdict
    title: str = "check_grad"
    dtype: str = ""
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    environment: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "verdict", Verdict(self.verdict))  # a plain name becomes its member

    @property
    def ok(self) -> bool:
        return self.verdict in PASSING

    @property
    def failing(self) -> tuple[Row, ...]:
        return tuple(r for r in self.rows if not r.ok)

    @property
    def worst(self) -> Row | None:
        """The row that decided the verdict (None for a report without rows)."""
        return _worst_row(self.rows, self.verdict)

    def _head(self) -> str:
        n = sum(r.size for r in self.rows)
        return (f"{self.title}: verdict {self.verdict} ({'ok' if self.ok else 'NOT OK'}) — {len(self.rows)} leaves, "
                f"{n} parameters{', ' + self.dtype if self.dtype else ''}, {self.seconds:.2f}s")

    def summary(self) -> str:
        """A line: the verdict and, when not plain ok, the leaf and element that decided it."""
        n = sum(r.size for r in self.rows)
        head = (f"{self.title}: {self.verdict} ({'ok' if self.ok else 'NOT OK'}) — {len(self.rows)} leaves, "
                f"{n} parameters, {self.seconds:.2f}s")
        r = self.worst
        if r is None or self.verdict == Verdict.OK:
            return head
        if self.ok:
            why = {Verdict.KINK: "not differentiable at or next to",
                   Verdict.FD_UNRELIABLE: "finite differences unsure at", Verdict.SINGULAR: "no finite derivative at"}
            return f"{head}; {why.get(r.verdict, r.verdict)} {r.where}"
        return f"{head}; {r.verdict} at {r.where}: {r.note}"

    def __str__(self) -> str:
        lines = [self._head()]
        pw = max([len("leaf")] + [len(r.path) for r in self.rows])
        lines.append(
            f"  {'leaf'.ljust(pw)}  {'verdict':14s} {'method':18s} {'worst index':12s}"
            f" {'autodiff':>11s} {'hand':>11s} {'numeric':>11s} {'abs err':>10s} {'rel err':>10s}"
        )
        for r in self.rows:
            idx = str(list(r.worst_index)) if r.worst_index is not None else "—"
            lines.append(
                f"  {r.path.ljust(pw)}  {r.verdict:14s} {_method(r):18s} {idx:12s}"
                f" {_fmt(r.autodiff)} {_fmt(r.hand)} {_fmt(r.numeric)} {_fmt(r.max_abs_err, 10)} {_fmt(r.max_rel_err, 10)}"
            )
        explained = [r for r in self.rows if r.note]
        if explained or self.notes:
            lines.append("  notes:")
            lines += [f"    {r.path or '(params)'}: {r.note}" for r in explained]
            lines += [f"    {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "verdict": str(self.verdict),
            "ok": self.ok,
            "dtype": self.dtype,
            "seconds": self.seconds,
            "notes": list(self.notes),
            "rows": [r.to_dict() for r in self.rows],
            "environment": dict(self.environment),
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def to_markdown(self) -> str:
        """The report as Markdown, for pasting into an issue: verdict, a table of leaves, notes, environment."""
        def cell(x: Any) -> str:
            return str(x).replace("|", "\\|")

        out = [f"### {cell(self.title)}: `{self.verdict}` ({'ok' if self.ok else 'NOT OK'})", ""]
        out.append(f"{len(self.rows)} leaves, {sum(r.size for r in self.rows)} parameters"
                   + (f", {self.dtype}" if self.dtype else "") + f", {self.seconds:.2f}s")
        out += ["", "| leaf | verdict | method | worst index | autodiff | hand | numeric | abs err | rel err |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            idx = str(list(r.worst_index)) if r.worst_index is not None else "—"
            vals = [_fmt(v).strip() for v in (r.autodiff, r.hand, r.numeric)]
            out.append(f"| `{cell(r.path or '(params)')}` | {r.verdict} | {_method(r)} | {idx} | "
                       + " | ".join(vals) + f" | {_fmt(r.max_abs_err).strip()} | {_fmt(r.max_rel_err).strip()} |")
        notes = [f"`{cell(r.path or '(params)')}`: {cell(r.note)}" for r in self.rows if r.note] + list(self.notes)
        if notes:
            out += ["", "Notes:", ""] + [f"- {n}" for n in notes]
        if self.environment:
            out += ["", "<details><summary>Environment</summary>", "", "```json",
                    json.dumps(self.environment, indent=1, sort_keys=True), "```", "", "</details>"]
        return "\n".join(out) + "\n"

    def assert_ok(self) -> GradReport:
        """Raises an AssertionError carrying the table unless ``ok``; returns the report otherwise."""
        if not self.ok:
            raise AssertionError("gradient check failed\n" + str(self))
        return self


def _method(r: Row) -> str:
    return f"exact {r.checked}/{r.size}" if r.method == "exact" else f"proj {r.directions}d+{r.checked}e"


def _rename_rows(report: GradReport, names: Sequence[str], title: str) -> GradReport:
    rows = []
    for r in report.rows:
        path = r.path
        if path.startswith("["):
            end = path.index("]")
            head = path[1:end]
            if head.isdigit() and int(head) < len(names):
                path = names[int(head)] + path[end + 1 :]
        rows.append(dataclasses.replace(r, path=path))
    return dataclasses.replace(report, rows=tuple(rows), title=title)


def _merge(reports: Sequence[GradReport], title: str, extra_notes: Sequence[str] = ()) -> GradReport:
    by_path: dict[str, Row] = {}
    order = []
    for rep in reports:
        for r in rep.rows:
            if r.path not in by_path:
                order.append(r.path)
                by_path[r.path] = r
            else:
                cur = by_path[r.path]
                best = r if _severity(r) > _severity(cur) else cur
                by_path[r.path] = dataclasses.replace(best, checked=max(cur.checked, r.checked),
                                                      directions=cur.directions + r.directions)
    rows = tuple(by_path[p] for p in order)
    notes = tuple(dict.fromkeys([n for rep in reports for n in rep.notes] + list(extra_notes)))
    return GradReport(rows, _combine_verdicts([r.verdict for r in rows]), title, reports[0].dtype, notes,
                      sum(rep.seconds for rep in reports), dict(reports[0].environment))


@dataclasses.dataclass(frozen=True)
class ChainReport:
    """The result of :func:`check_chain`: one :class:`GradReport` per link, and the whole chain's.

    ``first_broken`` is the first link (in forward order) whose hand backward is wrong, or None.
    """

    links: tuple[tuple[str, GradReport], ...]
    end_to_end: GradReport

    @property
    def first_broken(self) -> str | None:
        return next((name for name, rep in self.links if not rep.ok), None)

    @property
    def ok(self) -> bool:
        return self.end_to_end.ok and all(rep.ok for _, rep in self.links)

    @property
    def verdict(self) -> Verdict:
        return _combine_verdicts([rep.verdict for _, rep in self.links] + [self.end_to_end.verdict])

    def __str__(self) -> str:
        w = max(len(n) for n, _ in self.links) if self.links else 4
        lines = [f"check_chain: {self.verdict} ({'ok' if self.ok else 'NOT OK'})"
                 + (f" — first broken link: {self.first_broken}" if self.first_broken else "")]
        for name, rep in self.links:
            worst = rep.worst
            where = worst.where if worst else ""
            err = _fmt(worst.max_abs_err if worst else None)
            lines.append(f"  {name.ljust(w)}  {rep.verdict:14s} worst {where:24s} abs err {err}")
        lines.append(f"  {'(whole chain)'.ljust(w)}  {self.end_to_end.verdict}")
        for name, rep in self.links:
            if not rep.ok or rep.verdict != Verdict.OK:
                lines.append("")
                lines.append(f"[{name}] " + str(rep))
        if not self.end_to_end.ok:
            lines += ["", "[whole chain] " + str(self.end_to_end)]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": str(self.verdict),
            "ok": self.ok,
            "first_broken": self.first_broken,
            "links": [{"name": n, **rep.to_dict()} for n, rep in self.links],
            "end_to_end": self.end_to_end.to_dict(),
        }

    def assert_ok(self) -> ChainReport:
        if not self.ok:
            raise AssertionError("chain check failed\n" + str(self))
        return self


@dataclasses.dataclass(frozen=True)
class AuditRow:
    """The audit of one custom derivative rule over the calls checked (see :func:`funcgrad.verify.audit`).

    Attributes:
        rule: the custom function's ``__name__``.
        source: where it is defined, ``file:line``.
        kind: ``"custom_vjp"`` or ``"custom_jvp"``.
        calls: how many of its calls (call sites, loop iterations) were checked.
        seen: how many calls the forward pass made (more than ``calls`` when loops were sampled).
        verdict: a :class:`Verdict`, as for :func:`check_grad` (the rule is "autodiff", JAX's plain autodiff of
            its primal is "hand"; the rule passes where only the latter disagrees).
        worst_index: ``(input number, *element)`` of the element that decided the verdict: the input among the
            rule's positional (flattened) array arguments.
        where: the call that decided it: its call site and nesting (``jit(block) › scan iteration 3``).
        rule_value, primal, numeric: the rule's derivative there, the primal's plain autodiff (None when not
            differentiable) and finite differences.
        max_abs_err, max_rel_err: the largest difference among those values, absolute and relative.
        on_path: some input of the rule depends on the selected parameters (``wrt``), so a wrong rule corrupts
            their gradient.
        note: why the verdict was given, in words.
    """

    rule: str
    source: str
    kind: str
    calls: int
    seen: int
    verdict: Verdict
    worst_index: tuple[int, ...] | None
    where: str
    rule_value: float | None
    primal: float | None
    numeric: float | None
    max_abs_err: float
    max_rel_err: float
    on_path: bool = True
    note: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "verdict", Verdict(self.verdict))

    @property
    def checked(self) -> bool:
        """False when none of the rule's calls could be checked (the note says why): undecided, not passing."""
        return not (self.calls == 0 and self.verdict == Verdict.FD_UNRELIABLE)

    @property
    def ok(self) -> bool:
        return self.verdict in PASSING and self.checked

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["verdict"] = str(self.verdict)
        d["worst_index"] = list(self.worst_index) if self.worst_index is not None else None
        for k in ("rule_value", "primal", "numeric", "max_abs_err", "max_rel_err"):
            d[k] = _json_float(d[k])
        d["ok"] = self.ok
        return d


def _audit_severity(row: AuditRow) -> tuple[int, float]:
    return _SEVERITY[row.verdict], _err_key(row.max_abs_err)


def _calls(r: AuditRow) -> str:
    """The calls column: those checked, out of those the forward pass made when fewer were checked."""
    return f"{r.calls}/{r.seen}" if r.seen != r.calls else str(r.calls)


def _row_note(r: AuditRow) -> str:
    """A row's note as the tables show it: where a failing verdict was decided, the note, and whether the rule is
    off the gradient path ("" when there is nothing to say)."""
    parts = [r.note] if r.note else []
    if not r.ok and r.where:
        parts.insert(0, f"decided at the call {r.where}")
    if not r.on_path:
        parts.append("not on the gradient path of the selected parameters")
    return "; ".join(parts)


@dataclasses.dataclass(frozen=True)
class AuditReport:
    """The result of :func:`funcgrad.verify.audit`: a row per custom rule; ``ok`` when every rule passes and
    was checked at some call (a rule none of whose calls could be checked is listed in :attr:`unchecked`, with
    verdict ``fd_unreliable`` and the reason in its note: undecided, so not ok).

    ``str(report)`` is a table; :meth:`to_dict` / :meth:`to_json` / :meth:`to_markdown` as for :class:`GradReport`;
    :meth:`assert_ok` raises an AssertionError carrying the table.
    """

    rows: tuple[AuditRow, ...]
    verdict: Verdict
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    environment: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)
    title: str = "audit"
    # Rules in fn's program that this forward pass does not call (an untaken branch), as "name (file:line)": not
    # checked, and not failed (their derivative takes no part in this gradient).
    not_called: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "verdict", Verdict(self.verdict))
        object.__setattr__(self, "not_called", tuple(self.not_called))

    @property
    def ok(self) -> bool:
        """Every rule passes, and every rule was checked at some call at least."""
        return self.verdict in PASSING and not self.unchecked

    @property
    def failing(self) -> tuple[AuditRow, ...]:
        return tuple(r for r in self.rows if not r.ok)

    @property
    def worst(self) -> AuditRow | None:
        if not self.rows:
            return None
        deciding = [r for r in self.rows if r.verdict == self.verdict] or list(self.rows)
        return max(deciding, key=_audit_severity)

    def summary(self) -> str:
        head = (f"{self.title}: {self.verdict} ({'ok' if self.ok else 'NOT OK'}) — {len(self.rows)} custom rule(s), "
                f"{sum(r.calls for r in self.rows)} call(s) checked, {self.seconds:.2f}s")
        if self.unchecked:
            head += "; not checked at any call: " + ", ".join(r.rule for r in self.unchecked)
        if self.not_called:
            head += "; not called at these inputs: " + ", ".join(n.split(" (")[0] for n in self.not_called)
        bad = self.failing
        if not bad:
            return head
        return head + "; failing: " + ", ".join(f"{r.rule} ({r.verdict} at input {_index(r)})" for r in bad)

    def __str__(self) -> str:
        lines = [self.summary()]
        if self.rows:
            rw = max(len("rule"), *(len(r.rule) for r in self.rows))
            lines.append(f"  {'rule'.ljust(rw)}  {'kind':10s} {'calls':>9s}  {'verdict':14s} {'worst index':14s}"
                         f" {'rule':>11s} {'primal AD':>11s} {'numeric':>11s} {'rel err':>10s}  source")
            for r in self.rows:
                lines.append(f"  {r.rule.ljust(rw)}  {r.kind:10s} {_calls(r):>9s}  {r.verdict:14s} {_index(r):14s}"
                             f" {_fmt(r.rule_value)} {_fmt(r.primal)} {_fmt(r.numeric)} {_fmt(r.max_rel_err, 10)}"
                             f"  {r.source}")
        explained = [(r, _row_note(r)) for r in self.rows]
        explained = [(r, n) for r, n in explained if n]
        if explained or self.notes:
            lines.append("  notes:")
            lines += [f"    {r.rule}: {n}" for r, n in explained]
            lines += [f"    {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "verdict": str(self.verdict), "ok": self.ok, "seconds": self.seconds,
                "notes": list(self.notes), "rows": [r.to_dict() for r in self.rows],
                "not_called": list(self.not_called), "environment": dict(self.environment)}

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def to_markdown(self) -> str:
        def cell(x: Any) -> str:
            return str(x).replace("|", "\\|")

        out = [f"### {cell(self.title)}: `{self.verdict}` ({'ok' if self.ok else 'NOT OK'})", "",
               f"{len(self.rows)} custom rule(s), {sum(r.calls for r in self.rows)} call(s) checked, "
               f"{self.seconds:.2f}s", "",
               "| rule | kind | calls | verdict | worst index | rule | primal AD | numeric | rel err | source |",
               "|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            vals = [_fmt(v).strip() for v in (r.rule_value, r.primal, r.numeric, r.max_rel_err)]
            out.append(f"| `{cell(r.rule)}` | {r.kind} | {_calls(r)} | {r.verdict} | {_index(r)} | "
                       + " | ".join(vals) + f" | `{cell(r.source)}` |")
        notes = [f"`{cell(r.rule)}`: {cell(n)}" for r in self.rows if (n := _row_note(r))] + [cell(n) for n in self.notes]
        if notes:
            out += ["", "Notes:", ""] + [f"- {n}" for n in notes]
        if self.environment:
            out += ["", "<details><summary>Environment</summary>", "", "```json",
                    json.dumps(self.environment, indent=1, sort_keys=True, default=str), "```", "", "</details>"]
        return "\n".join(out) + "\n"

    @property
    def unchecked(self) -> tuple[AuditRow, ...]:
        """Rules none of whose calls could be checked (the row's note says why): undecided, not passed."""
        return tuple(r for r in self.rows if not r.checked)

    def assert_ok(self) -> AuditReport:
        """Raises an AssertionError carrying the table unless every rule passes and was checked at some call (a
        rule that could not be checked at all is not taken as passing, nor is an audit that found no rule to check);
        returns the report otherwise."""
        if not self.rows:
            raise AssertionError(
                "custom rule audit checked no rule: fn calls no jax.custom_vjp/custom_jvp rule defined outside JAX and "
                "the frameworks" + (" that exclude leaves" if any(n.startswith("excluded") for n in self.notes) else "")
                + (f" at these inputs (it has {', '.join(self.not_called)} where this forward pass does not go)"
                   if self.not_called else "")
                + "; nothing was audited, which is not a pass\n" + str(self))
        if self.unchecked and self.verdict in PASSING:
            raise AssertionError("custom rule audit could not check " + ", ".join(r.rule for r in self.unchecked)
                                 + " at any call (see the notes)\n" + str(self))
        if not self.ok:
            raise AssertionError("custom rule audit failed\n" + str(self))
        return self


def _index(r: AuditRow) -> str:
    return "—" if r.worst_index is None else str(list(r.worst_index))
