"""Runs the load cases of benches/run and reports them against nginx.

Every server listens on loopback: the stand-in upstream (examples/
bench_upstream.rs), redis-server, nginx as a plain keep-alive proxy_pass (the
peer, enforcing nothing), the bare hyper proxy (examples/bare_proxy.rs: the
floor for tollgate's crates), tollgate on the memory and on the redis
store, and the peers that enforce a quota as tollgate does (their configs in
benches/peers/): HAProxy with a stick table in memory, nginx with a Lua
check-and-increment in the same redis-server, and, with BENCH_PEERS=litellm,
LiteLLM's proxy with per-key rpm/tpm limits in Redis.
Closed-loop throughput comes from wrk (64 connections, a warm-up, then 10 s a
case); open-loop latency at fixed rates from oha with latency correction;
instructions per request from valgrind's callgrind, which, unlike time, do
not move with whatever else the machine's host is running.
"""

import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from statistics import median

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DURATION = os.environ.get("BENCH_DURATION", "10s")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
WARMUP = os.environ.get("BENCH_WARMUP", "3s")
CONNECTIONS = 64
# Runtime API keys in the store for case 10.
RUNTIME_KEYS = int(os.environ.get("BENCH_RUNTIME_KEYS", "100000"))
RSS_NAMES = {"memory": "memory store", "redis_gw": "redis store", "keys_1": "redis, 1 key",
             "keys_100k": "redis, 100,000 runtime keys", "keys_grown": "redis, 1,000 routes and 100,000 file keys"}
# Under callgrind a server runs some fifty times slower: fewer connections,
# a shorter run.
COUNTED_CONNECTIONS = 8
COUNTED_DURATION = "5s"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port, what, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not start on port {port}")


TOLLGATE = """
[server]
listen = "127.0.0.1:{port}"
[store]
backend = "{backend}"
{store_url}
timeout = "1s"
[identity]
sources = ["header"]
[identity.header]
name = "x-org-id"
trusted_peers = ["127.0.0.1"]
[upstreams.api]
url = "http://127.0.0.1:{upstream}"
[[routes]]
name = "playbook-execute"
method = "POST"
path = "/run"
upstream = "api"
cost = {{ playbook_runs = 1 }}
[[routes]]
name = "openai-chat"
method = "POST"
path = "/v1/chat/completions"
upstream = "api"
cost = {{ tokens = "estimate" }}
[[routes]]
name = "everything-else"
path = "/{{*rest}}"
upstream = "api"
[plans.big]
tokens = 1000000000000
playbook_runs = 1000000000000
[plans.none]
playbook_runs = 0
[defaults]
plan = "big"
[orgs.org_broke]
plan = "none"
[plans.hundred]
playbook_runs = 100
[orgs.org_exact]
plan = "hundred"
"""

# The same gateway on Redis with the org from a gateway API key: one in the
# file, and (`seed_runtime_keys`) however many more in the store's catalog.
TOLLGATE_KEYED = TOLLGATE.replace('sources = ["header"]', 'sources = ["api_key", "header"]').replace(
    "[identity.header]", """[identity.api_key]
keys = [{{ sha256 = "{key_sha256}", org = "org_bench", name = "bench" }}]
[identity.header]""").replace(
    # Long enough for the first read of 100,000 keys under callgrind.
    'timeout = "1s"', 'timeout = "10s"\nkey_prefix = "{key_prefix}"')

BENCH_KEY = "tg_bench_file_key"

# Case 17: case 9's gateway with its config grown, so that the table shows
# whether a request's cost grows with it: 1,000 routes before the one hit,
# and 100,000 more API keys in the file.
GROWN_ROUTES = 1000
GROWN_KEYS = 100000


def grown(config):
    import hashlib
    routes = "".join(f'[[routes]]\nname = "grown-{i}"\nmethod = "POST"\npath = "/grown/{i}/{{id}}"\n'
                     f'upstream = "api"\ncost = {{ playbook_runs = 1 }}\n' for i in range(GROWN_ROUTES))
    keys = "".join(f', {{ sha256 = "{hashlib.sha256(f"tg_grown_{i}".encode()).hexdigest()}", org = "org_bench", '
                   f'name = "grown{i}" }}' for i in range(GROWN_KEYS))
    config = config.replace("[[routes]]", routes + "[[routes]]", 1)
    return config.replace(', name = "bench" }]', ', name = "bench" }' + keys + "]", 1)


def runtime_key(i):
    return f"tg_bench_runtime_key_{i:06d}"


