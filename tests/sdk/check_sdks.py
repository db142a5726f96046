"""Drives the tollgate binary with the official openai and anthropic SDKs.

A stand-in provider (this file, on a free port) answers like OpenAI and
Anthropic; the gateway runs in front of it with its own config; the SDKs'
base_url points at the gateway. Checks non-streaming and streaming calls of
both SDKs, that provider keys replace the gateway key, and that a 402 surfaces
as the SDK's own error with the gateway's details intact.

Usage: python check_sdks.py path/to/tollgate
"""

import hashlib
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anthropic
import openai

GATEWAY_KEY = "tg_sdk_check_key"
POOR_KEY = "tg_sdk_poor_key"
OPENAI_USAGE = {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}

seen = []


def openai_chunk(delta, usage_null):
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
             "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    if usage_null:
        chunk["usage"] = None
    return chunk


def sse(events):
    return "".join(
        (f"event: {name}\n" if name else "") + f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
        for name, data in events
    )


class Provider(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        seen.append({"path": self.path, "headers": dict(self.headers), "body": body})
        stream = body.get("stream") is True
        if self.path == "/v1/chat/completions" and not stream:
            self.send(200, "application/json", json.dumps({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}],
                "usage": OPENAI_USAGE}))
        elif self.path == "/v1/chat/completions":
            usage = (body.get("stream_options") or {}).get("include_usage") is True
            events = [(None, openai_chunk({"role": "assistant", "content": "Hel"}, usage)),
                      (None, openai_chunk({"content": "lo"}, usage))]
            if usage:
                events.append((None, {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                                      "model": "gpt-4o", "choices": [], "usage": OPENAI_USAGE}))
            self.send(200, "text/event-stream", sse(events) + "data: [DONE]\n\n")
        elif self.path == "/v1/messages" and not stream:
            self.send(200, "application/json", json.dumps({
                "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
                "content": [{"type": "text", "text": "Hi there"}], "stop_reason": "end_turn",
                "stop_sequence": None, "usage": {"input_tokens": 20, "output_tokens": 6}}))
        elif self.path == "/v1/messages":
            message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": [],
                       "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 20, "output_tokens": 1}}
            self.send(200, "text/event-stream", sse([
                ("message_start", {"type": "message_start", "message": message}),
                ("content_block_start", {"type": "content_block_start", "index": 0,
                                         "content_block": {"type": "text", "text": ""}}),
                ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "text_delta", "text": "Hi there"}}),
                ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                   "usage": {"output_tokens": 6}}),
                ("message_stop", {"type": "message_stop"}),
            ]))
        else:
            self.send(404, "application/json", '{"error":"no such path"}')

    def send(self, status, content_type, text):
        data = text.encode()
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONFIG = """
[server]
listen = "127.0.0.1:{gateway_port}"

[identity]
sources = ["api_key"]

[identity.api_key]
header = "authorization"
keys = [
  {{ sha256 = "{key_digest}", org = "org_sdk", name = "sdk" }},
  {{ sha256 = "{poor_digest}", org = "org_poor", name = "poor" }},
]

[upstreams.openai]
url = "http://127.0.0.1:{provider_port}"
headers = {{ authorization = "Bearer provider-openai-key" }}

[upstreams.anthropic]
url = "http://127.0.0.1:{provider_port}"
headers = {{ x-api-key = "provider-anthropic-key" }}

[[routes]]
name = "openai-chat"
method = "POST"
path = "/v1/chat/completions"
upstream = "openai"
cost = {{ tokens = "estimate" }}

[[routes]]
name = "anthropic-messages"
method = "POST"
path = "/v1/messages"
upstream = "anthropic"
cost = {{ tokens = "estimate" }}

[plans.team]
tokens = 1000000

[plans.tiny]
tokens = 50

[defaults]
plan = "team"

[orgs.org_poor]
plan = "tiny"
"""


