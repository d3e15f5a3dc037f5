#!/usr/bin/env python3
"""Offline stand-in for Anthropic's OAuth token endpoint and Messages API.

One listener on 127.0.0.1 serves three roles:

* plain HTTP: llmd talks to it directly (`token_endpoint = "http://127.0.0.1:PORT/v1/oauth/token"`);
* HTTP CONNECT proxy with TLS interception: Claude Code runs with
  `HTTPS_PROXY=http://127.0.0.1:PORT` and `NODE_EXTRA_CA_CERTS=<ca.pem>`; every CONNECT is
  answered with the leaf certificate given on the command line (made by run.sh at run time,
  valid for platform.claude.com, api.anthropic.com, ...), and the requests inside the
  tunnel are served here — nothing ever leaves the machine;
* fake endpoints: `POST /v1/oauth/token` answers a refresh with new numbered tokens
  (`<prefix>-ACCESS-1`, `<prefix>-REFRESH-1`, ..., one hour, the requested scope), `POST /v1/messages` answers
  "hello from fake" (streamed or not), anything else `{}`.

Every request is appended to the log as one JSON object per line:
`{"t", "method", "host", "path", "user_agent", "authorization", "body"}` (the body only for
the token endpoint; for Messages only model/stream/max_tokens), and every token answer as
`{"t", "token_reply": N, "access_token": ...}`.

Optional control file (`--control PATH`, re-read on every request, JSON):
  {"reject_access_tokens": ["sk-ant-oat01-..."]}  Messages requests bearing one of these
                                                   tokens get a 401 authentication_error.

Standard library only.
"""
import argparse
import http.server
import json
import os
import socketserver
import ssl
import sys
import threading
import time
import urllib.parse

ap = argparse.ArgumentParser()
ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
ap.add_argument("--port-file", help="write the port here once listening")
ap.add_argument("--log", required=True)
ap.add_argument("--cert", required=True, help="leaf certificate (PEM) for intercepted TLS")
ap.add_argument("--key", required=True, help="leaf key (PEM)")
ap.add_argument("--control", help="optional JSON control file")
ap.add_argument("--token-prefix", default="FAKE", help="tag in the issued tokens")
args = ap.parse_args()

lock = threading.Lock()
counter = [0]

sslctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
sslctx.load_cert_chain(args.cert, args.key)


def log(entry):
    entry["t"] = time.time()
    line = json.dumps(entry) + "\n"
    with lock:
        with open(args.log, "a") as f:
            f.write(line)


def control():
    if not args.control:
        return {}
    try:
        with open(args.control) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    tunnel_host = None

    def log_message(self, *a):
        pass

    def do_CONNECT(self):
        log({"method": "CONNECT", "path": self.path})
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()
        try:
            conn = sslctx.wrap_socket(self.connection, server_side=True)
        except (ssl.SSLError, OSError) as e:
            log({"tls_error": str(e), "path": self.path})
            self.close_connection = True
            return
        self.tunnel_host = self.path
        self.connection = conn
        self.rfile = conn.makefile("rb", self.rbufsize)
        self.wfile = conn.makefile("wb", 0)
        self.close_connection = False
        while not self.close_connection:
            try:
                self.handle_one_request()
            except Exception as e:  # a client hanging up mid-request
                log({"err": str(e)})
                break
        self.close_connection = True

    def read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            return self.rfile.read(n)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                data += self.rfile.read(size)
                self.rfile.readline()
            return data
        return b""

    def reply(self, code, obj, ctype="application/json"):
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def handle_any(self):
        raw = self.read_body()
        path = self.path.split("?")[0]
        body = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                form = urllib.parse.parse_qs(raw.decode("latin1"))
                body = {k: v[0] for k, v in form.items()} if form else raw.decode("latin1")[:2000]
        is_token = path.endswith("/v1/oauth/token")
        logged = body
        if not is_token and isinstance(body, dict):
            logged = {k: body[k] for k in ("model", "stream", "max_tokens") if k in body}
        elif not is_token:
            logged = None
        log({"method": self.command, "host": self.tunnel_host or self.headers.get("Host"),
             "path": self.path, "user_agent": self.headers.get("User-Agent", ""),
             "authorization": self.headers.get("Authorization", ""), "body": logged})

        if is_token and self.command == "POST":
            if not isinstance(body, dict) or body.get("grant_type") != "refresh_token":
                self.reply(400, {"error": "unsupported_grant_type"})
                return
            if body.get("refresh_token") in control().get("reject_refresh_tokens", []):
                self.reply(400, {"error": "invalid_grant",
                                 "error_description": "Refresh token not found or invalid"})
                log({"token_refused": body.get("refresh_token")})
                return
            with lock:
                counter[0] += 1
                n = counter[0]
            access = "sk-ant-oat01-%s-ACCESS-%d" % (args.token_prefix, n)
            self.reply(200, {"access_token": access,
                             "refresh_token": "sk-ant-ort01-%s-REFRESH-%d" % (args.token_prefix, n),
                             "expires_in": 3600, "scope": body.get("scope") or "user:inference user:profile",
                             "token_type": "Bearer"})
            log({"token_reply": n, "access_token": access})
            return

        if path.endswith("/v1/messages") and self.command == "POST":
            bearer = self.headers.get("Authorization", "")[len("Bearer "):]
            if bearer in control().get("reject_access_tokens", []):
                self.reply(401, {"type": "error", "error": {"type": "authentication_error",
                                                            "message": "OAuth token has expired."}})
                log({"messages_reply": 401})
                return
            model = body.get("model", "claude-x") if isinstance(body, dict) else "claude-x"
            if isinstance(body, dict) and body.get("stream"):
                events = [
                    ("message_start", {"type": "message_start", "message": {
                        "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                        "content": [], "stop_reason": None, "stop_sequence": None,
                        "usage": {"input_tokens": 5, "output_tokens": 1}}}),
                    ("content_block_start", {"type": "content_block_start", "index": 0,
                                             "content_block": {"type": "text", "text": ""}}),
                    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                             "delta": {"type": "text_delta", "text": "hello from fake"}}),
                    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                    ("message_delta", {"type": "message_delta",
                                       "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                       "usage": {"output_tokens": 3}}),
                    ("message_stop", {"type": "message_stop"}),
                ]
                data = "".join("event: %s\ndata: %s\n\n" % (e, json.dumps(o)) for e, o in events)
                self.reply(200, data.encode(), "text/event-stream")
            else:
                self.reply(200, {"id": "msg_fake", "type": "message", "role": "assistant",
                                 "model": model, "content": [{"type": "text", "text": "hello from fake"}],
                                 "stop_reason": "end_turn", "stop_sequence": None,
                                 "usage": {"input_tokens": 5, "output_tokens": 3}})
            return

        self.reply(200, {})

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = handle_any


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


srv = Server(("127.0.0.1", args.port), Handler)
if args.port_file:
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write("%d\n" % srv.server_address[1])
    os.rename(tmp, args.port_file)
print("fakeserver listening on 127.0.0.1:%d" % srv.server_address[1], file=sys.stderr, flush=True)
srv.serve_forever()
