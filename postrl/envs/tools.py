"""Tools the model can call during an episode: Python functions with an OpenAI-format JSON schema.

A tool call is written in the Hermes / Qwen format that their chat templates document::

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "1234 * 5678"}}
    </tool_call>

:func:`parse_tool_calls` finds every such block in a model turn (a block left open at the end of the turn
counts too); :class:`ToolEnv` wraps any environment so that a turn with tool calls is answered with one
``tool`` message per call (the environment does not see it), and a turn without one goes to the environment.
A call with invalid JSON, an unknown tool name or arguments that do not fit the schema is answered with an
error message (``"Error: ..."``) and counted in ``info["tool_errors"]``; a tool that raises likewise. Nothing
a model writes crashes the episode.

Built-in tools (``env.tools: [calculator, ...]``):

==============  ========================================================================================
``calculator``  arithmetic on numbers (``+ - * / // % **``, parentheses) by walking the parsed expression
                (no ``eval``); exponents and result sizes are bounded
``python``      runs code in postrl's sandbox (:mod:`postrl.rewards.sandbox`), returns stdout / stderr
``sql``         one read-only query on a SQLite database (``db_path`` file or ``db_schema`` script), through
                the hardened connection of :mod:`postrl.rewards.sql`
``search``      BM25 retrieval (``bm25s``) over a local JSONL corpus, top ``k`` passages
==============  ========================================================================================

A new tool is a function with type annotations and a docstring (:meth:`Tool.from_function` derives the
schema), or a factory registered with :func:`register_tool` that returns a :class:`Tool`.
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import operator
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from postrl.algorithms.registry import Registry
from postrl.config import ConfigError

__all__ = ["TOOLS", "Tool", "ToolCall", "ToolEnv", "build_tools", "calculate", "format_tool_prompt",
           "parse_tool_calls", "register_tool"]

MAX_RESULT_CHARS = 2000


# --------------------------------------------------------------------------------------------- #
# Tools
# --------------------------------------------------------------------------------------------- #

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


def _json_type(tp: Any) -> Optional[str]:
    if get_origin(tp) is Union:  # Optional[X] -> X
        args = [a for a in get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else Any
    origin = get_origin(tp) or tp
    return _JSON_TYPES.get(origin)


def _type_ok(value: Any, kind: Optional[str]) -> bool:
    if kind is None:
        return True
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str)
    if kind == "array":
        return isinstance(value, list)
    if kind == "object":
        return isinstance(value, dict)
    return True


@dataclass
class Tool:
    """A callable with its JSON schema. ``parameters`` is a JSON-schema object (``properties``,
    ``required``); :meth:`call` checks arguments against it before calling ``fn(**arguments)``."""

    name: str
    fn: Callable[..., Any]
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    @property
    def schema(self) -> dict[str, Any]:
        """The OpenAI function-tool schema (what ``apply_chat_template(tools=...)`` takes)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    @classmethod
    def from_function(cls, fn: Callable[..., Any], name: Optional[str] = None,
                      description: Optional[str] = None) -> "Tool":
        """A tool from a plain function: parameters from its annotations (str, int, float, bool, list, dict;
        a parameter without default is required), description from the first paragraph of its docstring."""
        hints = get_type_hints(fn)
        props: dict[str, Any] = {}
        required = []
        for pname, p in inspect.signature(fn).parameters.items():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            kind = _json_type(hints.get(pname, Any))
            props[pname] = {"type": kind} if kind else {}
            if p.default is p.empty:
                required.append(pname)
        doc = inspect.getdoc(fn) or ""
        desc = description if description is not None else doc.split("\n\n")[0].replace("\n", " ").strip()
        return cls(name or fn.__name__, fn, desc, {"type": "object", "properties": props, "required": required})

    def check_arguments(self, arguments: Any) -> Optional[str]:
        """None when ``arguments`` fit the schema, else what is wrong."""
        if not isinstance(arguments, dict):
            return f"arguments must be a JSON object, got {type(arguments).__name__}"
        props = self.parameters.get("properties", {})
        missing = [k for k in self.parameters.get("required", []) if k not in arguments]
        if missing:
            return f"missing required argument(s) {', '.join(missing)} (parameters: {', '.join(props) or 'none'})"
        unknown = [k for k in arguments if k not in props]
        if unknown:
            return f"unknown argument(s) {', '.join(unknown)} (parameters: {', '.join(props) or 'none'})"
        for k, v in arguments.items():
            kind = props[k].get("type")
            if not _type_ok(v, kind):
                return f"argument {k!r} must be of type {kind}, got {type(v).__name__}"
        return None

    def call(self, arguments: dict[str, Any]) -> str:
        problem = self.check_arguments(arguments)
        if problem is not None:
            raise ValueError(problem)
        out = self.fn(**arguments)
        text = out if isinstance(out, str) else json.dumps(out, default=str)
        return text if len(text) <= MAX_RESULT_CHARS else text[:MAX_RESULT_CHARS] + "...[truncated]"


