"""Errors and skip accounting shared by every data loader.

Bad records are never dropped silently: a loader either raises :class:`DataError` naming the record and
what to fix (``on_error="raise"``, the default), or skips it and counts it in a :class:`LoadStats`
that is logged once as a warning on ``logging.getLogger("moe_vlm.data")`` and handed to the caller
(``on_error="skip"``).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

logger = logging.getLogger("moe_vlm.data")

OnError = Literal["raise", "skip"]


class DataError(ValueError):
    """A record that cannot be used as it is; the message names the file, the record and what to fix.

    ``source`` is the file the record came from (a loader's JSON file); a loader fills it in when the
    error leaves it (:func:`handle`), so the message reads ``"<file>: record '<id>': <problem>"``.
    """

    def __init__(self, record_id: object, problem: str | None = None, source: object = None):
        self.message = None
        if problem is None:
            # One argument: torch's DataLoader re-raising a worker's DataError (`ExceptionWrapper.reraise` builds
            # `exc_type(text)` from the worker's traceback text, and turns a type it cannot build that way into a
            # RuntimeError, which the command line would show as a traceback). Keep the type and, of the text, the
            # worker's own message: what follows "DataError: " on its last line.
            text = str(record_id)
            last = text.rstrip().rsplit("\n", 1)[-1]
            self.message = last.split("DataError: ", 1)[1] if "DataError: " in last else text
            record_id = None
        self.record_id = None if record_id is None else str(record_id)
        self.problem = problem if problem is not None else self.message
        self.source = None if source is None else str(source)
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.message is not None:
            return self.message
        where = f"record {self.record_id!r}" if self.record_id is not None else "record"
        return f"{self.source}: {where}: {self.problem}" if self.source else f"{where}: {self.problem}"


def check_text(value: object, record_id: object, what: str) -> str:
    """``value`` if it is a string that can be stored and tokenised, else a DataError naming ``what``.

    JSON can spell lone UTF-16 surrogates (``"\\ud800"``) that Python decodes but neither Arrow nor the
    tokenizer can encode; they are refused here rather than failing deep inside ``datasets``.
    """
    if not isinstance(value, str):
        raise DataError(
            record_id, f"bad field: {what} must be text, got {type(value).__name__} {value!r:.60}"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            record_id, f"invalid text: {what} is not valid Unicode ({e.reason}); fix the file"
        ) from e
    return value


def check_on_error(on_error: str) -> None:
    """Reject an unknown policy early (a typo must not silently mean "skip")."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


@dataclass
class LoadStats:
    """What a loader read, kept, skipped (and why), and which images need an RGB conversion."""

    source: str = ""
    file: str = ""  # the file the records come from: named in every DataError the loader raises
    n_records: int = 0
    n_loaded: int = 0
    skipped_ids: list[str] = field(default_factory=list)
    skip_reasons: Counter = field(default_factory=Counter)
    converted_modes: Counter = field(default_factory=Counter)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped_ids)

    def skip(self, err: DataError) -> None:
        self.skipped_ids.append(err.record_id if err.record_id is not None else "?")
        self.skip_reasons[err.problem.split(":")[0]] += 1

    def log(self) -> None:
        """One warning with the count and the first ids when anything was skipped; info otherwise."""
        if self.converted_modes:
            modes = ", ".join(f"{m}: {c}" for m, c in sorted(self.converted_modes.items()))
            logger.info(
                "%s: %d images are not RGB (%s); they are converted to RGB when collated",
                self.source,
                sum(self.converted_modes.values()),
                modes,
            )
        if self.n_skipped:
            reasons = "; ".join(f"{r} ({c})" for r, c in self.skip_reasons.most_common())
            logger.warning(
                "%s: skipped %d of %d records (%s); first ids: %s",
                self.source,
                self.n_skipped,
                self.n_records,
                reasons,
                ", ".join(self.skipped_ids[:5]),
            )
        else:
            logger.info("%s: loaded %d records", self.source, self.n_loaded)


def handle(err: DataError, on_error: str, stats: LoadStats) -> None:
    """Apply the policy to one bad record: raise it (naming ``stats.file``), or count it as skipped."""
    if err.source is None and stats.file:
        err.source = stats.file
        err.args = (str(err),)
    if on_error == "raise":
        raise err
    stats.skip(err)


__all__ = ["DataError", "LoadStats", "OnError", "check_on_error", "check_text", "handle", "logger"]
