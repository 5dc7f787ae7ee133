"""Text-to-SQL reward: run the generated query and the gold query on the sample's SQLite database.

The reward (:func:`sql_reward`, registered as ``sql``) is 1.0 when the two result sets match
(execution accuracy, as in Spider / BIRD). Otherwise, with ``partial`` on (default), it is a
weighted sum of partial rewards in the spirit of Reasoning-SQL (Pourreza et al. 2025,
"Reasoning-SQL: Reinforcement Learning with SQL Tailored Partial Rewards for Reasoning-Enhanced
Text-to-SQL", arXiv:2503.23157, Sec. 3), of which three are implemented here:

=============  ==========================================================================  =======
component      value                                                                       weight
=============  ==========================================================================  =======
executable     1 if the query ran without error (syntax check reward)                     0.1
schema         Jaccard similarity of the schema items (table and column names of the       0.2
               database) mentioned in the predicted and the gold query (schema linking)
ngram          Jaccard similarity of the sets of token n-grams (``n = 2``) of the two      0.1
               queries (n-gram similarity reward)
=============  ==========================================================================  =======

so a wrong query scores at most 0.4 and a correct one 1.0. The weights are this module's
defaults (``weights:`` overrides them), not the paper's; the paper's AI-feedback (LLM judge) and
format rewards are separate rewards here (``judge``, ``format``).

Safety (the query comes from a model): a statement that starts with any keyword other than
``SELECT`` / ``WITH`` / ``VALUES`` is refused before it is prepared; a database file is opened
read-only (``mode=ro`` URI); every connection runs with ``PRAGMA query_only`` and an authorizer
that allows only reading (``SELECT``, reads, functions other than ``load_extension``, recursive CTEs) and refuses
everything else (writes, DDL, ``ATTACH``/``DETACH``, ``PRAGMA``, transactions); a second
statement is refused; a progress handler stops a query after ``query_timeout_s`` (a runaway
recursive CTE); results are capped at ``max_rows`` rows and ``max_result_bytes`` bytes; SQLite's
own limits cap one value at 1 MB and the query text at 100 kB. Also registered with
``parallel=True``, so the process pool's per-call timeout is a second guard.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
import urllib.parse
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Any, Optional

from postrl.rewards import register_reward
from postrl.rewards.base import Scored

DEFAULT_WEIGHTS = {"executable": 0.1, "schema": 0.2, "ngram": 0.1}
SQL_STATUSES = ("ok", "wrong_result", "syntax_error", "timeout", "no_query", "refused", "too_large")

_MAX_VALUE_BYTES = 1_000_000
_MAX_SQL_CHARS = 100_000
_CACHE_SIZE = 16

# Authorizer action codes that a read-only query needs; everything else is denied.
_ALLOWED_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                    getattr(sqlite3, "SQLITE_RECURSIVE", 33)}
_DENIED_FUNCTIONS = {"load_extension"}
# Every SQLite statement starts with one of these keywords or with SELECT / WITH / VALUES; text
# that starts with anything else is not a statement (SQLite reports a syntax error).
_OTHER_STATEMENTS = {"alter", "analyze", "attach", "begin", "commit", "create", "delete", "detach", "drop",
                     "end", "explain", "insert", "pragma", "reindex", "release", "replace", "rollback",
                     "savepoint", "update", "vacuum"}


class SQLRefused(Exception):
    """The query asked for something a reward query may not do (write, ATTACH, PRAGMA, 2 statements)."""


class SQLTimeout(Exception):
    """The query ran past its time limit and was interrupted."""


class SQLTooLarge(Exception):
    """The result has more rows or bytes than allowed."""


# ---------------------------------------------------------------------------------------------
# extracting and tokenizing SQL (pure)
# ---------------------------------------------------------------------------------------------
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_FENCE_SQL_RE = re.compile(r"```[ \t]*(?:sql|sqlite)[ \t]*\n?(.*?)```", re.DOTALL | re.IGNORECASE)
_FENCE_RE = re.compile(r"```[^\n`]*\n?(.*?)```", re.DOTALL)


def extract_sql(text: str) -> Optional[str]:
    """The query in a completion: the last ```` ```sql ```` block, else the last ```` ``` ```` block,
    else the whole text; looked for inside the last ``<answer>...</answer>`` when there is one.
    Stripped, trailing semicolons removed; None when nothing is left."""
    if not isinstance(text, str):
        return None
    tagged = _ANSWER_RE.findall(text)
    scope = tagged[-1] if tagged else text
    blocks = _FENCE_SQL_RE.findall(scope) or _FENCE_RE.findall(scope)
    query = blocks[-1] if blocks else scope
    query = query.strip().rstrip(";").strip()
    return query or None


_TOKEN_RE = re.compile(
    r"""'(?:[^']|'')*'            # 'string literal'
      | "(?:[^"]|"")*"            # "quoted identifier"
      | `[^`]*`                   # `quoted identifier`
      | \[[^\]]*\]                # [quoted identifier]
      | \d+(?:\.\d*)?(?:[eE][-+]?\d+)? | \.\d+
      | [A-Za-z_][A-Za-z0-9_$]*   # keyword or identifier
      | <>|!=|<=|>=|==|\|\|       # two-character operators
      | [^\s\w]                   # any other single symbol
    """, re.VERBOSE)


def sql_tokens(sql: str) -> list[str]:
    """SQL split into tokens: string literals, quoted identifiers, numbers, words (lowercased,
    quotes of identifiers removed), operators; comments dropped."""
    sql = re.sub(r"--[^\n]*|/\*.*?(?:\*/|$)", " ", sql, flags=re.DOTALL)
    out = []
    for tok in _TOKEN_RE.findall(sql):
        if tok[0] == "'":
            out.append(tok)  # literals keep their case
        elif tok[0] in '"`[':
            out.append(tok[1:-1].lower())
        else:
            out.append(tok.lower())
    return out


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b|; 1.0 when both are empty."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def ngram_similarity(pred: str, gold: str, n: int = 2) -> float:
    """Jaccard similarity of the sets of token n-grams of two queries (Reasoning-SQL's n-gram
    similarity reward); queries shorter than ``n`` tokens contribute their token tuple as one gram."""
    if n < 1:
        raise ValueError(f"sql: ngram n must be >= 1, got {n}")

    def grams(s: str) -> set:
        t = sql_tokens(s)
        if len(t) < n:
            return {tuple(t)} if t else set()
        return {tuple(t[i:i + n]) for i in range(len(t) - n + 1)}

    return jaccard(grams(pred), grams(gold))


def schema_items(sql: str, names: set[str]) -> set[str]:
    """The table / column names of the database (``names``, lowercased) that ``sql`` mentions."""
    return {t for t in sql_tokens(sql) if t in names}


def has_top_level_order_by(sql: str) -> bool:
    """True when the outermost query of ``sql`` has ``ORDER BY`` (not only inside a subquery)."""
    depth, prev = 0, None
    for tok in sql_tokens(sql):
        if tok == "(":
            depth += 1
        elif tok == ")":
            depth -= 1
        elif depth == 0 and prev == "order" and tok == "by":
            return True
        prev = tok if depth == 0 else None
    return False


def _norm_value(v: Any, digits: int) -> Any:
    if isinstance(v, float):
        r = round(v, digits)
        return int(r) if r.is_integer() else r
    return v


def results_match(pred_rows: Sequence[tuple], gold_rows: Sequence[tuple], ordered: bool,
                  float_digits: int = 6) -> bool:
    """Execution match of two result sets: same rows with the same column order, floats rounded to
    ``float_digits`` decimals (``3`` equals ``3.0``); as multisets (row order ignored, duplicates
    counted) unless ``ordered``."""
    p = [tuple(_norm_value(v, float_digits) for v in row) for row in pred_rows]
    g = [tuple(_norm_value(v, float_digits) for v in row) for row in gold_rows]
    if ordered:
        return p == g
    return Counter(p) == Counter(g)


# ---------------------------------------------------------------------------------------------
# guarded execution
# ---------------------------------------------------------------------------------------------
def _authorizer(action: int, arg1: Any, arg2: Any, dbname: Any, source: Any) -> int:
    if action not in _ALLOWED_ACTIONS:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION and str(arg2).lower() in _DENIED_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def _harden(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA query_only = 1")
    conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, _MAX_VALUE_BYTES)
    conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, _MAX_SQL_CHARS)


