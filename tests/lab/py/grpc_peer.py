#!/usr/bin/env python3
"""gRPC peers of the end-to-end tests (tests/e2e_http.rs), on grpcio.

No generated stubs: the service `lab.Echo` is registered with generic
handlers whose (de)serializers are the identity, so every message is raw
bytes (UTF-8 text here).

Server (one per backend namespace):
    grpc_peer.py serve --name backend0 --port 8080 [--delay-ms 0] [--max-age-ms 0]
  - /lab.Echo/Who     unary: answers the backend's name;
  - /lab.Echo/Peer    unary: answers the name and the address the call
                      came from ("backend0 ipv4:10.0.0.1:40000"): one
                      address per connection;
  - /lab.Echo/Slow    unary: sleeps the request's milliseconds, then
                      answers the name (calls kept in flight on purpose);
  - /lab.Echo/Fail    unary: aborts with INVALID_ARGUMENT "bad thing";
  - /lab.Echo/Count   server stream: the request is n, answers
                      "<name> 0" .. "<name> n-1".
  With --delay-ms every call first sleeps that long (a slow endpoint).
  With --max-age-ms gRPC's server sends GOAWAY on each connection once it
  is that old (grpc.max_connection_age_ms, as operators set to spread
  long-lived channels), and closes it 5 s later at the latest.

Clients (one process, ONE channel, i.e. one HTTP/2 connection, per run);
each prints one JSON object on stdout:
    grpc_peer.py who     --target IP:PORT --calls N
        {"counts": {name: n}, "errors": {code: n}, "first_error": str}
    grpc_peer.py fail    --target IP:PORT
        {"code": "INVALID_ARGUMENT", "details": "bad thing"}
    grpc_peer.py count   --target IP:PORT --n N
        {"received": n, "in_order": bool, "first_bad": str|null,
         "code": "OK", "details": ""}
    grpc_peer.py peers   --target IP:PORT --calls N --pace-ms MS
        N Peer calls, one every MS:
        {"counts": {name: n}, "errors": {code: n}, "first_error": str,
         "connections": number of addresses the calls came from}
    grpc_peer.py unavailable --target IP:PORT
        {"code": name, "code_value": int, "details": str}
    grpc_peer.py drain   --target IP:PORT --slow N --slow-ms MS
                         --after N --ready FILE --go FILE
        starts N Slow calls, writes FILE --ready once the servers report
        them running (sleeping), waits (bounded) for the file --go, then
        collects them and makes --after Who calls:
        {"slow": {"counts": .., "errors": ..}, "after": {...}}
"""

import argparse
import json
import os
import sys
import time
from concurrent import futures

import grpc

IDENT = (lambda b: b)
SERVICE = "lab.Echo"


def serve(args):
    name = args.name.encode()
    delay = args.delay_ms / 1000.0
    running_dir = args.running_dir

    def pause():
        if delay:
            time.sleep(delay)

    def who(request, context):
        pause()
        return name

    def slow(request, context):
        pause()
        ms = int(request.decode() or "0")
        marker = None
        if running_dir:
            marker = os.path.join(running_dir, "%s-%d-%d" % (args.name, os.getpid(), time.monotonic_ns()))
            with open(marker, "w") as f:
                f.write("running\n")
        time.sleep(ms / 1000.0)
        return name

    def peer(request, context):
        pause()
        return name + b" " + context.peer().encode()

    def fail(request, context):
        pause()
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad thing")

    def count(request, context):
        pause()
        n = int(request.decode() or "0")
        for i in range(n):
            yield b"%s %d" % (name, i)

    handlers = {
        "Who": grpc.unary_unary_rpc_method_handler(who, IDENT, IDENT),
        "Slow": grpc.unary_unary_rpc_method_handler(slow, IDENT, IDENT),
        "Peer": grpc.unary_unary_rpc_method_handler(peer, IDENT, IDENT),
        "Fail": grpc.unary_unary_rpc_method_handler(fail, IDENT, IDENT),
        "Count": grpc.unary_stream_rpc_method_handler(count, IDENT, IDENT),
    }
    options = [("grpc.so_reuseport", 0)]
    if args.max_age_ms:
        options += [("grpc.max_connection_age_ms", args.max_age_ms),
                    ("grpc.max_connection_age_grace_ms", 5000)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), options=options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port("0.0.0.0:%d" % args.port)
    server.start()
    print("serving", flush=True)
    server.wait_for_termination()


def channel(target):
    # One channel is one HTTP/2 connection to the target (no client-side
    # balancing: the target is one address).
    # No HTTP proxy of the machine either.
    return grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])


def code_name(code):
    return code.name if code is not None else "NONE"


