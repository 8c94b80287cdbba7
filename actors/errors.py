"""The one base class of every error that becomes an error row: it carries `kind`, the short
reason class written to the output's `error_kind` column (e.g. "prompt", "decode", "encoding")."""
from __future__ import annotations


class KindedError(Exception):
    """An error about one input row (never about the whole job), classified by `kind`."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