def open_readonly(db_path: str) -> sqlite3.Connection:
    """A hardened read-only connection to a database file (``mode=ro`` URI, ``query_only``)."""
    path = os.path.abspath(db_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sql: database file {db_path!r} not found")
    conn = sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=ro", uri=True, check_same_thread=False)
    _harden(conn)
    return conn


def open_from_script(schema: str) -> sqlite3.Connection:
    """A hardened in-memory database built by running ``schema`` (``CREATE``/``INSERT`` statements)."""
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    try:
        conn.executescript(schema)
    except sqlite3.Error as exc:
        conn.close()
        raise ValueError(f"sql: the sample's db_schema script failed: {exc}") from None
    _harden(conn)
    return conn


class _Cache:
    """Per-process LRU of hardened connections (and their schema names) keyed by database."""

    def __init__(self, size: int):
        self.size = size
        self.items: OrderedDict[tuple, tuple[sqlite3.Connection, set[str]]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: tuple, make) -> tuple[sqlite3.Connection, set[str]]:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        conn = make()
        entry = (conn, _schema_names(conn))
        with self.lock:
            self.items[key] = entry
            while len(self.items) > self.size:
                old_key, (old, _) = self.items.popitem(last=False)
                old.close()
                for k in [k for k in _GOLD_ROWS if k[0] == old_key]:
                    del _GOLD_ROWS[k]
        return entry


_CONNECTIONS = _Cache(_CACHE_SIZE)
_GOLD_ROWS: OrderedDict[tuple, list[tuple]] = OrderedDict()  # (database key, gold, limits) -> rows
_GOLD_CACHE_SIZE = 4096


def _schema_names(conn: sqlite3.Connection) -> set[str]:
    names: set[str] = set()
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")]
    for t in tables:
        names.add(t.lower())
        for col in conn.execute("SELECT name FROM pragma_table_info(?)", (t,)):
            names.add(str(col[0]).lower())
    return names


def _database(sample: Any, db_path_key: str, schema_key: str,
              db_root: Optional[str]) -> tuple[tuple, sqlite3.Connection, set[str]]:
    """(cache key, hardened connection, lowercased table/column names) of the sample's database."""
    meta = getattr(sample, "metadata", None) or {}
    if meta.get(db_path_key):
        path = str(meta[db_path_key])
        if db_root and not os.path.isabs(path):
            path = os.path.join(db_root, path)
        path = os.path.abspath(path)
        mtime = os.path.getmtime(path) if os.path.exists(path) else None
        key = ("file", path, mtime, threading.get_ident())
        return (key, *_CONNECTIONS.get(key, lambda: open_readonly(path)))
    if meta.get(schema_key):
        script = str(meta[schema_key])
        key = ("script", script, threading.get_ident())
        return (key, *_CONNECTIONS.get(key, lambda: open_from_script(script)))
    raise ValueError(f"sql: sample {getattr(sample, 'uid', '?')!r} has no database: put a SQLite file path under "
                     f"metadata[{db_path_key!r}] or a CREATE/INSERT script under metadata[{schema_key!r}]")


def run_query(conn: sqlite3.Connection, sql: str, *, timeout_s: float = 3.0, max_rows: int = 10_000,
              max_result_bytes: int = 50_000_000) -> list[tuple]:
    """Run one read-only statement on a hardened connection and fetch its rows.

    Raises :class:`SQLRefused` (not a SELECT / WITH / VALUES statement, an operation other than
    reading, several statements, too long), :class:`SQLTimeout`
    (past ``timeout_s``), :class:`SQLTooLarge` (more than ``max_rows`` rows or
    ``max_result_bytes`` bytes of values), or ``sqlite3.Error`` (syntax error, unknown column...).
    """
    if len(sql) > _MAX_SQL_CHARS:
        raise SQLRefused(f"query of {len(sql)} characters is longer than {_MAX_SQL_CHARS}")
    first = next(iter(sql_tokens(sql[:10_000])), None)
    if first in _OTHER_STATEMENTS:
        raise SQLRefused(f"only SELECT / WITH / VALUES statements may run, got {first.upper()}")
    deadline = time.monotonic() + timeout_s
    timed_out = False

    def progress() -> int:
        nonlocal timed_out
        if time.monotonic() > deadline:
            timed_out = True
            return 1
        return 0

    conn.set_authorizer(_authorizer)
    conn.set_progress_handler(progress, 1000)
    rows: list[tuple] = []
    try:
        cur = conn.execute(sql)
        size = 0
        for row in cur:
            rows.append(row)
            size += sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in row)
            if len(rows) > max_rows:
                raise SQLTooLarge(f"more than max_rows={max_rows} rows")
            if size > max_result_bytes:
                raise SQLTooLarge(f"more than max_result_bytes={max_result_bytes} bytes")
        return rows
    except sqlite3.ProgrammingError as exc:
        if "one statement" in str(exc):
            raise SQLRefused(str(exc)) from None
        raise
    except sqlite3.Error as exc:
        if timed_out or "interrupted" in str(exc):
            raise SQLTimeout(f"query ran past {timeout_s} s") from None
        if any(s in str(exc) for s in ("not authorized", "authorization denied", "prohibited", "readonly")):
            raise SQLRefused(str(exc)) from None
        raise
    finally:
        conn.set_progress_handler(None, 0)
        conn.set_authorizer(None)
        if conn.in_transaction:
            conn.rollback()


