"""Drives the tollgate binary with the official openai and anthropic SDKs and
checks what each call is billed.

The script starts three things on free ports: a stand-in provider (in this
file) that answers like OpenAI and Anthropic, its own redis-server, and the
gateway on the Redis store in front of the provider. The SDKs' base_url
points at the gateway. After every call the script reads the org's token
counter in Redis and checks its exact increase:

- JSON answers are settled to the provider's usage;
- streams are settled to the provider's final usage (OpenAI's usage-only
  chunk, Anthropic's message_stop after message_delta), also when the client
  closes the stream right after it; the gateway asks OpenAI for usage and
  hides it from a client that did not;
- a client that leaves before the final usage is charged the larger of the
  estimate and the usage reported so far;
- a 402 surfaces as the SDK's own error with the gateway's details intact,
  and the counter does not move;
- provider keys replace the gateway key.

Every check runs over HTTP/1.1 (the SDKs' default httpx client) and over
HTTP/2 (h2c with prior knowledge), each protocol with orgs of its own.

The provider is timed like a real one: a stream is sent chunked, each event
flushed as it is written, and the end of the body (the zero-length chunk)
follows the final event only after END_DELAY. The OpenAI SDK stops reading at
`[DONE]` and closes the response before that end arrives (over HTTP/1.1 this
closes the connection), so a gateway that waited for the end to settle would
charge those calls the estimate. (The Anthropic SDK reads on to the end.) A
request can steer the provider with headers the gateway forwards:
`x-test-input-tokens` sets the input tokens it reports, `x-test-pause-after`
names an event after which it pauses until the check releases it. The client
leaves while the provider is quiet, the counter is checked while only the
client's leaving can have moved it, then the provider is released and the
counter must stay where it was.

Leaving: over HTTP/1.1, closing a stream the SDK has not read to its end
closes the connection. Over HTTP/2 the SDKs' transport (httpcore2) closes a
response without resetting its stream (it sends no RST_STREAM, as in
encode/httpcore#943), so to the gateway that client is merely slow: a
leaving SDK client there also closes itself, and with it the connection. One
more HTTP/2 check drives the gateway with the h2 package directly, to leave
by RST_STREAM on a connection that stays open.

Usage: python check_sdks.py path/to/tollgate
"""

import datetime
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anthropic
import h2.config
import h2.connection
import h2.errors
import h2.events
import openai

PROTOCOLS = ("http1", "http2")
HTTP_VERSION = {"http1": "HTTP/1.1", "http2": "HTTP/2"}
# Gateway API keys, each of its own org: key -> (org, plan).
KEYS = {f"tg_sdk_{p}": (f"org_sdk_{p}", "team") for p in PROTOCOLS}
KEYS.update({f"tg_poor_{p}": (f"org_poor_{p}", "tiny") for p in PROTOCOLS})

OPENAI_USAGE = {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
ANTHROPIC_INPUT, ANTHROPIC_OUTPUT = 20, 6
# The gateway's estimates of the bodies the checks send: ceil(len("hello")/4)
# plus max_tokens.
OPENAI_ESTIMATE, ANTHROPIC_ESTIMATE = 2 + 100, 2 + 64

END_DELAY = 0.05  # between a stream's final event and the end of its body
PAUSE_LIMIT = 10.0  # a paused provider goes on by itself after this
SETTLE_DEADLINE = 5.0  # settlements are applied in the background
POLL_EVERY = 0.01
STABLE_FOR = 0.1  # a counter that reached its figure is read again after this


# ---------------------------------------------------------------- provider


class Call:
    """A request the provider received, and its pause."""

    def __init__(self, path, headers, body):
        self.path, self.headers, self.body = path, headers, body
        self.pause_after = headers.get("x-test-pause-after")
        self.released = threading.Event()
        self.finished = threading.Event()
        self.cut = False  # a write failed: the gateway had hung up


calls = []


def sse(data, event=None):
    head = f"event: {event}\n" if event else ""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return head + f"data: {text}\n\n"


def openai_chunk(delta, usage_null):
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
             "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    if usage_null:
        chunk["usage"] = None
    return chunk


def openai_stream(body):
    """(label, text) of each event; labels name the points to pause after."""
    usage = (body.get("stream_options") or {}).get("include_usage") is True
    events = [("first_chunk", sse(openai_chunk({"role": "assistant", "content": "Hel"}, usage))),
              ("second_chunk", sse(openai_chunk({"content": "lo"}, usage)))]
    if usage:
        events.append(("usage", sse({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                                     "model": "gpt-4o", "choices": [], "usage": OPENAI_USAGE})))
    return events + [("done", sse("[DONE]"))]


def anthropic_stream(input_tokens):
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": [],
               "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": input_tokens, "output_tokens": 1}}
    events = [
        {"type": "message_start", "message": message},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi there"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": {"output_tokens": ANTHROPIC_OUTPUT}},
        {"type": "message_stop"},
    ]
    return [(event["type"], sse(event, event["type"])) for event in events]


