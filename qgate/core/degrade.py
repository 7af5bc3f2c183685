"""Degrade, don't fail: the typed record of a part of a series' output that was left out.

A scorer that raises on one series, or a report object (the quality-map SC series, the
Parametric Map) that cannot be built for it, is skipped; the other scorers, the decision
and the SR still go out. Each skip is a :class:`SkippedPart`: what was left out
(:class:`PartKind` and a name), why (a closed :class:`SkipReason`) and the error text for
people. It is stored with the result (``results.skipped_parts``), listed in the SR and
shown by the CLI and the review app. Code branches on ``reason``, never on ``detail``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class PartKind(enum.StrEnum):
    """What kind of part was skipped."""

    SCORER = "scorer"
    OUTPUT = "output"


class OutputName(enum.StrEnum):
    """The report objects that may be skipped (the SR never is: it says what was)."""

    SECONDARY_CAPTURE = "secondary_capture"
    PARAMETRIC_MAP = "parametric_map"


class SkipReason(enum.StrEnum):
    """Why a part was skipped."""

    #: The scorer raised on this series (whatever the cause: a matrix the model cannot
    #: take, a numerical failure, a device error).
    SCORER_ERROR = "scorer_error"
    #: The CT has no Frame of Reference UID, which the Parametric Map IOD requires.
    NO_FRAME_OF_REFERENCE = "no_frame_of_reference"
    #: Building the report object raised for another reason.
    OUTPUT_ERROR = "output_error"


@dataclass(frozen=True)
class SkippedPart:
    """One part of a series' output that was skipped, and why.

    Parameters
    ----------
    kind: PartKind
        A scorer or a report object.
    name: str
        The scorer's registered name, or an :class:`OutputName` value.
    reason: SkipReason
        The closed reason code.
    detail: str
        The error as people read it (exception type and message); never parsed.
    """

    kind: PartKind
    name: str
    reason: SkipReason
    detail: str

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: strings converted to enums on entry
        set_(self, "kind", PartKind(self.kind))
        set_(self, "reason", SkipReason(self.reason))
        if not isinstance(self.name, str) or not self.name:
            raise TypeError('Argument "name" must be a non-empty str.')
        if not isinstance(self.detail, str):
            raise TypeError('Argument "detail" must be a str.')

    @classmethod
    def from_error(
        cls, kind: PartKind, name: str, exc: BaseException, reason: SkipReason
    ) -> SkippedPart:
        """The record of ``exc``; a :class:`NotApplicable` brings its own reason."""
        if isinstance(exc, NotApplicable):
            reason = exc.reason
        return cls(kind, name, reason, f"{type(exc).__name__}: {exc}"[:2000])

    def describe(self) -> str:
        """One line for people: ``"scorer n2q skipped (scorer_error): ValueError: ..."``."""
        return f"{self.kind.value} {self.name} skipped ({self.reason.value}): {self.detail}"

    def to_json(self) -> dict[str, str]:
        return {
            "kind": self.kind.value,
            "name": self.name,
            "reason": self.reason.value,
            "detail": self.detail,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SkippedPart:
        return cls(
            PartKind(data["kind"]), str(data["name"]), SkipReason(data["reason"]), data["detail"]
        )


class NotApplicable(ValueError):
    """A report object cannot be built for this input; ``reason`` says why (typed)."""

    def __init__(self, reason: SkipReason, message: str) -> None:
        super().__init__(message)
        self.reason = SkipReason(reason)