TOOLS = Registry("tool", "env.tools")


def register_tool(name: str) -> Callable:
    """Register a tool factory ``f(**kwargs) -> Tool`` (``env.tools: [{name: ..., kwarg: ...}]``)."""
    return TOOLS.register(name)


def build_tools(specs: list[Any]) -> list[Tool]:
    """Tools from config entries: a name, or ``{name: ..., **kwargs}``; ``module:function`` imports a
    function (made a tool with :meth:`Tool.from_function`) or a factory returning a :class:`Tool`."""
    import importlib

    tools = []
    for spec in specs:
        name, kwargs = (spec, {}) if isinstance(spec, str) else (spec["name"], {k: v for k, v in spec.items()
                                                                               if k != "name"})
        if ":" in name:
            module, _, attr = name.partition(":")
            try:
                obj = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as exc:
                raise ConfigError(f"env.tools: cannot import {attr!r} from {module!r} ({exc})") from None
            tool = obj(**kwargs) if kwargs else obj
            tools.append(tool if isinstance(tool, Tool) else Tool.from_function(tool))
            continue
        try:
            factory = TOOLS.get_fn(name)
        except KeyError as exc:
            raise ConfigError(exc.args[0]) from None
        try:
            tools.append(factory(**kwargs))
        except TypeError as exc:
            raise ConfigError(f"tool {name!r}: {exc}") from None
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise ConfigError(f"env.tools: tool names must be unique, got {names}")
    return tools


# --------------------------------------------------------------------------------------------- #
# Parsing tool calls (Hermes / Qwen format)
# --------------------------------------------------------------------------------------------- #

_CALL_RE = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)


