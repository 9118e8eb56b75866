#!/usr/bin/env python3
"""HTTP/1.1 backend of the end-to-end tests (tests/e2e_http.rs).

    http_peer.py --name backend0 --port 8080 [--delay-ms 0]

Keep-alive HTTP/1.1 (threads, one per connection); every answer says
which backend gave it, in the body and in `X-Backend`:
  - GET (or HEAD) any path: 200, body "<name>\\n";
  - POST or PUT /sha256: reads the body (Content-Length or chunked), 200,
    body "<hex sha256 of the body> <name>\\n";
  - GET /headers: 200, body "<name>\n" then one line per
    `X-Forwarded-For` and `Forwarded` header received, `<name>: <value>`
    (lower-case name), in the order received;
  - a request with `Connection: Upgrade` and `Upgrade: websocket`: 101,
    then the connection is a raw tunnel: the backend writes
    "tunnel <name>\\n", then echoes every byte until EOF.
With --delay-ms every answer is sent that much later (a slow endpoint).
"""

import argparse
import hashlib
import http.server
import socketserver
import sys
import time


def make_handler(name, delay):
    body_name = (name + "\n").encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "lab-http"

        def log_message(self, fmt, *args):
            pass

        def pause(self):
            if delay:
                time.sleep(delay)

        def answer(self, code, body):
            self.send_response(code)
            self.send_header("X-Backend", name)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            self.wfile.flush()

        def is_upgrade(self):
            conn = [t.strip().lower() for t in self.headers.get("Connection", "").split(",")]
            return "upgrade" in conn and self.headers.get("Upgrade", "").lower() == "websocket"

        def tunnel(self):
            self.send_response(101, "Switching Protocols")
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("X-Backend", name)
            self.end_headers()
            self.wfile.write(b"tunnel " + body_name)
            self.wfile.flush()
            # read1 hands out what the request parser already buffered
            # first: those bytes belong to the tunnel too.
            while True:
                data = self.rfile.read1(65536)
                if not data:
                    break
                self.connection.sendall(data)
            self.close_connection = True

        def read_body(self):
            h = hashlib.sha256()
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                while True:
                    line = self.rfile.readline(1024)
                    size = int(line.split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                            pass
                        break
                    left = size
                    while left:
                        chunk = self.rfile.read(min(left, 65536))
                        if not chunk:
                            raise ConnectionError("EOF inside a chunk")
                        h.update(chunk)
                        left -= len(chunk)
                    self.rfile.readline(1024)
            else:
                left = int(self.headers.get("Content-Length", "0"))
                while left:
                    chunk = self.rfile.read(min(left, 65536))
                    if not chunk:
                        raise ConnectionError("EOF inside the body")
                    h.update(chunk)
                    left -= len(chunk)
            return h.hexdigest()

        def do_GET(self):
            self.pause()
            if self.is_upgrade():
                self.tunnel()
            elif self.path == "/headers":
                lines = [name]
                for k, v in self.headers.items():
                    if k.lower() in ("x-forwarded-for", "forwarded"):
                        lines.append("%s: %s" % (k.lower(), v))
                self.answer(200, ("\n".join(lines) + "\n").encode())
            else:
                self.answer(200, body_name)

        do_HEAD = do_GET

        def do_POST(self):
            digest = self.read_body()
            self.pause()
            self.answer(200, ("%s %s\n" % (digest, name)).encode())

        do_PUT = do_POST

    return Handler


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay-ms", type=int, default=0)
    args = p.parse_args()
    server = Server(("0.0.0.0", args.port), make_handler(args.name, args.delay_ms / 1000.0))
    print("serving", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
