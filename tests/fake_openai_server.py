"""A small OpenAI-compatible completion server for the tests (stdlib ``http.server``, in a thread or as a
process): ``/v1/models``, ``/v1/completions`` with token-id prompts (postrl's own torch Generator on a
model directory, one prompt per request, with the request's seed), and the vLLM development endpoints
postrl's weight sync uses (``/collective_rpc`` ``reload_weights``, ``/reset_prefix_cache``).

Failure injection for the bad-input tests: ``server.faults`` is a list consumed one entry per completion
request: ``"500"`` (HTTP 500), ``"malformed"`` (invalid JSON), ``"short"`` (fewer log-probs than tokens),
``"sleep:S"`` (answer after S seconds), ``"drop"`` (close the connection without an answer).

As a process (what a managed-server test starts): ``python fake_openai_server.py --model DIR --port P
--served-model-name NAME [--host H] [other vLLM flags, ignored]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class FakeServer:
    def __init__(self, model_dir: str, served_model_name: str = "fake-model", port: int = 0, host: str = "127.0.0.1"):
        self.served_model_name = served_model_name
        self.lock = threading.Lock()
        self.faults: list[str] = []
        self.completions = 0
        self.reloads: list[str] = []
        self.adapters: dict = {}  # LoRA name -> the base model with that adapter merged
        self.load(model_dir)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def reply(self, code: int, payload) -> None:
                raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                if self.path in ("/v1/models",):
                    names = [server.served_model_name, *server.adapters]
                    self.reply(200, {"object": "list", "data": [{"id": n, "object": "model"} for n in names]})
                elif self.path == "/health":
                    self.reply(200, b"")
                else:
                    self.reply(404, {"error": f"no route {self.path}"})

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(n) or b"{}")
                except json.JSONDecodeError as exc:
                    self.reply(400, {"error": str(exc)})
                    return
                if self.path == "/v1/completions":
                    fault = None
                    with server.lock:
                        if server.faults:
                            fault = server.faults.pop(0)
                    if fault == "500":
                        self.reply(500, {"error": "injected"})
                        return
                    if fault == "malformed":
                        self.reply(200, b'{"choices": [{"text": "oops"')
                        return
                    if fault == "drop":
                        self.close_connection = True
                        self.wfile.flush()
                        self.connection.shutdown(2)
                        return
                    if fault and fault.startswith("sleep:"):
                        time.sleep(float(fault.split(":", 1)[1]))
                    if body.get("model") != server.served_model_name and body.get("model") not in server.adapters:
                        self.reply(404, {"error": f"The model `{body.get('model')}` does not exist."})
                        return
                    answer = server.complete(body)
                    if fault == "short":
                        answer["choices"][0]["logprobs"]["token_logprobs"].pop()
                    self.reply(200, answer)
                elif self.path == "/collective_rpc":
                    if body.get("method") != "reload_weights":
                        self.reply(400, {"error": "only reload_weights"})
                        return
                    server.load(body["kwargs"]["weights_path"])
                    server.reloads.append(body["kwargs"]["weights_path"])
                    self.reply(200, {"results": [None]})
                elif self.path == "/v1/load_lora_adapter":  # vLLM's runtime LoRA loading, by path
                    server.load_adapter(body["lora_name"], body["lora_path"])
                    self.reply(200, {"message": f"Success: LoRA adapter '{body['lora_name']}' added successfully."})
                elif self.path == "/v1/unload_lora_adapter":
                    with server.lock:
                        server.adapters.pop(body["lora_name"], None)
                    self.reply(200, {"message": "unloaded"})
                elif self.path == "/reset_prefix_cache":
                    self.reply(200, {"success": True})
                else:
                    self.reply(404, {"error": f"no route {self.path}"})

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # postrl sends up to rollout.max_concurrency requests at once

        self.httpd = Server((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self.thread = None

    def load(self, model_dir: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        # a weight reload (as vLLM's reload_weights) reads only the weights; the tokenizer stays
        tok = getattr(self, "tokenizer", None) or AutoTokenizer.from_pretrained(model_dir)
        with self.lock:
            self.model, self.tokenizer = model, tok

    def load_adapter(self, name: str, path: str) -> None:
        import copy

        from peft import PeftModel

        with self.lock:
            base = copy.deepcopy(self.model)
        merged = PeftModel.from_pretrained(base, path).merge_and_unload().eval()
        with self.lock:
            self.adapters[name] = merged

    def complete(self, body: dict) -> dict:
        from postrl.rollout.generator import Generator, SamplingParams, eos_token_ids

        prompt = body["prompt"]
        if prompt and isinstance(prompt[0], list):
            prompt = prompt[0]
        with self.lock:
            model, tok = self.adapters.get(body.get("model"), self.model), self.tokenizer
            self.completions += 1
        eos = sorted(set(eos_token_ids(model, tok)) | set(body.get("stop_token_ids") or []))
        gen = Generator(model, eos, tok.pad_token_id if tok.pad_token_id is not None else eos[0])
        params = SamplingParams(int(body.get("max_tokens", 16)), float(body.get("temperature", 1.0)),
                                float(body.get("top_p", 1.0)), max(0, int(body.get("top_k", 0) or 0)),
                                int(body.get("min_tokens", 0) or 0))
        out = gen.generate([list(prompt)], params, seed=body.get("seed"))
        n = int(out.completion_mask[0].sum())
        ids = out.completion_ids[0, :n].tolist()
        lps = out.logprobs[0, :n].tolist()
        return {"id": "cmpl-fake", "object": "text_completion", "model": self.served_model_name,
                "choices": [{"index": 0, "text": "", "token_ids": ids,
                             "finish_reason": "length" if bool(out.truncated[0]) else "stop",
                             "logprobs": {"tokens": [f"token_id:{t}" for t in ids], "token_logprobs": lps,
                                          "top_logprobs": None, "text_offset": [0] * n}}]}

    def start(self) -> "FakeServer":
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--served-model-name", default="fake-model")
    args, _ = ap.parse_known_args(argv)
    torch.set_num_threads(1)
    server = FakeServer(args.model, args.served_model_name, args.port, args.host)
    print(f"fake server on {server.url}", flush=True)
    server.httpd.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