def seed_runtime_keys(redis_port, prefix, count):
    """Writes `count` runtime API keys of org_bench into the store's catalog,
    as a bulk import would: the records POST /v1/keys writes, in one
    pipeline, and the version once. Returns the last key."""
    import hashlib
    def command(*args):
        parts = [f"*{len(args)}\r\n"]
        for arg in args:
            data = str(arg).encode()
            parts.append(f"${len(data)}\r\n{data.decode()}\r\n")
        return "".join(parts)
    lines = []
    for i in range(count):
        key = runtime_key(i)
        record = json.dumps({"id": f"{i:032x}", "org": "org_bench", "name": f"k{i}",
                             "sha256": hashlib.sha256(key.encode()).hexdigest(),
                             "createdAt": "2026-12-01T00:00:00.000Z"}, separators=(",", ":"))
        lines.append(command("HSET", f"{prefix}:{{:catalog}}:keys", f"{i:032x}", record))
    lines.append(command("SET", f"{prefix}:{{:catalog}}:version", count))
    subprocess.run(["redis-cli", "-p", str(redis_port), "--pipe"], input="".join(lines).encode(),
                   capture_output=True, check=True)
    return runtime_key(count - 1)


NGINX = """
worker_processes auto;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  upstream backend {{ server 127.0.0.1:{upstream}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""

LUA_POST = """
wrk.method = "POST"
wrk.headers["x-org-id"] = "{org}"
"""

LUA_KEYED = """
wrk.method = "POST"
wrk.headers["authorization"] = "Bearer {key}"
"""

LUA_CHAT = """
wrk.method = "POST"
wrk.headers["x-org-id"] = "org_bench"
wrk.headers["content-type"] = "application/json"
wrk.body = [[{body}]]
"""

LUA_LITELLM = """
wrk.method = "POST"
wrk.headers["authorization"] = "Bearer {key}"
wrk.headers["content-type"] = "application/json"
wrk.body = [[{body}]]
"""

# Each tollgate case and the peer case that does the same work: its "÷ peer"
# figures are tollgate's divided by that peer's.
PEER_OF = {3: 13, 4: 11, 5: 14, 7: 12, 16: 15, 18: 12}


def chat_body():
    # 4 KB (4,091 bytes), the same body as benches/hot_paths.rs estimates.
    turn = "Summarise the quarterly revenue figures for the EMEA region and flag anomalies. " * 14
    body = {"model": "gpt-4o", "max_tokens": 512, "messages": [
        {"role": "system", "content": "You are a careful financial analyst. " * 10},
        {"role": "user", "content": turn}, {"role": "assistant", "content": turn},
        {"role": "user", "content": [{"type": "text", "text": turn}]}],
        "tools": [{"type": "function", "function": {"name": "lookup", "description": "Look a figure up",
                   "parameters": {"type": "object", "properties": {"region": {"type": "string"}}}}}]}
    return json.dumps(body, separators=(",", ":"))


def wrk(url, script, proxy, redis):
    # A long timeout: at 64 connections the LiteLLM proxy answers in about a second.
    command = lambda duration: ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{duration}", "--timeout", "10s", "--latency",
                                "-s", script, url]
    subprocess.run(command(WARMUP), capture_output=True, check=True)
    before = cpu_seconds(proxy), cpu_seconds(redis)
    ticks = machine_ticks()
    out = subprocess.run(command(DURATION), capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    proxy_cpu, redis_cpu = cpu_seconds(proxy) - before[0], cpu_seconds(redis) - before[1]
    return {"rps": rps, "p99_ms": float(p99.group(1)) * scale, "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "requests": total, "cpu_us": proxy_cpu * 1e6 / total, "redis_us": redis_cpu * 1e6 / total,
            "steal": steal_percent(ticks)}


def oha(url, rate):
    command = lambda duration: ["oha", "-z", duration, "-q", str(rate), "-c", str(CONNECTIONS), "--latency-correction",
                                "--no-tui", "--output-format", "json", "-m", "POST", "-H", "x-org-id: org_bench", url]
    # A warm-up at the same rate first: connections opened, pools filled.
    subprocess.run(command(WARMUP), capture_output=True, check=True)
    ticks = machine_ticks()
    out = subprocess.run(command(DURATION), capture_output=True, text=True, check=True).stdout
    report = json.loads(out)
    pct = report["latencyPercentiles"]
    return {"p50": pct["p50"] * 1000, "p99": pct["p99"] * 1000, "p999": pct["p99.9"] * 1000,
            "rps": report["summary"]["requestsPerSec"], "steal": steal_percent(ticks)}


def wait_accepted(url, key, seconds=120):
    """Waits until the gateway at `url` takes `key`: a gateway reads its
    runtime keys from the store after it starts listening."""
    import urllib.error
    import urllib.request
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        request = urllib.request.Request(url, method="POST", headers={"authorization": f"Bearer {key}"})
        try:
            urllib.request.urlopen(request, timeout=5)
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise SystemExit(f"{url} did not accept the bench key")


def wait_answered(port, seconds=300):
    """Waits until the LiteLLM proxy on `port` answers a chat request: its
    workers start well after it listens."""
    import urllib.error
    import urllib.request
    deadline = time.monotonic() + seconds
    answered = 0
    while answered < 4:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
                                         data=short_chat_body().encode(),
                                         headers={"authorization": f"Bearer {LITELLM_BENCH_KEY}",
                                                  "content-type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=30)
            answered += 1
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise SystemExit(f"the LiteLLM proxy on port {port} did not answer")
            time.sleep(1)


def instructions_per_request(command, port, what, url, script, out, env=None, ready=None):
    """User-space instructions per request of a server run under callgrind,
    counted over a wrk run after a warm-up."""
    # A prefix of this run's own, so that no other valgrind on the machine
    # answers callgrind_control.
    prefix = f"--vgdb-prefix={out}.vgdb"
    detail = ["--dump-instr=yes"] if os.environ.get("BENCH_KEEP_DUMPS") else []
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", *detail, prefix, f"--callgrind-out-file={out}", *command],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    control = lambda action: subprocess.run(["callgrind_control", prefix, action, str(proc.pid)],
                                            capture_output=True, check=True, timeout=120)
    try:
        wait_for(port, what + " under callgrind", seconds=120)
        if ready:
            ready()
        load = lambda duration: subprocess.run(
            ["wrk", "-t1", f"-c{COUNTED_CONNECTIONS}", f"-d{duration}", "-s", script, url],
            capture_output=True, text=True, check=True, timeout=120).stdout
        load(WARMUP)
        control("--zero")
        requests = re.search(r"(\d+) requests in", load(COUNTED_DURATION))
        control("--dump")
        with open(f"{out}.1") as dump:
            total = re.search(r"^totals: (\d+)", dump.read(), re.M)
        # BENCH_KEEP_DUMPS=DIR keeps each case's profile, for callgrind_annotate.
        if os.environ.get("BENCH_KEEP_DUMPS"):
            os.makedirs(os.environ["BENCH_KEEP_DUMPS"], exist_ok=True)
            shutil.copy(f"{out}.1", os.path.join(os.environ["BENCH_KEEP_DUMPS"], f"case{what.split('.')[0]}.callgrind"))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if not requests or not total or int(requests.group(1)) == 0:
        raise RuntimeError("wrk or callgrind reported no count")
    return int(total.group(1)) / int(requests.group(1))


def machine_ticks():
    """(steal, total) CPU ticks of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(n) for n in f.readline().split()[1:9]]
    return fields[7], sum(fields)