@dataclass
class ToolCall:
    """One parsed call: ``name`` and ``arguments``, or ``error`` (why it could not be parsed) and ``raw``."""

    name: Optional[str]
    arguments: Optional[dict[str, Any]]
    error: Optional[str] = None
    raw: str = ""


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every ``<tool_call>{json}</tool_call>`` block of ``text`` in order (an unclosed last block counts).
    The JSON must be an object with a string ``name`` and an object ``arguments`` (``parameters`` is accepted
    as a synonym; a string holding a JSON object is decoded); otherwise the call carries an ``error``."""
    calls = []
    for m in _CALL_RE.finditer(text):
        raw = m.group(1).strip()
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            calls.append(ToolCall(None, None, f"invalid JSON in <tool_call>: {exc.msg} at position {exc.pos}", raw))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            calls.append(ToolCall(None, None, 'a tool call must be a JSON object {"name": ..., "arguments": {...}}',
                                  raw))
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        if not isinstance(args, dict):
            calls.append(ToolCall(obj["name"], None, "the tool call's arguments must be a JSON object", raw))
            continue
        calls.append(ToolCall(obj["name"], args, None, raw))
    return calls


def format_tool_prompt(tools: list[Tool]) -> str:
    """A plain-text description of the tools and the call format, for chat templates that do not render
    ``tools`` themselves (it goes into the system message)."""
    lines = ["You can call tools. To call one, write",
             '<tool_call>{"name": "<tool name>", "arguments": {<arguments as JSON>}}</tool_call>',
             "and wait for its result. Tools:"]
    for t in tools:
        lines.append(json.dumps(t.schema["function"]))
    return "\n".join(lines)


class ToolEnv:
    """Wraps an environment: tool calls in a turn are answered with ``tool`` messages; a turn without a tool
    call goes to the wrapped environment. ``tools`` (the :class:`Tool` list) is what the episode runner shows
    the model (through the chat template's ``tools``, or as system text when the template ignores them).

    Step info: ``tool_calls`` (calls answered), ``tool_errors`` (malformed calls, unknown tools, bad
    arguments, tools that raised). ``max_calls_per_turn`` bounds the calls run per turn (the rest get an
    error). The anchor state of a tool turn (for GiGPO) is the wrapped environment's state plus the results
    seen so far in this episode."""

    def __init__(self, env: Any, tools: list[Tool], max_calls_per_turn: int = 4):
        self.env = env
        self.tools = list(tools)
        self.by_name = {t.name: t for t in self.tools}
        self.max_calls_per_turn = max_calls_per_turn
        self._key: Any = None
        self._results: list[str] = []

    def reset(self, sample: Any = None, seed: Optional[int] = None):
        obs, info = self.env.reset(sample=sample, seed=seed)
        self._key = info.get("state_key", json.dumps(obs, sort_keys=True, default=str))
        self._results = []
        return obs, info

    def step(self, action: str):
        calls = parse_tool_calls(action)
        if not calls:
            obs, reward, done, info = self.env.step(action)
            self._key = info.get("state_key", json.dumps(obs, sort_keys=True, default=str))
            self._results = []
            return obs, reward, done, {**info, "tool_calls": 0, "tool_errors": 0}
        messages, errors = [], 0
        for i, call in enumerate(calls):
            if i >= self.max_calls_per_turn:
                content, ok = f"Error: at most {self.max_calls_per_turn} tool calls per turn", False
            else:
                content, ok = self._run(call)
            errors += not ok
            msg = {"role": "tool", "content": content}
            if call.name:
                msg["name"] = call.name
            messages.append(msg)
        self._results.extend(m["content"] for m in messages)
        key = (self._key, tuple(self._results))
        return messages, 0.0, False, {"tool_calls": len(calls), "tool_errors": errors, "state_key": key}

    def _run(self, call: ToolCall) -> tuple[str, bool]:
        if call.error:
            return f"Error: {call.error}", False
        tool = self.by_name.get(call.name)
        if tool is None:
            return f"Error: unknown tool {call.name!r}; available: {', '.join(self.by_name) or 'none'}", False
        try:
            return tool.call(call.arguments), True
        except Exception as exc:  # noqa: BLE001 - a tool failure is an observation for the model
            return f"Error: {type(exc).__name__}: {exc}"[:MAX_RESULT_CHARS], False

    def close(self) -> None:
        if hasattr(self.env, "close"):
            self.env.close()


# --------------------------------------------------------------------------------------------- #
# calculator
# --------------------------------------------------------------------------------------------- #

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNOPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_ABS_RESULT = 10 ** 100
MAX_EXPONENT = 1000


def calculate(expression: str) -> Union[int, float]:
    """The value of an arithmetic expression: numbers, ``+ - * / // % **``, unary signs and parentheses.

    The expression is parsed with :mod:`ast` and walked node by node; anything else (names, calls,
    attributes, strings) raises ``ValueError``. ``**`` is refused for exponents above 1000 in absolute value
    and any intermediate result beyond 1e100 raises, so a model cannot make the trainer compute for ever.
    ``^`` is read as power, ``×`` / ``÷`` as ``*`` / ``/``."""
    if not isinstance(expression, str) or len(expression) > 500:
        raise ValueError("expression must be a string of at most 500 characters")
    text = expression.replace("^", "**").replace("×", "*").replace("÷", "/").replace(",", "")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None

    def ev(node: ast.AST) -> Union[int, float]:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value,
                                                                                                        bool):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNOPS:
            return _UNOPS[type(node.op)](ev(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
                raise ValueError(f"exponent {right} is too large (at most {MAX_EXPONENT})")
            if isinstance(node.op, ast.Pow) and abs(left) > 1 and abs(right) * math.log10(abs(left)) > 100:
                raise ValueError("result is too large")
            try:
                out = _BINOPS[type(node.op)](left, right)
            except ZeroDivisionError:
                raise ValueError("division by zero") from None
            if isinstance(out, complex):
                raise ValueError("the result is not a real number")
            if abs(out) > MAX_ABS_RESULT:
                raise ValueError("result is too large")
            return out
        raise ValueError(f"unsupported element {type(node).__name__} in {expression!r}: only numbers and "
                         "+ - * / // % ** ( ) are allowed")

    value = ev(tree)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
        return int(value)
    return value


@register_tool("calculator")
def calculator_tool() -> Tool:
    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression (numbers, + - * / // % **, parentheses) and return its value."""
        return str(calculate(expression))

    return Tool.from_function(calculator)


# --------------------------------------------------------------------------------------------- #
# python (sandbox)
# --------------------------------------------------------------------------------------------- #

@register_tool("python")
def python_tool(timeout_s: float = 2.0, memory_mb: int = 512, allow_unsafe: bool = False) -> Tool:
    """Run Python code in :class:`postrl.rewards.sandbox.Sandbox` (isolated; fails closed where the host
    cannot isolate, unless ``allow_unsafe``). The sandbox is built at the first call."""
    state: dict[str, Any] = {}
    lock = threading.Lock()

    def python(code: str) -> str:
        """Run Python code in a sandbox and return what it printed (stdout, then stderr)."""
        # imported here: the sandbox belongs to the rewards layer, which sits above the environments
        from postrl.rewards.sandbox import Sandbox, SandboxLimits

        with lock:
            if "sandbox" not in state:
                state["sandbox"] = Sandbox(SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb),
                                           allow_unsafe=allow_unsafe)
        res = state["sandbox"].run(code)
        out = res.stdout
        if res.stderr:
            out += ("\n" if out else "") + res.stderr
        if res.status != "ok":
            out += f"\n[status: {res.status}]"
        return out.strip() or "(no output)"

    return Tool.from_function(python)