def main(binary):
    provider = ThreadingHTTPServer(("127.0.0.1", 0), Provider)
    threading.Thread(target=provider.serve_forever, daemon=True).start()
    gateway_port = free_port()
    digest = lambda key: hashlib.sha256(key.encode()).hexdigest()
    config = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    config.write(CONFIG.format(gateway_port=gateway_port, provider_port=provider.server_address[1],
                               key_digest=digest(GATEWAY_KEY), poor_digest=digest(POOR_KEY)))
    config.close()
    gateway = subprocess.Popen([binary, "run", "--config", config.name], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", gateway_port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or gateway.poll() is not None:
                    raise SystemExit("the gateway did not start")
                time.sleep(0.05)
        return run_checks(f"http://127.0.0.1:{gateway_port}")
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
        provider.shutdown()


def run_checks(base):
    oa = openai.OpenAI(base_url=base + "/v1", api_key=GATEWAY_KEY, max_retries=0)
    an = anthropic.Anthropic(base_url=base, api_key=GATEWAY_KEY, max_retries=0)
    messages = [{"role": "user", "content": "hello"}]

    def openai_json():
        reply = oa.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=100)
        assert reply.choices[0].message.content == "Hello", reply
        assert reply.usage.total_tokens == 16
        assert seen[-1]["headers"]["authorization"] == "Bearer provider-openai-key", "the gateway key reached OpenAI"

    def openai_stream_without_usage():
        chunks = list(oa.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=100, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
        assert all(not c.usage for c in chunks), "the client saw usage it did not ask for"
        assert all(c.choices for c in chunks), "the client saw the usage-only chunk"
        assert seen[-1]["body"]["stream_options"]["include_usage"] is True, "the gateway did not ask for usage"

    def openai_stream_with_usage():
        chunks = list(oa.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=100, stream=True,
                                                 stream_options={"include_usage": True}))
        assert chunks[-1].usage.total_tokens == 16, chunks[-1]

    def anthropic_json():
        reply = an.messages.create(model="claude-x", max_tokens=64, messages=messages)
        assert reply.content[0].text == "Hi there", reply
        headers = seen[-1]["headers"]
        assert headers.get("x-api-key") == "provider-anthropic-key", "the gateway key reached Anthropic"

    def anthropic_stream():
        with an.messages.stream(model="claude-x", max_tokens=64, messages=messages) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert text == "Hi there", text
        assert final.usage.output_tokens == 6

    def openai_402():
        poor = openai.OpenAI(base_url=base + "/v1", api_key=POOR_KEY, max_retries=0)
        try:
            poor.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=100)
        except openai.APIStatusError as error:
            assert error.status_code == 402, error.status_code
            details = error.response.json()["error"]["details"]
            assert details["quotaType"] == "tokens" and details["limit"] == 50 and details["requested"] == 102, details
            assert error.response.json()["error"]["code"] == "QUOTA_EXCEEDED"
        else:
            raise AssertionError("no 402")

    def anthropic_402():
        poor = anthropic.Anthropic(base_url=base, api_key=POOR_KEY, max_retries=0)
        try:
            poor.messages.create(model="claude-x", max_tokens=64, messages=messages)
        except anthropic.APIStatusError as error:
            assert error.status_code == 402, error.status_code
            body = error.response.json()
            assert body["error"]["code"] == "QUOTA_EXCEEDED" and body["error"]["details"]["planSlug"] == "tiny", body
        else:
            raise AssertionError("no 402")

    checks = [openai_json, openai_stream_without_usage, openai_stream_with_usage,
              anthropic_json, anthropic_stream, openai_402, anthropic_402]
    failed = 0
    for check in checks:
        try:
            check()
            print(f"sdk check {check.__name__} ... ok")
        except Exception:
            failed += 1
            print(f"sdk check {check.__name__} ... FAILED")
            traceback.print_exc()
    print(f"{len(checks) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