def steal_percent(before):
    """The share of CPU time the hypervisor took from this machine since `before`."""
    steal, total = machine_ticks()
    return 100.0 * (steal - before[0]) / max(total - before[1], 1)


def cpu_seconds(pids):
    """User plus system CPU time of these processes and their children."""
    family, total = set(pids), 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(entry) in family or int(fields[1]) in family:
                total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


PEERS_DIR = os.path.join(ROOT, "benches/peers")
WITH_LITELLM = "litellm" in os.environ.get("BENCH_PEERS", "").split(",")
# BENCH_ONLY_CALLGRIND=1: only the instructions-per-request table, printed and
# not written to benches/results/latest.md (no wrk rounds, no oha, no
# exactness runs), for working on one path.
ONLY_CALLGRIND = os.environ.get("BENCH_ONLY_CALLGRIND", "0") != "0"
LITELLM_VENV = os.path.join(ROOT, "target/litellm-venv")
# The exactness runs: this many requests at once, split across two instances
# of a gateway in front of one store, against an org's limit of EXACT_LIMIT.
EXACT_REQUESTS = 500
EXACT_LIMIT = 100
# LiteLLM's keys (custom_auth.py): the bench key's limits are out of reach,
# the exact key's rpm is EXACT_LIMIT.
LITELLM_BENCH_KEY = "sk-bench"
LITELLM_EXACT_KEY = "sk-exact"


def fill(template, **values):
    """A peer's config from its template in benches/peers/: each @name@
    replaced (their own braces and dollars left alone)."""
    with open(os.path.join(PEERS_DIR, template)) as f:
        text = f.read()
    for name, value in values.items():
        text = text.replace(f"@{name}@", str(value))
    leftover = re.search(r"@[a-z_]+@", text)
    if leftover:
        raise SystemExit(f"{template}: {leftover.group(0)} not filled in")
    return text


def short_chat_body():
    # 1 KB (1,024 bytes) for the LiteLLM case and tollgate's beside it.
    body = {"model": "gpt-4o", "max_tokens": 64, "messages": [
        {"role": "system", "content": "You are a careful financial analyst."},
        {"role": "user", "content": ""}]}
    filler = "Summarise the quarterly revenue figures for the EMEA region and flag anomalies. "
    empty = len(json.dumps(body, separators=(",", ":")))
    body["messages"][1]["content"] = (filler * 20)[:1024 - empty]
    return json.dumps(body, separators=(",", ":"))


def admitted(ports, request, total=EXACT_REQUESTS):
    """Sends `total` requests at once, each on its own connection, dealt in
    turn to the servers on `ports`; answers how many were admitted (2xx), how
    many refused (4xx) and how many failed otherwise."""
    import asyncio

    async def one(port, go):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await go.wait()
            return "error"
        await go.wait()
        try:
            writer.write(request)
            await writer.drain()
            status = await asyncio.wait_for(reader.readline(), timeout=120)
            writer.close()
            code = status.split()[1:2]
            return {b"2": "admitted", b"4": "refused"}.get(code[0][:1] if code else b"", "error")
        except (OSError, asyncio.TimeoutError):
            return "error"

    async def run():
        go = asyncio.Event()
        tasks = [asyncio.create_task(one(ports[i % len(ports)], go)) for i in range(total)]
        # Every connection open first, then every request sent at once.
        await asyncio.sleep(2)
        go.set()
        return await asyncio.gather(*tasks)

    answers = asyncio.run(run())
    return {kind: answers.count(kind) for kind in ("admitted", "refused", "error")}