# --------------------------------------------------------------------------------------------- #
# sql (read-only SQLite)
# --------------------------------------------------------------------------------------------- #

@register_tool("sql")
def sql_tool(db_path: Optional[str] = None, db_schema: Optional[str] = None, max_rows: int = 50,
             timeout_s: float = 2.0) -> Tool:
    """One read-only query on a SQLite file (``db_path``, opened ``mode=ro``) or on an in-memory database
    built from ``db_schema`` (CREATE / INSERT statements), with :mod:`postrl.rewards.sql`'s guards."""
    if bool(db_path) == bool(db_schema):
        raise ConfigError("tool sql needs exactly one of db_path (a SQLite file) or db_schema (a CREATE/INSERT "
                          "script)")
    state: dict[str, Any] = {}
    lock = threading.Lock()

    def sql(query: str) -> str:
        """Run one read-only SQL query (SELECT / WITH) on the database and return its rows."""
        from postrl.rewards.sql import open_from_script, open_readonly, run_query

        with lock:
            if "conn" not in state:
                state["conn"] = open_readonly(db_path) if db_path else open_from_script(db_schema)
            rows = run_query(state["conn"], query.strip().rstrip(";"), timeout_s=timeout_s, max_rows=max_rows)
        return "\n".join(" | ".join(str(v) for v in row) for row in rows) or "(no rows)"

    return Tool.from_function(sql)


# --------------------------------------------------------------------------------------------- #
# search (BM25 over a local JSONL corpus)
# --------------------------------------------------------------------------------------------- #

_BM25_CACHE: dict[tuple, Any] = {}
_BM25_LOCK = threading.Lock()


def _bm25_index(path: str, text_key: str):
    """(retriever, documents) for a JSONL corpus, built once per file version and process."""
    try:
        import bm25s
    except ImportError:
        raise ConfigError("tool search needs the bm25s package: pip install 'postrl[agents]' (or bm25s)") from None
    key = (os.path.abspath(path), os.path.getmtime(path), text_key)
    with _BM25_LOCK:
        if key not in _BM25_CACHE:
            docs = []
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    if line.strip():
                        rec = json.loads(line)
                        if text_key not in rec:
                            raise ValueError(f"{path}:{i + 1}: no {text_key!r} field")
                        docs.append(rec)
            if not docs:
                raise ValueError(f"search corpus {path} is empty")
            retriever = bm25s.BM25()
            retriever.index(bm25s.tokenize([d[text_key] for d in docs], stopwords="en", show_progress=False),
                            show_progress=False)
            _BM25_CACHE[key] = (retriever, docs)
        return _BM25_CACHE[key]


@register_tool("search")
def search_tool(corpus: str, text_key: str = "text", title_key: str = "title", k: int = 3) -> Tool:
    """BM25 retrieval over the JSONL file ``corpus`` (one object per line with a ``text_key`` field) with
    ``bm25s``; the index is built at the first query."""
    if not os.path.isfile(corpus):
        raise ConfigError(f"tool search: corpus file {corpus!r} not found")
    default_k = k

    def search(query: str, k: int = default_k) -> str:
        """Search the document collection; returns the best matching passages."""
        import bm25s

        retriever, docs = _bm25_index(corpus, text_key)
        k = max(1, min(int(k), 10, len(docs)))
        tokens = bm25s.tokenize([query], stopwords="en", show_progress=False)
        if not any(len(ids) for ids in tokens.ids):  # only stopwords / unknown words
            return "(no results)"
        idx, scores = retriever.retrieve(tokens, k=k, show_progress=False)
        out = []
        for rank, (i, s) in enumerate(zip(idx[0].tolist(), scores[0].tolist()), 1):
            if s <= 0:
                continue
            d = docs[i]
            head = f"[{rank}] {d[title_key]}: " if title_key in d else f"[{rank}] "
            out.append(head + str(d[text_key]))
        return "\n".join(out) or "(no results)"

    return Tool.from_function(search)