def _gold_rows(db_key: tuple, conn: sqlite3.Connection, gold: str, limits: dict) -> list[tuple]:
    """The gold query's rows, cached per database (the same gold runs once per group of samples)."""
    key = (db_key, gold, tuple(sorted(limits.items())))
    if key in _GOLD_ROWS:
        _GOLD_ROWS.move_to_end(key)
        return _GOLD_ROWS[key]
    rows = run_query(conn, gold, **limits)
    _GOLD_ROWS[key] = rows
    while len(_GOLD_ROWS) > _GOLD_CACHE_SIZE:
        _GOLD_ROWS.popitem(last=False)
    return rows


# ---------------------------------------------------------------------------------------------
# the reward
# ---------------------------------------------------------------------------------------------
@register_reward("sql", parallel=True)
def sql_reward(completion: str, sample: Any, *, gold_key: str = "gold_sql", db_path_key: str = "db_path",
               schema_key: str = "db_schema", db_root: Optional[str] = None, partial: bool = True,
               weights: Optional[dict] = None, ngram: int = 2, query_timeout_s: float = 3.0,
               max_rows: int = 10_000, max_result_bytes: int = 50_000_000, float_digits: int = 6) -> Scored:
    """Execution reward for a generated SQLite query (see the module docstring for the components).

    The gold query is ``sample.metadata[gold_key]`` if present, else ``sample.answer``; the database
    is the file ``sample.metadata[db_path_key]`` (relative to ``db_root`` when given), opened
    read-only, or an in-memory database built from the script ``sample.metadata[schema_key]``.
    Results are compared as multisets of rows unless the gold query has a top-level ``ORDER BY``.

    Score: 1.0 on a match (``ok``); otherwise, with ``partial``,
    ``w_executable * executable + w_schema * schema_jaccard + w_ngram * ngram_jaccard`` (``weights``
    overrides :data:`DEFAULT_WEIGHTS`), else 0. A refused query (write, ATTACH, PRAGMA, two
    statements) and a missing query score 0. Statuses: ``ok``, ``wrong_result``, ``syntax_error``
    (any SQLite error), ``timeout``, ``too_large``, ``refused``, ``no_query``. A failing gold
    query or a missing database raises (a data problem, counted as a failure of the reward).
    """
    w = dict(DEFAULT_WEIGHTS)
    if weights:
        unknown = set(weights) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"sql: unknown weights {sorted(unknown)}; valid: {sorted(DEFAULT_WEIGHTS)}")
        w.update({k: float(v) for k, v in weights.items()})
    if query_timeout_s <= 0 or max_rows < 1 or max_result_bytes < 1:
        raise ValueError(f"sql: query_timeout_s, max_rows and max_result_bytes must be > 0, got "
                         f"{query_timeout_s}, {max_rows}, {max_result_bytes}")
    meta = getattr(sample, "metadata", None) or {}
    gold = meta.get(gold_key) or getattr(sample, "answer", None)
    if not isinstance(gold, str) or not gold.strip():
        raise ValueError(f"sql: sample {getattr(sample, 'uid', '?')!r} has no gold query "
                         f"(metadata[{gold_key!r}] or answer)")
    gold = gold.strip().rstrip(";").strip()

    query = extract_sql(completion)
    if query is None:
        return Scored(0.0, {"status": "no_query"})

    db_key, conn, names = _database(sample, db_path_key, schema_key, db_root)
    limits = {"timeout_s": query_timeout_s, "max_rows": max_rows, "max_result_bytes": max_result_bytes}
    try:
        gold_rows = _gold_rows(db_key, conn, gold, limits)
    except (SQLRefused, SQLTimeout, SQLTooLarge, sqlite3.Error) as exc:
        raise ValueError(f"sql: the gold query of sample {getattr(sample, 'uid', '?')!r} failed "
                         f"({type(exc).__name__}: {exc}): {gold[:200]!r}") from None

    info: dict[str, Any] = {"query": query[:200]}
    executable = 0.0
    try:
        rows = run_query(conn, query, **limits)
        executable = 1.0
        if results_match(rows, gold_rows, has_top_level_order_by(gold), float_digits):
            return Scored(1.0, {**info, "status": "ok"})
        status = "wrong_result"
    except SQLRefused as exc:
        return Scored(0.0, {**info, "status": "refused", "error": str(exc)[:200]})
    except SQLTimeout:
        status = "timeout"
    except SQLTooLarge as exc:
        status, executable = "too_large", 1.0
        info["error"] = str(exc)[:200]
    except sqlite3.Error as exc:
        status = "syntax_error"
        info["error"] = str(exc)[:200]
    if not partial:
        return Scored(0.0, {**info, "status": status})
    schema = jaccard(schema_items(query, names), schema_items(gold, names))
    grams = ngram_similarity(query, gold, ngram)
    score = w["executable"] * executable + w["schema"] * schema + w["ngram"] * grams
    return Scored(score, {**info, "status": status, "executable": executable,
                          "schema_jaccard": schema, "ngram_jaccard": grams})
