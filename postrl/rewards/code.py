"""Code reward: run the completion's Python against the sample's test cases, in the sandbox.

Registered as ``code`` (a batched class; see :mod:`postrl.rewards.base`)::

    rewards:
      - {name: code, weight: 1.0, kwargs: {mode: fraction, timeout_s: 2}}

1. **Extract** the program (:func:`extract_code`, ``extract:``): ``auto`` takes the last
   ```` ```python ```` (``py``, ``python3``) fenced block, else the last untagged fenced block, else
   the whole text; ``python_block`` / ``any_block`` accept only a fenced block; ``raw`` takes
   the whole text. A block left open at the end (a truncated generation) counts as closed.
   With ``template:`` (e.g. ``"print({code})"``) the program is the template with ``{code}``
   replaced by the extracted text (:func:`apply_template`): for tasks whose completion is an
   expression or a function body rather than a whole program.
2. **Compile** it on the trainer with :func:`compile` (nothing runs): a syntax error is
   ``compile_error`` without starting the sandbox.
3. **Test** it in :class:`postrl.rewards.sandbox.Sandbox`, one fresh process per test case,
   all test cases of one completion in one sandbox call (one namespace set-up):

   * stdin/stdout tests: the program gets ``input`` on stdin; its stdout must equal ``output``
     after whitespace normalization (:func:`outputs_match`, ``compare:``);
   * assert tests: Python statements (``assert f(2) == 4``, or any test code such as HumanEval's
     ``def check(candidate): ...`` + ``check(f)``) run in a separate checker process against the
     program (a test run of the sandbox: :meth:`Sandbox.run_test`): the program's names are looked
     up, called and read over a pipe, only plain data comes back, and the comparisons run in the
     checker. The test passes only when the checker saw it pass: a program that exits early, hooks
     exits, exceptions or signals, monkeypatches builtins or the harness, or returns objects whose
     ``__eq__`` always says yes gains nothing (docs/sandbox.md, *Reward hacking*).

The reward is the fraction of tests passed (``mode: fraction``, default) or 1/0 for all tests
passed or not (``mode: all``, which stops at the first failure). ``Scored.info["status"]`` says
why: ``ok`` (all passed), ``wrong_answer``, ``compile_error``, ``runtime_error`` (exception,
non-zero exit, killed by a signal, output over the cap), ``timeout`` (some test hit the time
limit), ``no_code`` (nothing to run), ``no_tests`` (the sample has no test cases). When a test
times out the remaining ones are skipped (counted failed) unless ``stop_after_timeout: false``.

Test cases come from ``sample.metadata``: ``tests`` (a list of ``{"input": str, "output": str}``
dicts and/or assert strings), ``input_output`` (APPS style: ``{"inputs": [...], "outputs": [...]}``,
or that as a JSON string), ``test_list`` / ``asserts`` (MBPP style assert strings, with the
optional ``test_setup_code`` run before them). A sample whose tests are malformed gets ``None``
(a counted reward failure) and a warning naming what is wrong.

If the host cannot isolate code, constructing the reward raises
:class:`postrl.rewards.sandbox.SandboxUnavailable` (fail closed) unless ``allow_unsafe: true``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from postrl.rewards import register_reward
from postrl.rewards.base import RewardBatch, Scored
from postrl.rewards.sandbox import RunResult, Sandbox, SandboxLimits

log = logging.getLogger(__name__)

CODE_STATUSES = ("ok", "wrong_answer", "compile_error", "runtime_error", "timeout", "no_code", "no_tests")
EXTRACT_MODES = ("auto", "python_block", "any_block", "raw")
COMPARE_MODES = ("lines", "tokens", "exact")
SCORE_MODES = ("fraction", "all")
TEMPLATE_FIELD = "{code}"

_INFO_CHARS = 300
_PY_TAGS = {"python", "py", "python3", "py3"}
# an opening fence with its tag, then everything up to a closing fence on its own or the end of text
_FENCE_RE = re.compile(r"^[ \t]*```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)(?:^[ \t]*```[ \t]*$|\Z)",
                       re.DOTALL | re.MULTILINE)


# -------------------------------------------------------------------------------------------------
# pure helpers
# -------------------------------------------------------------------------------------------------
def extract_code(text: Any, mode: str = "auto") -> Optional[str]:
    """The program in a completion, or None when there is none (see the module docstring)."""
    if mode not in EXTRACT_MODES:
        raise ValueError(f"extract={mode!r} is not valid; valid: {', '.join(EXTRACT_MODES)}")
    if not isinstance(text, str):
        return None
    if mode == "raw":
        code = text
    else:
        blocks = [(tag.lower(), body) for tag, body in _FENCE_RE.findall(text)]
        python = [b for t, b in blocks if t in _PY_TAGS]
        untagged = [b for t, b in blocks if not t]
        if mode == "python_block":
            pick = python
        elif mode == "any_block":
            pick = [b for _, b in blocks]
        else:
            pick = python or untagged
        if pick:
            code = pick[-1]
        elif mode == "auto" and not blocks:
            code = text
        else:
            return None
    code = code.strip("\n")
    return code if code.strip() else None


def apply_template(code: str, template: Optional[str]) -> str:
    """The program to run: ``template`` with every ``{code}`` replaced by ``code`` (None: ``code``).

    Plain text substitution, not ``str.format``: other braces in the template stay as written.
    """
    return code if template is None else template.replace(TEMPLATE_FIELD, code)


def check_syntax(code: str) -> Optional[str]:
    """None when ``code`` compiles, else the compiler's message (nothing is executed)."""
    try:
        compile(code, "main.py", "exec", dont_inherit=True)
    except SyntaxError as exc:
        return f"{type(exc).__name__}: {exc.msg} (line {exc.lineno})"
    except (ValueError, RecursionError, MemoryError, OverflowError) as exc:  # null bytes, deep nesting
        return f"{type(exc).__name__}: {exc}"
    return None


