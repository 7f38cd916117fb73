"""Union of a dataset's previous version with new rows, by key, refusing duplicates.

An incremental refresh registers D_t, D_e and their reference log-probs as the previous version plus the
rows of the new prompts. New prompts have new ids, so a key in both means a bug or a race upstream: it is
refused rather than silently doubled or overwritten.
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa


class DuplicateRowsError(ValueError):
    """The new rows repeat keys the previous version already holds."""


def union_by_key(previous: pa.Table, new: pa.Table, key: str, what: str) -> pa.Table:
    """``previous`` followed by ``new`` (same schema); raises :class:`DuplicateRowsError` on shared keys."""
    old_keys = set(previous.column(key).to_pylist())
    new_keys = new.column(key).to_pylist()
    repeated = sorted({k for k in new_keys if k in old_keys})
    if not repeated:
        repeated = sorted(k for k, n in Counter(new_keys).items() if n > 1)
    if repeated:
        more = f" (and {len(repeated) - 5} more)" if len(repeated) > 5 else ""
        shown = ", ".join(map(str, repeated[:5])) + more
        raise DuplicateRowsError(f"{what}: {len(repeated)} {key}(s) would be registered twice: {shown}")
    if new.num_rows == 0:
        return previous
    return pa.concat_tables([previous, new.cast(previous.schema)])