class Provider(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        call = Call(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        calls.append(call)
        try:
            self.answer(call, body)
        finally:
            call.finished.set()

    def answer(self, call, body):
        stream = body.get("stream") is True
        input_tokens = int(call.headers.get("x-test-input-tokens", ANTHROPIC_INPUT))
        if self.path == "/v1/chat/completions" and not stream:
            self.send_json({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}],
                "usage": OPENAI_USAGE})
        elif self.path == "/v1/chat/completions":
            self.send_stream(call, openai_stream(body))
        elif self.path == "/v1/messages" and not stream:
            self.send_json({
                "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
                "content": [{"type": "text", "text": "Hi there"}], "stop_reason": "end_turn",
                "stop_sequence": None, "usage": {"input_tokens": input_tokens, "output_tokens": ANTHROPIC_OUTPUT}})
        elif self.path == "/v1/messages":
            self.send_stream(call, anthropic_stream(input_tokens))
        else:
            self.send_json({"error": "no such path"}, 404)

    def send_json(self, value, status=200):
        data = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_stream(self, call, events):
        """Each event its own chunk, flushed; pauses where the call asks; the
        body's end END_DELAY after the final event."""
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        try:
            for label, text in events:
                data = text.encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                if label == call.pause_after:
                    call.released.wait(PAUSE_LIMIT)
            time.sleep(END_DELAY)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            call.cut = True
            self.close_connection = True


# ------------------------------------------------------------------- redis


class Redis:
    """A redis-server of the script's own, and one connection to it."""

    def __init__(self):
        self.port = free_port()
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.socket = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                self.reader = self.socket.makefile("rb")
                if self.command("PING") == "PONG":
                    return
            except OSError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise SystemExit("redis-server did not start")
            time.sleep(0.05)

    def command(self, *args):
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            arg = str(arg).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
        self.socket.sendall(b"".join(parts))
        line = self.reader.readline().rstrip(b"\r\n")
        kind, rest = line[:1], line[1:].decode()
        if kind == b"+":
            return rest
        if kind == b":":
            return int(rest)
        if kind == b"$":
            if rest == "-1":
                return None
            data = self.reader.read(int(rest) + 2)[:-2]
            return data.decode()
        raise RuntimeError(f"redis answered {line!r}")

    def tokens(self, org):
        """The org's token counter in its current billing period (anchor day 1)."""
        period = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-01")
        value = self.command("GET", f"tollgate:{{{org}}}:{period}:tokens")
        return int(value or 0)

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=30)