def tally(results):
    counts, errors, first_error = {}, {}, None
    for r in results:
        if isinstance(r, grpc.RpcError):
            c = code_name(r.code())
            errors[c] = errors.get(c, 0) + 1
            if first_error is None:
                first_error = "%s: %s" % (c, r.details())
        else:
            k = r.decode()
            counts[k] = counts.get(k, 0) + 1
    return {"counts": counts, "errors": errors, "first_error": first_error}


def call(method, req, timeout):
    try:
        return method(req, timeout=timeout)
    except grpc.RpcError as e:
        return e


def who_calls(ch, n):
    who = ch.unary_unary("/lab.Echo/Who", request_serializer=IDENT, response_deserializer=IDENT)
    return tally([call(who, b"", 10) for _ in range(n)])


def cmd_who(args):
    with channel(args.target) as ch:
        out = who_calls(ch, args.calls)
    print(json.dumps(out))


def cmd_peers(args):
    results = []
    with channel(args.target) as ch:
        peer = ch.unary_unary("/lab.Echo/Peer", request_serializer=IDENT, response_deserializer=IDENT)
        for _ in range(args.calls):
            results.append(call(peer, b"", 10))
            time.sleep(args.pace_ms / 1000.0)
    addresses = {r.decode() for r in results if not isinstance(r, grpc.RpcError)}
    out = tally([r if isinstance(r, grpc.RpcError) else r.split(b" ", 1)[0] for r in results])
    out["connections"] = len(addresses)
    print(json.dumps(out))


def cmd_fail(args):
    with channel(args.target) as ch:
        fail = ch.unary_unary("/lab.Echo/Fail", request_serializer=IDENT, response_deserializer=IDENT)
        r = call(fail, b"", 10)
    if isinstance(r, grpc.RpcError):
        print(json.dumps({"code": code_name(r.code()), "details": r.details()}))
    else:
        print(json.dumps({"code": "OK", "details": r.decode()}))


def cmd_count(args):
    received, first_bad, code, details = 0, None, "OK", ""
    with channel(args.target) as ch:
        count = ch.unary_stream("/lab.Echo/Count", request_serializer=IDENT, response_deserializer=IDENT)
        try:
            for msg in count(str(args.n).encode(), timeout=30):
                text = msg.decode()
                if first_bad is None and text.rsplit(" ", 1)[-1] != str(received):
                    first_bad = "message %d was %r" % (received, text)
                received += 1
        except grpc.RpcError as e:
            code, details = code_name(e.code()), e.details()
    print(json.dumps({"received": received, "in_order": first_bad is None,
                      "first_bad": first_bad, "code": code, "details": details}))


def cmd_unavailable(args):
    with channel(args.target) as ch:
        who = ch.unary_unary("/lab.Echo/Who", request_serializer=IDENT, response_deserializer=IDENT)
        r = call(who, b"", 5)
    if isinstance(r, grpc.RpcError):
        code = r.code()
        print(json.dumps({"code": code_name(code), "code_value": code.value[0], "details": r.details()}))
    else:
        print(json.dumps({"code": "OK", "code_value": 0, "details": r.decode()}))


def cmd_drain(args):
    with channel(args.target) as ch:
        slow = ch.unary_unary("/lab.Echo/Slow", request_serializer=IDENT, response_deserializer=IDENT)
        calls = [slow.future(str(args.slow_ms).encode(), timeout=30) for _ in range(args.slow)]
        # Ready once the servers report every call running (bounded).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if len(os.listdir(args.running_dir)) >= args.slow or any(c.done() for c in calls):
                break
            time.sleep(0.01)
        with open(args.ready, "w") as f:
            f.write("%d\n" % len(os.listdir(args.running_dir)))
        deadline = time.monotonic() + 20
        while not os.path.exists(args.go) and time.monotonic() < deadline:
            time.sleep(0.01)
        results = []
        for c in calls:
            try:
                results.append(c.result())
            except grpc.RpcError as e:
                results.append(e)
        out = {"slow": tally(results), "after": who_calls(ch, args.after)}
    print(json.dumps(out))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--name", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--delay-ms", type=int, default=0)
    s.add_argument("--running-dir", default=None)
    s.add_argument("--max-age-ms", type=int, default=0)
    for c in ("who", "peers", "fail", "count", "unavailable", "drain"):
        sp = sub.add_parser(c)
        sp.add_argument("--target", required=True)
        sp.add_argument("--calls", type=int, default=300)
        sp.add_argument("--n", type=int, default=5000)
        sp.add_argument("--slow", type=int, default=12)
        sp.add_argument("--slow-ms", type=int, default=2000)
        sp.add_argument("--after", type=int, default=150)
        sp.add_argument("--pace-ms", type=int, default=0)
        sp.add_argument("--ready")
        sp.add_argument("--go")
        sp.add_argument("--running-dir")
    args = p.parse_args()
    {"serve": serve, "who": cmd_who, "peers": cmd_peers, "fail": cmd_fail, "count": cmd_count,
     "unavailable": cmd_unavailable, "drain": cmd_drain}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
