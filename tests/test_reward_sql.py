"""The SQL execution reward: extraction, result matching, partial credit, and safety."""

from __future__ import annotations

import hashlib
import sqlite3
import time

import pytest

from postrl.config import RewardSpec, ScoringConfig
from postrl.data.sources import Sample
from postrl.rewards import RewardPipeline
from postrl.rewards.sql import (
    SQLRefused,
    extract_sql,
    has_top_level_order_by,
    jaccard,
    ngram_similarity,
    open_from_script,
    results_match,
    run_query,
    schema_items,
    sql_reward,
    sql_tokens,
)

SCHEMA = """
CREATE TABLE emp(id INTEGER PRIMARY KEY, name TEXT, dept TEXT, salary REAL);
INSERT INTO emp VALUES (1, 'ann', 'eng', 100.0), (2, 'bob', 'eng', 80.5), (3, 'cy', 'ops', 70);
CREATE TABLE dept(code TEXT, title TEXT);
INSERT INTO dept VALUES ('eng', 'Engineering'), ('ops', 'Operations');
"""
GOLD = "SELECT name FROM emp WHERE dept = 'eng'"


def S(gold=GOLD, **metadata):
    metadata.setdefault("db_schema", SCHEMA)
    return Sample(question="names in eng?", answer=gold, metadata=metadata, uid="s1")


@pytest.fixture
def db_file(tmp_path):
    path = tmp_path / "company.db"
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA)
    conn.commit()
    conn.close()
    return path


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----- pure helpers --------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("```sql\nSELECT 1;\n```", "SELECT 1"),
    ("draft ```sql\nSELECT 1\n``` final ```SQL\nSELECT 2\n```", "SELECT 2"),  # the last sql block
    ("```\nSELECT 3\n```", "SELECT 3"),  # an unlabelled block
    ("<think>```sql\nSELECT 1\n```</think><answer>```sql\nSELECT 4\n```</answer>", "SELECT 4"),
    ("<answer>SELECT 5;</answer>", "SELECT 5"),
    ("  SELECT 6 ;  ", "SELECT 6"),
    ("", None), ("   ", None), ("```sql\n```", None),
])
def test_extract_sql(text, expected):
    assert extract_sql(text) == expected


def test_tokens_jaccard_and_ngrams_by_hand():
    assert sql_tokens('SELECT "Name", [dept] FROM emp -- note\nWHERE x >= \'A b\'') == \
        ["select", "name", ",", "dept", "from", "emp", "where", "x", ">=", "'A b'"]
    assert jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3)
    assert jaccard(set(), set()) == 1.0
    # bigrams of "select a from t" = {select a, a from, from t}; of "select b from t" = {select b, b from, from t}
    assert ngram_similarity("SELECT a FROM t", "select b from t") == pytest.approx(1 / 5)
    assert ngram_similarity("SELECT a FROM t", "SELECT a FROM t", n=3) == 1.0
    assert ngram_similarity("x", "x") == 1.0  # shorter than n: the token tuple is one gram
    with pytest.raises(ValueError, match="n must be >= 1"):
        ngram_similarity("a", "b", n=0)
    names = {"emp", "name", "dept", "salary"}
    assert schema_items("SELECT name, 'dept' FROM emp WHERE foo = 1", names) == {"name", "emp"}


@pytest.mark.parametrize("sql, expected", [
    ("SELECT a FROM t ORDER BY a", True),
    ("select a from t order   by a desc limit 1", True),
    ("SELECT a FROM (SELECT a FROM t ORDER BY a) LIMIT 2", False),  # only inside a subquery
    ("SELECT 'order by' FROM t", False),  # inside a string
    ("SELECT a FROM t", False),
])
def test_has_top_level_order_by(sql, expected):
    assert has_top_level_order_by(sql) == expected


def test_results_match():
    assert results_match([(1, "a"), (2, "b")], [(2, "b"), (1, "a")], ordered=False)
    assert not results_match([(1, "a"), (2, "b")], [(2, "b"), (1, "a")], ordered=True)
    assert not results_match([(1,), (1,)], [(1,)], ordered=False)  # duplicates count
    assert not results_match([("a", 1)], [(1, "a")], ordered=False)  # column order counts
    assert results_match([(3.0,), (0.1 + 0.2,)], [(3,), (0.3,)], ordered=False)  # floats rounded
    assert not results_match([(0.31,)], [(0.3,)], ordered=False)


# ----- the reward ----------------------------------------------------------------------------------
def test_correct_queries_in_other_forms_score_one():
    for text in ["```sql\nSELECT name FROM emp WHERE dept='eng' ORDER BY name DESC;\n```",
                 "<answer>select e.name from emp e join dept d on d.code = e.dept where d.title like 'Eng%'</answer>",
                 "SELECT name FROM emp WHERE salary > 75"]:
        r = sql_reward(text, S())
        assert (r.score, r.info["status"]) == (1.0, "ok"), text