class Meter:
    """One org's token counter, read against what it held when a call began."""

    def __init__(self, redis, org):
        self.redis, self.org = redis, org

    def start(self):
        self.base = self.redis.tokens(self.org)

    def expect(self, increase, why):
        """Waits until the counter went up by exactly `increase`, then checks
        it stays there."""
        deadline = time.monotonic() + SETTLE_DEADLINE
        while (seen := self.redis.tokens(self.org) - self.base) != increase:
            if time.monotonic() > deadline:
                raise AssertionError(f"{why}: {self.org} went up by {seen} after {SETTLE_DEADLINE}s, expected {increase}")
            time.sleep(POLL_EVERY)
        time.sleep(STABLE_FOR)
        seen = self.redis.tokens(self.org) - self.base
        assert seen == increase, f"{why}: {self.org} reached +{increase}, then moved to +{seen}"


# ------------------------------------------------------------------ checks


def checks_for(protocol, base, redis, clients):
    """The checks of one protocol, each a function named after its case; the
    SDK clients they make are added to `clients`, for the caller to close."""
    key, poor_key = f"tg_sdk_{protocol}", f"tg_poor_{protocol}"
    meter, poor_meter = Meter(redis, KEYS[key][0]), Meter(redis, KEYS[poor_key][0])
    version = HTTP_VERSION[protocol]
    messages = [{"role": "user", "content": "hello"}]

    def http_client(sdk):
        if protocol == "http2":
            return sdk.DefaultHttpxClient(http1=False, http2=True)
        return sdk.DefaultHttpxClient()

    def openai_client(api_key=key):
        clients.append(openai.OpenAI(base_url=base + "/v1", api_key=api_key, max_retries=0, timeout=30,
                                     http_client=http_client(openai)))
        return clients[-1]

    def anthropic_client(api_key=key):
        clients.append(anthropic.Anthropic(base_url=base, api_key=api_key, max_retries=0, timeout=30,
                                           http_client=http_client(anthropic)))
        return clients[-1]

    oa, an = openai_client(), anthropic_client()

    def over_protocol(response):
        assert response.http_version == version, f"answered over {response.http_version}, not {version}"

    def leave(client, stream):
        """The client goes away midway: over HTTP/2 closing the stream alone
        does not reach the gateway (see the module documentation)."""
        stream.close()
        if protocol == "http2":
            client.close()

    def released(call, increase, why):
        """Checks the counter while the provider is paused, then lets the
        provider go on and checks the counter did not move."""
        try:
            meter.expect(increase, why)
        finally:
            call.released.set()
        assert call.finished.wait(PAUSE_LIMIT), "the provider did not finish"
        meter.expect(increase, why + ", once the provider went on")

    def openai_json():
        meter.start()
        raw = oa.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages, max_tokens=100)
        over_protocol(raw.http_response)
        reply = raw.parse()
        assert reply.choices[0].message.content == "Hello", reply
        assert reply.usage.total_tokens == 16
        assert calls[-1].headers["authorization"] == "Bearer provider-openai-key", "the gateway key reached OpenAI"
        meter.expect(16, "settled to the JSON usage")

    def openai_stream_without_usage():
        meter.start()
        stream = oa.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=100, stream=True)
        over_protocol(stream.response)
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
        assert all(not c.usage for c in chunks), "the client saw usage it did not ask for"
        assert all(c.choices for c in chunks), "the client saw the usage-only chunk"
        assert calls[-1].body["stream_options"]["include_usage"] is True, "the gateway did not ask for usage"
        meter.expect(16, "settled to the hidden usage chunk")

    def openai_stream_with_usage():
        meter.start()
        stream = oa.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=100, stream=True,
                                            stream_options={"include_usage": True})
        over_protocol(stream.response)
        chunks = list(stream)
        assert chunks[-1].usage.total_tokens == 16, chunks[-1]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
        meter.expect(16, "settled to the usage chunk")

    def openai_close_after_usage():
        # The provider pauses after the usage chunk: [DONE] and the body's
        # end come only once the counter was checked.
        meter.start()
        client = openai_client()
        stream = client.chat.completions.create(
            model="gpt-4o", messages=messages, max_tokens=100, stream=True,
            stream_options={"include_usage": True}, extra_headers={"x-test-pause-after": "usage"})
        over_protocol(stream.response)
        call = calls[-1]
        for chunk in stream:
            if chunk.usage:
                break
        assert chunk.usage.total_tokens == 16, chunk
        leave(client, stream)
        released(call, 16, "settled to the usage chunk the client read before leaving")

    def openai_close_before_usage():
        meter.start()
        client = openai_client()
        stream = client.chat.completions.create(
            model="gpt-4o", messages=messages, max_tokens=100, stream=True,
            extra_headers={"x-test-pause-after": "first_chunk"})
        over_protocol(stream.response)
        call = calls[-1]
        first = next(iter(stream))
        assert first.choices[0].delta.content == "Hel", first
        leave(client, stream)
        # The estimate was reserved on admission; what proves the gateway saw
        # the client leave is that the usage the provider sends next, once
        # released, is not settled.
        released(call, OPENAI_ESTIMATE, "the estimate stands for a client gone before any usage")

    def anthropic_json():
        meter.start()
        raw = an.messages.with_raw_response.create(model="claude-x", max_tokens=64, messages=messages)
        over_protocol(raw.http_response)
        reply = raw.parse()
        assert reply.content[0].text == "Hi there", reply
        assert calls[-1].headers.get("x-api-key") == "provider-anthropic-key", "the gateway key reached Anthropic"
        meter.expect(ANTHROPIC_INPUT + ANTHROPIC_OUTPUT, "settled to the JSON usage")

    def anthropic_stream():
        meter.start()
        with an.messages.stream(model="claude-x", max_tokens=64, messages=messages) as stream:
            over_protocol(stream.response)
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert text == "Hi there", text
        assert final.usage.output_tokens == ANTHROPIC_OUTPUT
        meter.expect(ANTHROPIC_INPUT + ANTHROPIC_OUTPUT, "settled to message_start and message_delta")

    def anthropic_leave_after(event, increase):
        meter.start()
        client = anthropic_client()
        stream = client.messages.create(
            model="claude-x", max_tokens=64, messages=messages, stream=True,
            extra_headers={"x-test-pause-after": event, "x-test-input-tokens": "100000"})
        over_protocol(stream.response)
        call = calls[-1]
        for seen in stream:
            if seen.type == event:
                break
        assert seen.type == event, seen
        leave(client, stream)
        released(call, increase, f"a client gone after {event} is charged the usage reported so far")

    def anthropic_close_after_message_delta():
        anthropic_leave_after("message_delta", 100000 + ANTHROPIC_OUTPUT)

    def anthropic_close_after_message_start():
        anthropic_leave_after("message_start", 100000 + 1)

    def openai_402():
        poor_meter.start()
        poor = openai_client(poor_key)
        try:
            poor.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=100)
        except openai.APIStatusError as error:
            assert error.status_code == 402, error.status_code
            over_protocol(error.response)
            details = error.response.json()["error"]["details"]
            assert details["quotaType"] == "tokens" and details["limit"] == 50, details
            assert details["requested"] == OPENAI_ESTIMATE, details
            assert error.response.json()["error"]["code"] == "QUOTA_EXCEEDED"
        else:
            raise AssertionError("no 402")
        poor_meter.expect(0, "a refused request costs nothing")

    def anthropic_402():
        poor_meter.start()
        poor = anthropic_client(poor_key)
        try:
            poor.messages.create(model="claude-x", max_tokens=64, messages=messages)
        except anthropic.APIStatusError as error:
            assert error.status_code == 402, error.status_code
            over_protocol(error.response)
            body = error.response.json()
            assert body["error"]["code"] == "QUOTA_EXCEEDED" and body["error"]["details"]["planSlug"] == "tiny", body
            assert body["error"]["details"]["requested"] == ANTHROPIC_ESTIMATE, body
        else:
            raise AssertionError("no 402")
        poor_meter.expect(0, "a refused request costs nothing")

    def h2_reset_after_message_start():
        # The SDKs never reset a stream (see the module documentation), so a
        # bare h2 client does what a leaving HTTP/2 client should: it resets
        # its stream and keeps the connection open.
        meter.start()
        host, port = base.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)), timeout=10)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        body = json.dumps({"model": "claude-x", "max_tokens": 64, "messages": messages, "stream": True}).encode()
        conn.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":authority", f"{host}:{port}"),
                              (":path", "/v1/messages"), ("authorization", f"Bearer {key}"),
                              ("content-type", "application/json"), ("content-length", str(len(body))),
                              ("x-test-pause-after", "message_start"), ("x-test-input-tokens", "100000")])
        conn.send_data(1, body, end_stream=True)
        sock.sendall(conn.data_to_send())
        try:
            received = b""
            while b"event: message_start" not in received:
                data = sock.recv(65536)
                assert data, "the gateway closed the connection"
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        assert dict(event.headers)[b":status"] == b"200", event.headers
                    elif isinstance(event, h2.events.DataReceived):
                        received += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                        raise AssertionError(f"the stream ended before message_start: {event}")
                sock.sendall(conn.data_to_send())
            call = calls[-1]
            conn.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
            sock.sendall(conn.data_to_send())
            released(call, 100000 + 1, "a stream reset after message_start is charged the usage reported so far")
        finally:
            sock.close()

    checks = [openai_json, openai_stream_without_usage, openai_stream_with_usage, openai_close_after_usage,
              openai_close_before_usage, anthropic_json, anthropic_stream, anthropic_close_after_message_delta,
              anthropic_close_after_message_start, openai_402, anthropic_402]
    return checks + [h2_reset_after_message_start] if protocol == "http2" else checks