def normalize_output(text: str, compare: str = "lines") -> Any:
    """Output in comparable form: ``lines`` -> the lines with runs of whitespace collapsed to one
    space and leading/trailing blank lines dropped; ``tokens`` -> all whitespace-separated tokens;
    ``exact`` -> the text unchanged."""
    if compare not in COMPARE_MODES:
        raise ValueError(f"compare={compare!r} is not valid; valid: {', '.join(COMPARE_MODES)}")
    if compare == "exact":
        return text
    if compare == "tokens":
        return text.split()
    lines = [" ".join(line.split()) for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    while lines and not lines[0]:
        lines.pop(0)
    return lines


def outputs_match(got: str, expected: str, compare: str = "lines") -> bool:
    """Whether a program's stdout equals the expected output under ``compare``."""
    return normalize_output(got, compare) == normalize_output(expected, compare)


def _as_text(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value) + ("\n" if value else "")
    raise ValueError(f"{what} must be a string (or a list of lines), got {type(value).__name__}")


def collect_tests(metadata: Any) -> tuple[list[tuple[str, str]], list[str], str]:
    """``(io_tests, asserts, setup)`` from a sample's metadata (formats in the module docstring).

    io_tests: ``(stdin, expected stdout)`` pairs; asserts: Python statements; setup: code run
    before the asserts. Raises ValueError naming the malformed field.
    """
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise ValueError(f"sample metadata must be a dict, got {type(metadata).__name__}")
    io_tests: list[tuple[str, str]] = []
    asserts: list[str] = []
    tests = metadata.get("tests")
    if tests is not None:
        if isinstance(tests, str):
            tests = json.loads(tests)
        if not isinstance(tests, list):
            raise ValueError(f"metadata['tests'] must be a list of {{'input','output'}} dicts or assert "
                             f"strings, got {type(tests).__name__}")
        for i, t in enumerate(tests):
            if isinstance(t, str):
                asserts.append(t)
            elif isinstance(t, dict) and "output" in t:
                io_tests.append((_as_text(t.get("input", ""), f"metadata['tests'][{i}]['input']"),
                                 _as_text(t["output"], f"metadata['tests'][{i}]['output']")))
            else:
                raise ValueError(f"metadata['tests'][{i}] must be an assert string or a dict with 'input' and "
                                 f"'output', got {t!r:.100}")
    io = metadata.get("input_output")
    if io is not None:
        if isinstance(io, str):
            io = json.loads(io)
        if not isinstance(io, dict) or not isinstance(io.get("inputs"), list) or \
                not isinstance(io.get("outputs"), list) or len(io["inputs"]) != len(io["outputs"]):
            raise ValueError("metadata['input_output'] must be {'inputs': [...], 'outputs': [...]} of equal length")
        for i, (a, b) in enumerate(zip(io["inputs"], io["outputs"])):
            io_tests.append((_as_text(a, f"input_output inputs[{i}]"), _as_text(b, f"input_output outputs[{i}]")))
    for key in ("test_list", "asserts"):
        lst = metadata.get(key)
        if lst is None:
            continue
        if not isinstance(lst, list) or not all(isinstance(a, str) for a in lst):
            raise ValueError(f"metadata[{key!r}] must be a list of assert strings")
        asserts.extend(lst)
    setup = metadata.get("test_setup_code") or ""
    if not isinstance(setup, str):
        raise ValueError("metadata['test_setup_code'] must be a string")
    return io_tests, asserts, setup


def _test_outcome(result: RunResult, expected: Optional[str], compare: str) -> str:
    """``pass`` or the failure kind of one test (``expected`` None: an assert test, a test run of
    the sandbox whose verdict comes from its checker process)."""
    if result.status == "skipped":
        return "skipped"
    if result.status == "timeout":
        return "timeout"
    if expected is None:
        if result.status == "ok" and result.verdict == "pass":
            return "pass"
        return "wrong_answer" if result.verdict == "assert" and result.status == "error" else "runtime_error"
    if result.status == "ok":
        return "pass" if outputs_match(result.stdout, expected, compare) else "wrong_answer"
    return "runtime_error"


def _error_text(result: RunResult) -> str:
    """What to show for a failed test: the checker's message, then the program's stderr."""
    parts = [result.info.get("check", ""), result.stderr.strip()] if result.verdict else [result.stderr]
    return "\n".join(p for p in parts if p)


def score_tests(outcomes: list[str], mode: str = "fraction") -> float:
    """The reward from per-test outcomes: the fraction that are ``pass`` (``fraction``) or 1.0
    when all pass, else 0.0 (``all``); 0.0 for no tests."""
    if mode not in SCORE_MODES:
        raise ValueError(f"mode={mode!r} is not valid; valid: {', '.join(SCORE_MODES)}")
    if not outcomes:
        return 0.0
    passed = sum(o == "pass" for o in outcomes)
    if mode == "all":
        return 1.0 if passed == len(outcomes) else 0.0
    return passed / len(outcomes)


def overall_status(outcomes: list[str]) -> str:
    """One status for a completion: ``ok`` if all passed, else ``timeout`` > ``runtime_error`` >
    ``wrong_answer`` by precedence (skipped tests do not count)."""
    if outcomes and all(o == "pass" for o in outcomes):
        return "ok"
    for kind in ("timeout", "runtime_error", "wrong_answer"):
        if kind in outcomes:
            return kind
    return "wrong_answer"


# -------------------------------------------------------------------------------------------------
# the reward
# -------------------------------------------------------------------------------------------------
@register_reward("code", batched=True)
class CodeReward:
    """Batched code-execution reward (see the module docstring for kwargs and statuses).

    kwargs: ``mode`` (fraction | all), ``timeout_s`` (per test), ``memory_mb`` (per test, all its
    processes together), ``max_processes``, ``extract``,
    ``compare``, ``workers`` (concurrent sandbox calls; default: CPU count), ``allow_unsafe``,
    ``max_code_chars``, ``max_output_bytes``, ``stop_after_timeout``, ``template`` (a program with
    ``{code}`` where the extracted code goes; default: none, the code is the program).
    """

    def __init__(self, context: Any = None, *, mode: str = "fraction", timeout_s: float = 2.0,
                 memory_mb: int = 512, extract: str = "auto", compare: str = "lines",
                 workers: Optional[int] = None, allow_unsafe: bool = False, max_code_chars: int = 100_000,
                 max_output_bytes: int = 1 << 20, stop_after_timeout: bool = True,
                 template: Optional[str] = None, max_processes: int = 4):
        errors = []
        if template is not None and (not isinstance(template, str) or TEMPLATE_FIELD not in template):
            errors.append(f"template={template!r:.80} (must be a string containing {TEMPLATE_FIELD}, "
                          f"e.g. 'print({TEMPLATE_FIELD})', or null)")
        if mode not in SCORE_MODES:
            errors.append(f"mode={mode!r} (valid: {', '.join(SCORE_MODES)})")
        if extract not in EXTRACT_MODES:
            errors.append(f"extract={extract!r} (valid: {', '.join(EXTRACT_MODES)})")
        if compare not in COMPARE_MODES:
            errors.append(f"compare={compare!r} (valid: {', '.join(COMPARE_MODES)})")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            errors.append(f"workers={workers!r} (must be an int >= 1 or null)")
        if isinstance(max_code_chars, bool) or not isinstance(max_code_chars, int) or max_code_chars < 1:
            errors.append(f"max_code_chars={max_code_chars!r} (must be an int >= 1)")
        if not isinstance(allow_unsafe, bool):
            errors.append(f"allow_unsafe={allow_unsafe!r} (must be true or false)")
        if errors:
            raise ValueError("code reward: invalid " + "; ".join(errors))
        self.mode, self.extract, self.compare, self.template = mode, extract, compare, template
        self.max_code_chars = max_code_chars
        self.stop_after_timeout = bool(stop_after_timeout)
        self.workers = workers or max(1, os.cpu_count() or 1)
        self.sandbox = Sandbox(SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb, max_processes=max_processes,
                                             max_output_bytes=max_output_bytes), allow_unsafe=allow_unsafe)
        self._pool: Optional[ThreadPoolExecutor] = None
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def score_one(self, completion: Any, sample: Any) -> Optional[Scored]:
        """Score one completion against its sample's tests (None: the sample's tests are malformed
        or the sandbox failed, a counted reward failure)."""
        return self._score_code(extract_code(completion, self.extract), sample, self._tests(sample))

    @staticmethod
    def _tests(sample: Any):
        """The sample's parsed tests ``(io_tests, asserts, setup)``, or the ValueError that says why not."""
        metadata = sample.get("metadata") if isinstance(sample, dict) else getattr(sample, "metadata", None)
        try:
            return collect_tests(metadata)
        except ValueError as exc:
            return exc

    def _score_code(self, code: Optional[str], sample: Any, tests) -> Optional[Scored]:
        if isinstance(tests, ValueError):
            self._warn(f"sample {getattr(sample, 'uid', '')!r}: {tests}")
            return None
        io_tests, asserts, setup = tests
        if code is None:
            return Scored(0.0, {"status": "no_code"})
        code = apply_template(code, self.template)
        total = len(io_tests) + len(asserts)
        if len(code) > self.max_code_chars:
            return Scored(0.0, {"status": "compile_error", "passed": 0, "total": total,
                                "error": f"the code has {len(code)} characters, more than max_code_chars="
                                         f"{self.max_code_chars}"})
        error = check_syntax(code)
        if error is not None:
            return Scored(0.0, {"status": "compile_error", "passed": 0, "total": total, "error": error[:_INFO_CHARS]})
        if total == 0:
            return Scored(0.0, {"status": "no_tests"})
        runs: list = [(code, stdin) for stdin, _ in io_tests]
        runs += [{"code": code, "test": a, "setup": setup} for a in asserts]
        results = self.sandbox.run_many(runs, stop_on_failure=self.mode == "all",
                                        stop_after_timeout=self.stop_after_timeout)
        if any(r.status == "sandbox_error" for r in results):
            self._warn(f"sandbox failure: {results[0].stderr[:500]}")
            return None
        expected = [out for _, out in io_tests] + [None] * len(asserts)
        outcomes = [_test_outcome(r, e, self.compare) for r, e in zip(results, expected)]
        status = overall_status(outcomes)
        info: dict = {"status": status, "passed": outcomes.count("pass"), "total": total}
        failed = next((r for r, o in zip(results, outcomes) if o not in ("pass", "skipped")), None)
        if failed is not None and _error_text(failed):
            info["error"] = _error_text(failed)[-_INFO_CHARS:]
        return Scored(score_tests(outcomes, self.mode), info)

    def __call__(self, batch: RewardBatch) -> list[Optional[Scored]]:
        """Score a batch; identical (completion code, tests) pairs are run once. The code is extracted once
        per completion, a sample's tests are parsed once however many completions it has (a group)."""
        tests: dict[int, Any] = {}  # id(sample) -> parsed tests
        keys, unique = [], {}
        for text, sample in zip(batch.completions, batch.samples):
            if id(sample) not in tests:
                tests[id(sample)] = self._tests(sample)
            code = extract_code(text, self.extract)
            key = (code, id(sample))
            keys.append(key)
            unique.setdefault(key, (code, sample))
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="code-reward")
        futures = {k: self._pool.submit(self._score_code, c, s, tests[id(s)]) for k, (c, s) in unique.items()}
        done = {k: f.result() for k, f in futures.items()}
        return [done[k] for k in keys]

    def _warn(self, message: str) -> None:
        if message not in self._warned and len(self._warned) < 100:
            self._warned.add(message)
            log.warning("code reward: %s", message)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