def test_gold_order_by_makes_order_matter():
    gold = "SELECT name FROM emp ORDER BY salary DESC"
    assert sql_reward("SELECT name FROM emp ORDER BY salary DESC", S(gold)).score == 1.0
    r = sql_reward("SELECT name FROM emp ORDER BY salary", S(gold))
    assert r.info["status"] == "wrong_result"


def test_partial_credit_by_hand():
    # pred: "SELECT name FROM emp" runs (executable = 1) but returns 3 rows instead of 2.
    # schema items: pred {name, emp}, gold {name, emp, dept} -> Jaccard 2/3.
    # bigrams: pred {select name, name from, from emp}; gold adds {emp where, where dept, dept =, = 'eng'}
    # -> 3/7.  Score = 0.1 * 1 + 0.2 * 2/3 + 0.1 * 3/7.
    r = sql_reward("SELECT name FROM emp", S())
    assert r.info["status"] == "wrong_result"
    assert r.info["schema_jaccard"] == pytest.approx(2 / 3) and r.info["ngram_jaccard"] == pytest.approx(3 / 7)
    assert r.score == pytest.approx(0.1 + 0.2 * 2 / 3 + 0.1 * 3 / 7)
    r = sql_reward("SELECT name FROM emp", S(), weights={"executable": 0.5, "schema": 0.0, "ngram": 0.0})
    assert r.score == pytest.approx(0.5)
    assert sql_reward("SELECT name FROM emp", S(), partial=False).score == 0.0
    # a syntax error keeps the textual components but not the executable one
    r = sql_reward("SELEC name FROM emp WHERE dept = 'eng'", S())
    assert r.info["status"] == "syntax_error" and r.info["executable"] == 0.0
    # schema items equal (Jaccard 1); bigrams: 7 each, 6 shared ("selec name" vs "select name"), union 8
    assert r.info["ngram_jaccard"] == pytest.approx(6 / 8)
    assert r.score == pytest.approx(0.2 * 1.0 + 0.1 * 6 / 8)


def test_malformed_completions():
    for text in ["", "   ", "<answer></answer>"]:
        r = sql_reward(text, S())
        assert (r.score, r.info["status"]) == (0.0, "no_query")
    garbage = "\x00\ufffd\U0001f4a5\u202e" * 50
    r = sql_reward(garbage, S())
    assert r.score == 0.0 and r.info["status"] == "syntax_error"
    r = sql_reward("I think the answer is the list of names.", S())
    assert r.info["status"] == "syntax_error" and r.info["executable"] == 0.0
    assert 0.0 <= r.score < 0.1  # only textual partial credit (a shared bigram or schema item at most)
    long_query = "SELECT name FROM emp WHERE " + " OR ".join(["dept = 'eng'"] * 100_000)  # ~1.5 MB
    r = sql_reward(long_query, S())
    assert (r.score, r.info["status"]) == (0.0, "refused")


@pytest.mark.parametrize("query", [
    "DROP TABLE emp",
    "DELETE FROM emp",
    "UPDATE emp SET salary = 0",
    "INSERT INTO emp VALUES (9, 'eve', 'eng', 1)",
    "CREATE TABLE x(a)",
    "CREATE TEMP TABLE x(a)",
    "ALTER TABLE emp ADD COLUMN y",
    "ATTACH DATABASE '/tmp/postrl_sql_attack.db' AS x",
    "PRAGMA query_only = 0",
    "PRAGMA writable_schema = 1",
    "SELECT 1; DROP TABLE emp",
    "SELECT name FROM emp; DELETE FROM emp",
    "VACUUM INTO '/tmp/postrl_sql_attack.db'",
    "BEGIN",
    "REINDEX",
    "SELECT load_extension('/tmp/evil.so')",
    "WITH x AS (SELECT 1) DELETE FROM emp",
])
def test_writes_attach_pragma_and_multiple_statements_are_refused(query, db_file, tmp_path):
    before = _digest(db_file)
    for sample in (S(), S(db_path=str(db_file), db_schema=None)):
        r = sql_reward(query, sample)
        assert (r.score, r.info["status"]) == (0.0, "refused"), (query, r.info)
    assert _digest(db_file) == before
    assert not (tmp_path / "postrl_sql_attack.db").exists()
    # the data is intact: the gold still returns its rows
    assert sql_reward(GOLD, S(db_path=str(db_file))).score == 1.0