# ------------------------------------------------------------------- setup


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONFIG = """
[server]
listen = "127.0.0.1:{gateway_port}"

[store]
backend = "redis"
url = "redis://127.0.0.1:{redis_port}"
timeout = "1s"
# A store failure fails the call, never lets it through uncounted.
on_error = "deny"

[identity]
sources = ["api_key"]

[identity.api_key]
header = "authorization"
keys = [
{keys}
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
{orgs}
"""


def main(binary):
    provider = ThreadingHTTPServer(("127.0.0.1", 0), Provider)
    provider.daemon_threads = True
    threading.Thread(target=provider.serve_forever, daemon=True).start()
    redis = Redis()
    gateway_port = free_port()
    keys = "\n".join(f'  {{ sha256 = "{hashlib.sha256(key.encode()).hexdigest()}", org = "{org}", name = "{key}" }},'
                     for key, (org, _) in KEYS.items())
    orgs = "".join(f'\n[orgs.{org}]\nplan = "{plan}"\n' for org, plan in KEYS.values() if plan != "team")
    config = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    config.write(CONFIG.format(gateway_port=gateway_port, redis_port=redis.port,
                               provider_port=provider.server_address[1], keys=keys, orgs=orgs))
    config.close()
    log = tempfile.TemporaryFile("w+")
    gateway = subprocess.Popen([binary, "run", "--config", config.name], stderr=log,
                               env={**os.environ, "NO_COLOR": "1"})
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
        failed = run_checks(f"http://127.0.0.1:{gateway_port}", redis)
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
        redis.stop()
        provider.shutdown()
        os.unlink(config.name)
    if failed:
        log.seek(0)
        print("the gateway's stderr:\n" + log.read(), file=sys.stderr)
    return 1 if failed else 0


def run_checks(base, redis):
    total = failed = 0
    for protocol in PROTOCOLS:
        clients = []
        for check in checks_for(protocol, base, redis, clients):
            total += 1
            try:
                check()
                print(f"sdk check {check.__name__}[{protocol}] ... ok", flush=True)
            except Exception:
                failed += 1
                print(f"sdk check {check.__name__}[{protocol}] ... FAILED", flush=True)
                traceback.print_exc()
        # Open connections would hold the gateway's shutdown back.
        for client in clients:
            client.close()
    print(f"{total - failed} passed, {failed} failed")
    return failed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
