"""Reward hacking against the ``sql`` reward: statements that write, attach other databases, read outside
the given database or the process, exhaust time or memory, or return more rows than asked. Each scores
no more than the honest wrong query, and the database file is never changed (docs/rewards-builtin.md).

Partial credit (``partial: true``) rewards textual similarity to the gold query by design (Reasoning-SQL's
schema and n-gram rewards), so a wrong query that copies more of the gold's words gets more of it; that
cannot be defended in principle and is capped at 0.4. The attacks that use it are checked with
``partial: false``, the documented mitigation.
"""

from __future__ import annotations

import hashlib
import sqlite3

import pytest

from postrl.data.sources import Sample
from postrl.rewards.sql import sql_reward

SCHEMA = """
CREATE TABLE emp(id INTEGER PRIMARY KEY, name TEXT, dept TEXT, salary REAL);
INSERT INTO emp VALUES (1, 'ann', 'eng', 100.0), (2, 'bob', 'eng', 80.5), (3, 'cy', 'ops', 70);
"""
GOLD = "SELECT name FROM emp WHERE dept = 'eng'"
HONEST_WRONG = "SELECT name FROM emp WHERE dept = 'ops'"


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "company.db"
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA)
    conn.commit()
    conn.close()
    (tmp_path / "secret.db").write_bytes(path.read_bytes())
    return path


def score(query, db, **kw):
    return sql_reward(f"```sql\n{query}\n```", Sample("engineers?", GOLD, metadata={"db_path": str(db)}), **kw)


WRITE_OR_ESCAPE = {
    "drop": "DROP TABLE emp",
    "insert": "INSERT INTO emp VALUES (9, 'eve', 'eng', 1)",
    "update through a CTE": "WITH x AS (SELECT 1) UPDATE emp SET dept = 'eng'",
    "delete through a CTE": "WITH x AS (SELECT 1) DELETE FROM emp WHERE dept = 'ops'",
    "second statement": f"{GOLD}; DROP TABLE emp",
    "attach another database": "ATTACH DATABASE 'secret.db' AS s",
    "attach in memory": "ATTACH ':memory:' AS m",
    "vacuum into a file": "VACUUM INTO '/tmp/postrl-sql-attack.db'",
    "pragma": "PRAGMA writable_schema = 1",
    "pragma function: database list": "SELECT * FROM pragma_database_list",
    "pragma function: compile options": "SELECT * FROM pragma_compile_options",
    "load an extension": "SELECT load_extension('/tmp/x.so')",
    "read a file": "SELECT readfile('/etc/passwd')",
    "write a file": "SELECT writefile('/tmp/postrl-sql-attack', 'x')",
    "temp table": "CREATE TEMP TABLE t AS SELECT * FROM emp",
    "transaction": "BEGIN; DELETE FROM emp; COMMIT",
    "runaway recursion": "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) SELECT count(*) FROM r",
    "huge blob": "SELECT zeroblob(1000000000)",
    "huge cross join": "SELECT count(*) FROM emp a, emp b, emp c, emp d, emp e, emp f, emp g, emp h, emp i, emp j, "
                       "emp k, emp l, emp m, emp n, emp o, emp p",
}
SUPERSET = {  # more rows than asked: the gold rows are in there somewhere
    "every row": "SELECT name FROM emp",
    "gold plus the rest": f"{GOLD} UNION ALL SELECT name FROM emp WHERE dept != 'eng'",
    "every column": "SELECT * FROM emp WHERE dept = 'eng'",
    "gold twice": f"{GOLD} UNION ALL {GOLD}",
}


@pytest.mark.parametrize("name", list(WRITE_OR_ESCAPE))
def test_writes_and_escapes_score_no_more_than_the_honest_wrong_query(name, db):
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    baseline = score(HONEST_WRONG, db).score
    assert 0 < baseline < 1
    got = score(WRITE_OR_ESCAPE[name], db, query_timeout_s=1.0)
    assert got.score <= baseline and got.info["status"] != "ok", (name, got)
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert score(GOLD, db).score == 1.0  # the database still answers the gold query


@pytest.mark.parametrize("name", list(SUPERSET))
def test_supersets_of_the_answer_do_not_pay(name, db):
    assert score(SUPERSET[name], db, partial=False).score == 0.0
    assert score(HONEST_WRONG, db, partial=False).score == 0.0
    assert score(SUPERSET[name], db).score <= 0.4  # partial credit: similarity, capped (module docstring)
