"""JSON-lines results files of the benchmark scripts: one line per finished run, appended as it finishes, so an
interrupted run resumes; a line torn by an interruption is skipped on reading and never glued to the next one."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, Hashable


def append_jsonl(path: Path, row: dict) -> None:
    """Append ``row`` as one line (after a newline first if the file ends in a torn line), flushed to disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as f:
        f.seek(0, os.SEEK_END)
        torn = False
        if f.tell():
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        f.write((("\n" if torn else "") + json.dumps(row) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def load_jsonl(path: Path, key: Callable[[dict], Hashable]) -> list[dict]:
    """The complete lines of ``path``, the last one per ``key(row)`` (a rerun appends anew); [] if there is none."""
    path = Path(path)
    if not path.exists():
        return []
    rows = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            print(f"{path}: skipping an incomplete line", file=sys.stderr)
            continue
        rows[key(row)] = row
    return list(rows.values())