def test_file_database_is_read_only_and_relative_to_db_root(db_file):
    before = _digest(db_file)
    sample = S(db_path=db_file.name, db_schema=None)
    assert sql_reward(GOLD, sample, db_root=str(db_file.parent)).score == 1.0
    assert _digest(db_file) == before
    with pytest.raises(FileNotFoundError, match="not found"):
        sql_reward(GOLD, S(db_path="/nonexistent/x.db", db_schema=None))


def test_runaway_query_is_stopped_by_the_time_limit():
    runaway = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    t = time.perf_counter()
    r = sql_reward(runaway, S(), query_timeout_s=0.3)
    elapsed = time.perf_counter() - t
    assert (r.score, r.info["status"]) == (0.0, "timeout")  # no shared schema items or bigrams
    assert elapsed < 3.0
    # a cross join that is merely slow also stops
    slow = "SELECT count(*) FROM " + ", ".join(f"emp t{i}" for i in range(16))  # 3^16 rows
    assert sql_reward(slow, S(), query_timeout_s=0.3).info["status"] == "timeout"


def test_result_caps():
    rows = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c"
    r = sql_reward(rows, S(), max_rows=100)
    assert r.info["status"] == "too_large" and r.info["executable"] == 1.0
    big = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 50) SELECT randomblob(900000) FROM c"
    assert sql_reward(big, S(), max_result_bytes=10_000_000).info["status"] == "too_large"
    assert sql_reward("SELECT zeroblob(100000000)", S()).info["status"] == "syntax_error"  # over the 1 MB value cap


def test_gold_sources_and_data_errors():
    sample = S(gold="ignored", gold_sql="SELECT title FROM dept")
    assert sql_reward("SELECT title FROM dept ORDER BY 1 DESC", sample).score == 1.0
    with pytest.raises(ValueError, match="gold query of sample 's1' failed"):
        sql_reward("SELECT 1", S(gold="SELECT nope FROM emp"))
    with pytest.raises(ValueError, match="no gold query"):
        sql_reward("SELECT 1", S(gold=""))
    with pytest.raises(ValueError, match="has no database"):
        sql_reward("SELECT 1", Sample("q", GOLD, metadata={}, uid="s2"))
    with pytest.raises(ValueError, match="db_schema script failed"):
        sql_reward("SELECT 1", S(db_schema="CREATE TABLE ("))
    with pytest.raises(ValueError, match="unknown weights"):
        sql_reward("SELECT 1", S(), weights={"judge": 1.0})


def test_run_query_directly():
    conn = open_from_script(SCHEMA)
    assert run_query(conn, "SELECT count(*) FROM emp") == [(3,)]
    with pytest.raises(SQLRefused):
        run_query(conn, "DELETE FROM emp")
    with pytest.raises(sqlite3.OperationalError):
        run_query(conn, "SELECT nope FROM emp")
    assert run_query(conn, "VALUES (1), (2)") == [(1,), (2,)]
    conn.close()


def test_sql_through_the_pipeline_counts_statuses():
    pipe = RewardPipeline([RewardSpec("sql")], scoring=ScoringConfig(workers=0))
    res = pipe([GOLD, "SELECT name FROM emp", "DROP TABLE emp", "", "SELECT nope FROM emp"], [S()] * 5)
    assert res.components["sql"][0] == 1.0 and res.components["sql"][2] == 0.0
    assert res.statuses == {("sql", "ok"): 1, ("sql", "wrong_result"): 1, ("sql", "refused"): 1,
                            ("sql", "no_query"): 1, ("sql", "syntax_error"): 1}
    assert not res.errors


def test_yaml_style_config_reaches_the_reward():
    import yaml

    from postrl.config import Config, from_dict

    cfg = from_dict(Config, yaml.safe_load("""
rewards:
  - {name: sql, weight: 1.0, timeout_s: 15, query_timeout_s: 1, weights: {executable: 0.5, schema: 0, ngram: 0}}
  - {name: format, weight: 0.1, kwargs: {partial: true}}
"""))
    assert cfg.rewards[0].timeout_s == 15 and cfg.rewards[0].kwargs["weights"]["executable"] == 0.5
    pipe = RewardPipeline(cfg.rewards, scoring=ScoringConfig(workers=0))
    res = pipe(["<think>t</think> SELECT name FROM emp"], [S()])  # the whole text is not a query
    assert res.components["sql"] == [0.0] and res.statuses[("sql", "syntax_error")] == 1
    assert res.components["format"] == [pytest.approx(0.5 * 2 / 4)]  # partial: <think>, </think>
    res = pipe(["```sql\nSELECT name FROM emp\n```"], [S()])
    assert res.components["sql"] == [pytest.approx(0.5)]  # executable only, with the YAML weights
    assert res.components["format"] == [0.0]
    assert res.total == [pytest.approx(0.5)]
