"""Files of a run, written so that nothing already written is lost: one atomic writer, the metrics log.

Every JSON file of a run (``results.json``, ``env.json``, ``stage_done.json``, ...) goes through
:func:`write_json_atomic`: the text is written to a temporary file in the same directory and renamed over
the target, so a crash while writing leaves the previous version whole. ``metrics.jsonl`` (and
``samples.jsonl``) are append-only logs of one JSON object per step; :func:`truncate_log` drops the lines
of steps after a checkpoint when a run resumes from it (they will be run again).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """``obj`` as indented JSON at ``path``, atomically (non-JSON numbers such as numpy floats become floats)."""
    return write_text_atomic(path, json.dumps(obj, indent=2, default=float))


def read_json(path: str | Path, default: Any = None) -> Any:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else default


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path: str | Path, step: int) -> None:
    """Keep the lines of a JSONL log whose ``step`` is at most ``step`` (resume: later ones will be re-run)."""
    path = Path(path)
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    write_text_atomic(path, "".join(ln + "\n" for ln in lines))


def replace_dir_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` into a fresh hidden directory next to ``target``, then rename it to ``target``
    (replacing a ``target`` that exists: the old one is moved aside first and removed after). A crash or error
    in ``write`` removes the partial directory and leaves ``target`` as it was."""
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