def http_request(path, headers, body=b""):
    lines = [f"POST {path} HTTP/1.1", "host: 127.0.0.1", f"content-length: {len(body)}", "connection: close",
             *[f"{name}: {value}" for name, value in headers.items()]]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def times(ratio):
    # Two decimals, or two significant figures for the Python peer's.
    return f"{ratio:.2f}" if ratio >= 0.1 else f"{ratio:.2g}"


def admitted_cell(figure):
    if not figure:
        return "–"
    counts, how = figure
    failed = f", {counts['error']} failed" if counts["error"] else ""
    return f"{counts['admitted']} ({how}{failed})"


def litellm_version():
    out = subprocess.run([os.path.join(LITELLM_VENV, "bin/python"), "-c",
                          "from importlib.metadata import version; print(version('litellm'))"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "?"


def install_litellm():
    """The pinned LiteLLM proxy in a venv of its own under target/, once."""
    python = os.path.join(LITELLM_VENV, "bin/python")
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", LITELLM_VENV], check=True)
    requirements = os.path.join(PEERS_DIR, "litellm-requirements.txt")
    constraints = os.path.join(PEERS_DIR, "litellm-constraints.txt")
    stamp = os.path.join(LITELLM_VENV, "installed-requirements.txt")
    wanted = "".join(open(path).read() for path in (requirements, constraints))
    if not os.path.exists(stamp) or open(stamp).read() != wanted:
        print("installing the LiteLLM proxy (some minutes)", file=sys.stderr)
        subprocess.run([python, "-m", "pip", "install", "-q", "-r", requirements, "-c", constraints], check=True)
        with open(stamp, "w") as f:
            f.write(wanted)
    return os.path.join(LITELLM_VENV, "bin/litellm")


def main():
    work = tempfile.mkdtemp(prefix="tollgate-bench-")
    procs = []

    def start(args, port, what, seconds=30, **kw):
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
        procs.append(proc)
        wait_for(port, what, seconds)
        return proc

    def haproxy_config(port, threads):
        path = f"{work}/haproxy-{port}.cfg"
        with open(path, "w") as f:
            f.write(fill("haproxy.cfg", threads=threads, port=port, upstream=ports["upstream"],
                         limits=os.path.join(PEERS_DIR, "limits.map")))
        # -db: in the foreground, one process.
        return ["haproxy", "-f", path, "-db"]

    def nginx_lua_config(port, single=False):
        directory = f"{work}/nginx-lua-{port}"
        os.makedirs(directory, exist_ok=True)
        text = fill("nginx-lua.conf", dir=directory, peers=PEERS_DIR, upstream=ports["upstream"], port=port,
                    redis=ports["redis"])
        if single:
            text = text.replace("worker_processes auto;", "worker_processes 1;\nmaster_process off;")
        with open(f"{directory}/nginx.conf", "w") as f:
            f.write(text)
        return ["nginx", "-c", f"{directory}/nginx.conf", "-g", "daemon off;"]

    def start_litellm(port):
        # custom_auth.py is found beside the config file.
        directory = f"{work}/litellm-{port}"
        os.makedirs(directory)
        shutil.copy(os.path.join(PEERS_DIR, "litellm_auth.py"), directory)
        with open(f"{directory}/config.yaml", "w") as f:
            f.write(fill("litellm.yaml", upstream=ports["upstream"], redis=ports["redis"]))
        return start([litellm, "--config", f"{directory}/config.yaml", "--host", "127.0.0.1", "--port", str(port),
                      "--num_workers", str(os.cpu_count()),
                      # A worker starts in tens of seconds on a busy machine;
                      # past uvicorn's 5 s it is killed and started again.
                      "--timeout_worker_healthcheck", "300"], port, "the LiteLLM proxy", seconds=300,
                     cwd=directory, env={**os.environ, "LITELLM_LOG": "ERROR",
                                                    "LITELLM_LOCAL_MODEL_COST_MAP": "True"})

    def exactness():
        """EXACT_REQUESTS at once against a limit of EXACT_LIMIT: on two
        instances of each gateway that shares a store, on one of each that
        keeps its counters in its own memory. Answers each case's figure."""
        run = http_request("/run", {"x-org-id": "org_exact"})
        chat = http_request("/v1/chat/completions", {"authorization": f"Bearer {LITELLM_EXACT_KEY}",
                                                     "content-type": "application/json"},
                            short_chat_body().encode())
        second = {name: free_port() for name in ["redis_gw", "nginx_lua", "litellm"]}
        trials = []
        if 4 in wanted:
            trials.append((4, "one instance", lambda: [ports["memory"]], run))
        if 5 in wanted:
            def tollgate_pair():
                path = f"{work}/redis_gw-second.toml"
                with open(path, "w") as f:
                    f.write(TOLLGATE.format(port=second["redis_gw"], backend="redis", upstream=ports["upstream"],
                                            store_url=f'url = "redis://127.0.0.1:{ports["redis"]}"'))
                start([os.path.join(ROOT, "target/release/tollgate"), "run", "--config", path], second["redis_gw"],
                      "a second tollgate (redis)", env={**os.environ, "RUST_LOG": "warn"})
                return [ports["redis_gw"], second["redis_gw"]]
            trials.append((5, "two instances", tollgate_pair, run))
        if 11 in wanted:
            # A stick table is the instance's own: a second HAProxy would
            # admit its own 100.
            trials.append((11, "one instance: the table is per instance", lambda: [ports["haproxy"]], run))
        if 14 in wanted:
            def nginx_lua_pair():
                start(nginx_lua_config(second["nginx_lua"]), second["nginx_lua"], "a second nginx + Lua")
                return [ports["nginx_lua"], second["nginx_lua"]]
            trials.append((14, "two instances", nginx_lua_pair, run))
        if WITH_LITELLM and 15 in wanted:
            def litellm_pair():
                start_litellm(second["litellm"])
                wait_answered(second["litellm"])
                return [ports["litellm"], second["litellm"]]
            trials.append((15, "two instances; rpm limit", litellm_pair, chat))
        figures = {}
        for case, how, targets, request in trials:
            started = len(procs)
            ports_of_case = targets()
            began = time.monotonic()
            counts = admitted(ports_of_case, request)
            figures[case] = (counts, how)
            # LiteLLM's rpm window opens at the first request and lasts 60 s:
            # a run shorter than that is within one window.
            print(f"exactness, case {case} ({how}): {counts} in {time.monotonic() - began:.1f} s", file=sys.stderr)
            # The second instance stopped, so as not to weigh on what follows.
            for proc in procs[started:]:
                proc.terminate()
                proc.wait(timeout=30)
        return figures

    try:
        litellm = install_litellm() if WITH_LITELLM else None
        ports = {name: free_port() for name in ["upstream", "redis", "nginx", "bare", "memory", "redis_gw",
                                                "keys_1", "keys_100k", "keys_grown", "haproxy", "nginx_lua", "litellm"]}
        upstream = start([os.path.join(ROOT, "target/release/examples/bench_upstream"), f"127.0.0.1:{ports['upstream']}"],
              ports["upstream"], "the stand-in upstream")
        redis = start(["redis-server", "--port", str(ports["redis"]), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
              ports["redis"], "redis-server")
        with open(f"{work}/nginx.conf", "w") as f:
            f.write(NGINX.format(dir=work, upstream=ports["upstream"], port=ports["nginx"]))
        nginx = start(["nginx", "-c", f"{work}/nginx.conf", "-g", "daemon off;"], ports["nginx"], "nginx")
        bare = start([os.path.join(ROOT, "target/release/examples/bare_proxy"), f"127.0.0.1:{ports['bare']}",
                      f"127.0.0.1:{ports['upstream']}", str(os.cpu_count())], ports["bare"], "the bare hyper proxy")
        peers = {"haproxy": start(haproxy_config(ports["haproxy"], os.cpu_count()), ports["haproxy"], "haproxy"),
                 "nginx_lua": start(nginx_lua_config(ports["nginx_lua"]), ports["nginx_lua"], "nginx + Lua")}
        if WITH_LITELLM:
            peers["litellm"] = start_litellm(ports["litellm"])
            wait_answered(ports["litellm"])
        gateways = {}
        for name, backend, url in [("memory", "memory", ""),
                                   ("redis_gw", "redis", f'url = "redis://127.0.0.1:{ports["redis"]}"')]:
            path = f"{work}/{name}.toml"
            with open(path, "w") as f:
                f.write(TOLLGATE.format(port=ports[name], backend=backend, store_url=url, upstream=ports["upstream"]))
            gateways[name] = start([os.path.join(ROOT, "target/release/tollgate"), "run", "--config", path],
                                   ports[name], f"tollgate ({backend})", env={**os.environ, "RUST_LOG": "warn"})
        import hashlib
        last_key = seed_runtime_keys(ports["redis"], "bench100k", RUNTIME_KEYS)
        keyed = lambda port, prefix: TOLLGATE_KEYED.format(
            port=port, backend="redis", store_url=f'url = "redis://127.0.0.1:{ports["redis"]}"',
            upstream=ports["upstream"], key_sha256=hashlib.sha256(BENCH_KEY.encode()).hexdigest(), key_prefix=prefix)
        for name, prefix in [("keys_1", "bench1"), ("keys_100k", "bench100k"), ("keys_grown", "benchgrown")]:
            path = f"{work}/{name}.toml"
            with open(path, "w") as f:
                f.write(keyed(ports[name], prefix) if name != "keys_grown" else grown(keyed(ports[name], prefix)))
            gateways[name] = start([os.path.join(ROOT, "target/release/tollgate"), "run", "--config", path],
                                   ports[name], f"tollgate ({name})", env={**os.environ, "RUST_LOG": "warn"})
        keys = {"file_key": BENCH_KEY, "last_runtime_key": last_key}
        wait_accepted(f"http://127.0.0.1:{ports['keys_1']}/run", BENCH_KEY)
        wait_accepted(f"http://127.0.0.1:{ports['keys_100k']}/run", last_key)
        wait_accepted(f"http://127.0.0.1:{ports['keys_grown']}/run", BENCH_KEY)
        scripts = {}
        for name, text in [("post", LUA_POST.format(org="org_bench")), ("broke", LUA_POST.format(org="org_broke")),
                           ("chat", LUA_CHAT.format(body=chat_body())), ("file_key", LUA_KEYED.format(key=BENCH_KEY)),
                           ("last_runtime_key", LUA_KEYED.format(key=last_key)),
                           ("chat_1k", LUA_CHAT.format(body=short_chat_body())),
                           ("litellm_chat", LUA_LITELLM.format(key=LITELLM_BENCH_KEY, body=short_chat_body()))]:
            scripts[name] = f"{work}/{name}.lua"
            with open(scripts[name], "w") as f:
                f.write(text)

        base = lambda name: f"http://127.0.0.1:{ports[name]}"
        pids = {"upstream": upstream.pid, "nginx": nginx.pid, "bare": bare.pid,
                **{name: gateway.pid for name, gateway in gateways.items()},
                **{name: peer.pid for name, peer in peers.items()}}
        cases = [
            ("1. upstream directly (ceiling)", "upstream", "/run", "post"),
            ("2. nginx proxy_pass (peer)", "nginx", "/run", "post"),
            ("3. tollgate, unmetered route", "memory", "/unmetered", "post"),
            ("4. tollgate, fixed cost, memory store", "memory", "/run", "post"),
            ("5. tollgate, fixed cost, redis store", "redis_gw", "/run", "post"),
            ("6. tollgate, estimate 4 KB chat + usage, redis", "redis_gw", "/v1/chat/completions", "chat"),
            ("7. tollgate, 402 path (all denied), redis", "redis_gw", "/run", "broke"),
            # What hyper and tokio cost with no gateway code at all: the
            # least case 3 could cost on these crates.
            ("8. bare hyper proxy (floor of 3)", "bare", "/run", "post"),
            # The org from a gateway API key: the one key in the file, then the
            # last of 100,000 runtime keys in the store's catalog.
            ("9. tollgate, fixed cost, API key (1 key), redis", "keys_1", "/run", "file_key"),
            (f"10. tollgate, fixed cost, API key (last of {RUNTIME_KEYS:,} runtime keys), redis", "keys_100k", "/run",
             "last_runtime_key"),
            # The peers, each doing the work of a tollgate case (PEER_OF).
            ("11. HAProxy, fixed cost, stick table in memory (peer)", "haproxy", "/run", "post"),
            ("12. HAProxy, all denied (peer)", "haproxy", "/run", "broke"),
            ("13. HAProxy, unmetered (peer)", "haproxy", "/unmetered", "post"),
            ("14. nginx + Lua, fixed cost, EVALSHA check-and-increment in redis (peer)", "nginx_lua", "/run", "post"),
        ]
        if WITH_LITELLM:
            cases += [
                (f"15. LiteLLM {litellm_version()} proxy, 1 KB chat + usage, rpm/tpm limits in redis (peer)", "litellm",
                 "/v1/chat/completions", "litellm_chat"),
            ]
        cases += [("16. tollgate, estimate 1 KB chat + usage, redis", "redis_gw", "/v1/chat/completions", "chat_1k")]
        cases += [(f"17. tollgate, fixed cost, API key, {GROWN_ROUTES:,} routes before the hit and {GROWN_KEYS:,} file "
                   "keys, redis", "keys_grown", "/run", "file_key")]
        cases += [("18. tollgate, 402 path (all denied), memory store", "memory", "/run", "broke")]
        # BENCH_CASES=2,5 runs a subset while working on one path; nginx (2)
        # always runs, as every ratio is taken against it.
        wanted = {int(n) for n in os.environ.get("BENCH_CASES", ",".join(str(n) for n in range(1, 19))).split(",")}
        wanted |= {2}
        # Every case runs once per round, rounds one after another, and each
        # figure reported is the median over the rounds: on a shared machine
        # the same case moves by 20% from one minute to the next, and a ratio
        # taken within one round cancels most of that drift.
        runs = {}
        for round_number in range(1, 0 if ONLY_CALLGRIND else ROUNDS + 1):
            for title, server, path, script in cases:
                if int(title.split(".")[0]) not in wanted:
                    continue
                result = wrk(base(server) + path, scripts[script], [pids[server]], [redis.pid])
                runs.setdefault(title, []).append(result)
                print(f"round {round_number}: {title}: {result['rps']:.0f} req/s, p99 {result['p99_ms']:.2f} ms, "
                      f"{result['cpu_us']:.1f} µs CPU/request (+{result['redis_us']:.1f} redis)", file=sys.stderr)
        nginx_runs = runs.get("2. nginx proxy_pass (peer)", [])
        numbered = {int(title.split(".")[0]): title for title in runs}
        results = []
        for title, samples in runs.items():
            ratios = [r["rps"] / n["rps"] for r, n in zip(samples, nginx_runs)]
            result = {key: median([r[key] for r in samples]) for key in samples[0]} | {
                "ratio": median(ratios), "ratio_low": min(ratios), "ratio_high": max(ratios)}
            peer = numbered.get(PEER_OF.get(int(title.split(".")[0])))
            if peer:
                # Within each round, as the ratio to nginx is.
                rps = [r["rps"] / p["rps"] for r, p in zip(samples, runs[peer])]
                cpu = [(r["cpu_us"] + r["redis_us"]) / (p["cpu_us"] + p["redis_us"])
                       for r, p in zip(samples, runs[peer])]
                result |= {"peer": peer.split(".")[0], "peer_rps": median(rps), "peer_rps_low": min(rps),
                           "peer_rps_high": max(rps), "peer_cpu": median(cpu)}
            results.append((title, result))

        exact = exactness() if os.environ.get("BENCH_EXACT", "1") != "0" and not ONLY_CALLGRIND else {}

        latency = []
        if shutil.which("oha") and os.environ.get("BENCH_OHA", "1") != "0" and not ONLY_CALLGRIND:
            targets = [("1. upstream", base("upstream") + "/run"), ("2. nginx", base("nginx") + "/run"),
                       ("5. tollgate redis", base("redis_gw") + "/run")]
            for rate in (5000, 10000):
                samples = {title: [] for title, _ in targets}
                for _ in range(ROUNDS):
                    for title, url in targets:
                        samples[title].append(oha(url, rate))
                for title, _ in targets:
                    latency.append((title, rate, {key: median([r[key] for r in samples[title]])
                                                  for key in samples[title][0]}))
        rss = {name: peak_rss_mb(proc.pid) for name, proc in gateways.items()}

        counted = []
        if shutil.which("valgrind") and os.environ.get("BENCH_CALLGRIND", "1") != "0":
            # One worker each, so that the counts compare like for like.
            port = free_port()
            with open(f"{work}/nginx-counted.conf", "w") as f:
                f.write(NGINX.replace("worker_processes auto;", "worker_processes 1;\nmaster_process off;")
                        .format(dir=f"{work}/counted", upstream=ports["upstream"], port=port))
            os.makedirs(f"{work}/counted")
            servers = {
                "nginx": (["nginx", "-c", f"{work}/nginx-counted.conf", "-g", "daemon off;"], None),
                "bare": ([os.path.join(ROOT, "target/release/examples/bare_proxy"), f"127.0.0.1:{port}",
                          f"127.0.0.1:{ports['upstream']}", "1"], None),
            }
            for name, backend, url in [("memory", "memory", ""),
                                       ("redis_gw", "redis", f'url = "redis://127.0.0.1:{ports["redis"]}"')]:
                path = f"{work}/{name}-counted.toml"
                with open(path, "w") as f:
                    f.write(TOLLGATE.format(port=port, backend=backend, store_url=url, upstream=ports["upstream"])
                            .replace("[server]", "[server]\nworkers = 1"))
                servers[name] = ([os.path.join(ROOT, "target/release/tollgate"), "run", "--config", path],
                                 {**os.environ, "RUST_LOG": "warn"})
            for name, prefix in [("keys_1", "bench1"), ("keys_100k", "bench100k"), ("keys_grown", "benchgrown")]:
                path = f"{work}/{name}-counted.toml"
                config = keyed(port, prefix) if name != "keys_grown" else grown(keyed(port, prefix))
                with open(path, "w") as f:
                    f.write(config.replace("[server]", "[server]\nworkers = 1"))
                servers[name] = ([os.path.join(ROOT, "target/release/tollgate"), "run", "--config", path],
                                 {**os.environ, "RUST_LOG": "warn"})
            servers["haproxy"] = (haproxy_config(port, 1), None)
            servers["nginx_lua"] = (nginx_lua_config(port, single=True), None)
            for title, server, path, script in sorted(cases, key=lambda case: case[1] != "nginx"):
                if server not in servers or int(title.split(".")[0]) not in wanted:
                    continue
                command, env = servers[server]
                # A case that cannot be counted loses its row, not the run.
                try:
                    url = f"http://127.0.0.1:{port}{path}"
                    ready = (lambda: wait_accepted(url, keys[script])) if script in keys else None
                    count = instructions_per_request(command, port, title, url, scripts[script],
                                                     f"{work}/callgrind.{len(counted)}", env, ready)
                except (subprocess.SubprocessError, OSError, RuntimeError, SystemExit) as error:
                    print(f"{title}: not counted under callgrind: {error!r}", file=sys.stderr)
                    continue
                counted.append((title, count))
                print(f"{title}: {count:.0f} instructions/request", file=sys.stderr)
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        "# tollgate load benchmark",
        "",
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; {os.cpu_count()} cores, {cpu_model()}; "
        f"{platform.system()} {platform.release()}. wrk -t2 -c{CONNECTIONS}, {WARMUP} warm-up, {DURATION} per case, "
        f"{ROUNDS} rounds; every figure is the median over the rounds (× nginx: the median of the ratios within "
        "each round, with their range). All processes on one machine, over loopback, sharing its cores. "
        "CPU µs/req: the proxy's (tollgate's, nginx's or the bare proxy's; in case 1 the upstream's own) user + system time over the "
        "measured run, per request. "
        "Steal: the share of the machine's CPU time its hypervisor took during the run. "
        "Redis CPU µs/req: redis-server's, the store's share (in the memory-store and HAProxy cases it has "
        "nothing to do). Instructions/req: the server's own under callgrind (below; LiteLLM, in Python, is not "
        "counted). The ÷ peer columns divide a tollgate case's figure by that of the peer case doing the same "
        "work (column peer): requests/s within each round (median, range), CPU as proxy + redis, instructions. "
        f"Admitted: of {EXACT_REQUESTS} requests sent at once against an org's limit of {EXACT_LIMIT}, split "
        "across two instances in front of one redis-server where the gateway shares a store; HAProxy's stick "
        "table and tollgate's memory store are each instance's own, so one instance is sent them all.",
        "",
        "| case | requests/s | × nginx | range | p99 (ms) | non-2xx | proxy CPU µs/req | redis CPU µs/req "
        "| instructions/req | peer | req/s ÷ peer | CPU ÷ peer | instr ÷ peer | admitted | steal % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    counts = {int(title.split(".")[0]): count for title, count in counted}
    for title, r in results:
        number = int(title.split(".")[0])
        instructions = f"{counts[number]:,.0f}" if number in counts else (
            "(Python)" if "LiteLLM" in title else "–")
        peer = r.get("peer")
        versus = (f"| {peer} | {times(r['peer_rps'])} ({times(r['peer_rps_low'])}–{times(r['peer_rps_high'])}) "
                  f"| {times(r['peer_cpu'])} | " + (times(counts[number] / counts[int(peer)])
                                                    if number in counts and int(peer) in counts else "–")
                  if peer else "| – | – | – | –")
        lines.append(f"| {title} | {r['rps']:.0f} | {times(r['ratio'])} "
                     f"| {times(r['ratio_low'])}–{times(r['ratio_high'])} "
                     f"| {r['p99_ms']:.2f} | {r['non2xx']:.0f} | {r['cpu_us']:.1f} | {r['redis_us']:.1f} "
                     f"| {instructions} {versus} | {admitted_cell(exact.get(number))} | {r['steal']:.0f} |")
    if latency:
        lines += ["", f"Open loop (oha, latency-corrected, {CONNECTIONS} connections), fixed rates, median of "
                  f"{ROUNDS} rounds; added p99: over the upstream's at the same rate:", "",
                  "| case | rate/s | achieved/s | p50 (ms) | p99 (ms) | p99.9 (ms) | added p99 (ms) | steal % |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        direct = {rate: r["p99"] for title, rate, r in latency if title.startswith("1.")}
        for title, rate, r in latency:
            lines.append(f"| {title} | {rate} | {r['rps']:.0f} | {r['p50']:.3f} | {r['p99']:.3f} | {r['p999']:.3f} "
                         f"| {r['p99'] - direct[rate]:.3f} | {r['steal']:.0f} |")
    if counted:
        lines += ["", f"Instructions per request (user space, valgrind's callgrind), one worker each, wrk -t1 "
                  f"-c{COUNTED_CONNECTIONS}, {COUNTED_DURATION} counted after a {WARMUP} warm-up. Unlike the times "
                  "above, these do not move with whatever else the machine's host runs. The Redis cases (tollgate's "
                  "and nginx + Lua's) count the gateway alone, not redis-server, and tollgate's at this light load "
                  "batch fewer reservations per script call than under full load. HAProxy runs one thread "
                  "(nbthread 1, -db), nginx one worker with no master process:", "",
                  "| case | instructions/request | × nginx | ÷ peer |", "|---|---:|---:|---:|"]
        nginx_count = next((count for title, count in counted if title.startswith("2.")), None)
        for title, count in counted:
            ratio = f"{count / nginx_count:.2f}" if nginx_count else "–"
            peer = PEER_OF.get(int(title.split(".")[0]))
            versus = f"{count / counts[peer]:.2f} (of {peer})" if peer in counts else "–"
            lines.append(f"| {title} | {count:,.0f} | {ratio} | {versus} |")
    lines += ["", "Peak RSS of tollgate over the run: " +
              ", ".join(f"{RSS_NAMES[k]} {v:.1f} MB" for k, v in rss.items()), ""]
    table = "\n".join(lines)
    print(table)
    if ONLY_CALLGRIND:
        return
    with open(os.path.join(ROOT, "benches/results/latest.md"), "w") as f:
        f.write(table)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
