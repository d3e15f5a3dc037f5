#!/usr/bin/env python3
"""Minimal llmd client using only the Python standard library.

Usage: llmd_client.py PROFILE   (socket from $LLMD_SOCKET or the default path)
Prints {"server": ..., "headers": {...}} for the profile: enough to call the provider.
"""
import json
import os
import socket
import sys


def socket_path():
    if os.environ.get("LLMD_SOCKET"):
        return os.environ["LLMD_SOCKET"]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "llmd", "llmd.sock")
    return f"/tmp/llmd-{os.getuid()}/llmd.sock"


class Llmd:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.reader = self.sock.makefile("rb")
        self.next_id = 0

    def call(self, method, params=None):
        self.next_id += 1
        req = {"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params or {}}
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        while True:
            msg = json.loads(self.reader.readline())
            if msg.get("id") != self.next_id:
                continue  # a notification, or an answer to someone else's request
            if "error" in msg:
                err = msg["error"]
                raise RuntimeError(f"{err['message']} ({err.get('data', {}).get('kind')})")
            return msg["result"]


def main():
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(2)
    path = socket_path()
    try:
        client = Llmd(path)
    except OSError as e:
        print(f"llmd_client.py: cannot connect to llmd at {path}: {e.strerror or e}", file=sys.stderr)
        sys.exit(3)
    hello = client.call("hello", {"client": "llmd_client.py", "version": "1"})
    try:
        token = client.call("token", {"profile": sys.argv[1]})
    except RuntimeError as e:
        print(f"llmd_client.py: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"server": hello["server"], "headers": token["headers"]}))


if __name__ == "__main__":
    main()
