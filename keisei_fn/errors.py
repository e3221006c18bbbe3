"""One typed error hierarchy for keisei_fn.

Every error the library raises derives from :class:`KeiseiFnError` *and* from the builtin
exception a caller would naturally catch (``FileNotFoundError``, ``ValueError``, ...), so both
``except KeiseiFnError`` and ``except ValueError`` work.

Messages say what happened, where (path, key), expected vs found, and how to fix it.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AlreadyConvertedError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "GateError",
    "GrowError",
    "IllegalMoveError",
    "IncompleteCheckpointError",
    "IntegrityError",
    "InvalidModelError",
    "InvalidPositionError",
    "KeiseiFnError",
    "MissingExtraError",
    "SpecError",
    "StateMismatchError",
    "UnhealthyCheckpointError",
    "UnsupportedDtypeError",
    "UnsupportedFormatError",
    "UnsupportedValueError",
]


class KeiseiFnError(Exception):
    """Root of every error raised by keisei_fn."""


class MissingExtraError(KeiseiFnError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


class SpecError(KeiseiFnError, ValueError):
    """A model/feature specification or its configuration is invalid."""


class CheckpointNotFoundError(KeiseiFnError, FileNotFoundError):
    """A checkpoint, run directory or path that was asked for does not exist."""


class CheckpointExistsError(KeiseiFnError, FileExistsError):
    """A different checkpoint is already committed under the same name."""


class IntegrityError(KeiseiFnError, ValueError):
    """A checkpoint file is corrupt: digest mismatch, truncation, unparsable content."""


class IncompleteCheckpointError(KeiseiFnError, ValueError):
    """A checkpoint was never committed (no sidecar, missing weights, a leftover temp file)."""


class StateMismatchError(KeiseiFnError, ValueError):
    """A saved state does not fit the live objects (missing/unexpected keys, shapes, dtypes)."""

    @classmethod
    def listing(cls, header: str, problems: Sequence[str]) -> StateMismatchError:
        """The error for the problems a comparison found: ``header:``, then one ``  - problem``
        line each (the command line prints the header and the first problem on one line).

        Example:
            >>> print(StateMismatchError.listing("the model does not fit", ["a", "b"]))
            the model does not fit:
              - a
              - b
        """
        return cls(f"{header}:" + "".join(f"\n  - {problem}" for problem in problems))


class UnsupportedFormatError(KeiseiFnError, ValueError):
    """A file is of a format or version this library does not read (e.g. a pickled ``.pth``)."""


class AlreadyConvertedError(UnsupportedFormatError):
    """A file handed to ``import_legacy`` is already a keisei_fn checkpoint (its sidecar or
    weights file): it needs no conversion; load it directly."""


class UnsupportedDtypeError(KeiseiFnError, TypeError):
    """A tensor dtype that cannot be stored losslessly (complex128, complex32, float8_e8m0fnu)."""


class IllegalMoveError(KeiseiFnError, ValueError):
    """A Shogi move or action index is not legal (or not in range) in the given position."""


class UnsupportedValueError(KeiseiFnError, TypeError):
    """A non-tensor value that a checkpoint cannot store exactly (e.g. an arbitrary object)."""


class InvalidPositionError(KeiseiFnError, ValueError):
    """An SFEN string does not describe a valid Shogi position."""


class GrowError(SpecError):
    """``grow`` cannot turn a state into one for the asked spec (a field other than the tower's
    depth and width differs, or the tower would shrink); ``field`` names the spec field."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


class UnhealthyCheckpointError(KeiseiFnError, ValueError):
    """A checkpoint the health gate marked unhealthy was asked for where only a healthy one
    will do (publishing it)."""


class InvalidModelError(KeiseiFnError, ValueError):
    """A model unfit to serve: ``validate_model`` found non-finite parameters or outputs, or
    policy/value outputs out of their sane ranges (the message lists the problems)."""


class GateError(KeiseiFnError, ValueError):
    """An export does not behave like its source: the behaviour gate's figures fall short of
    its thresholds (the message lists them; ``force=True`` exports it anyway)."""
