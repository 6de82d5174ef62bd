"""A minimal stand-in for the Hugging Face Hub's HTTP API, served on localhost.

It implements the two endpoints the downloader uses:
  GET /api/models/<repo>/revision/<rev>?blobs=true   -> sha + siblings (size, blobId, lfs.sha256)
  GET /<repo>/resolve/<rev>/<file>                    -> file bytes, honouring `Range: bytes=N-`
and can misbehave on purpose: drop the connection part-way, or trickle bytes slowly.
"""

import hashlib
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WEIGHT_EXT = (".safetensors", ".bin", ".pt")


def files_from_dir(path):
    out = {}
    for root, _, names in os.walk(path):
        for n in names:
            full = os.path.join(root, n)
            out[os.path.relpath(full, path).replace(os.sep, "/")] = open(full, "rb").read()
    return out


class FakeHub:
    def __init__(self, repo_id, files, sha="0123456789abcdef0123456789abcdef01234567", drop_first_at=None,
                 trickle_s=0.0, corrupt=False):
        self.repo_id, self.files, self.sha = repo_id, files, sha
        self.drop_first_at = drop_first_at   # {filename: byte offset}: first GET of it stops there
        self.trickle_s = trickle_s           # sleep per 4 KiB chunk of weight files
        self.corrupt = corrupt               # serve flipped bytes (checksum must catch it)
        self.requests = []                   # (path, Range header or None)
        self.authorization = []              # Authorization header of each request
        self._dropped = set()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                hub.requests.append((self.path, self.headers.get("Range")))
                hub.authorization.append(self.headers.get("Authorization"))
                api = f"/api/models/{hub.repo_id}/revision/"
                res = f"/{hub.repo_id}/resolve/"
                if self.path.startswith(api):
                    return self._json({"id": hub.repo_id, "sha": hub.sha, "siblings": hub.siblings()})
                if self.path.startswith(res):
                    name = self.path[len(res):].split("/", 1)[1]
                    if name in hub.files:
                        return self._file(name)
                self.send_error(404)

            def _json(self, obj):
                body = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _file(self, name):
                data = hub.files[name]
                if hub.corrupt:
                    data = bytes(b ^ 0xFF for b in data)
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                stop = len(data)
                if name in (hub.drop_first_at or {}) and name not in hub._dropped:
                    hub._dropped.add(name)
                    stop = hub.drop_first_at[name]
                pos = start
                try:
                    while pos < stop:
                        n = min(4096, stop - pos)
                        self.wfile.write(data[pos:pos + n])
                        pos += n
                        if hub.trickle_s and name.endswith(WEIGHT_EXT):
                            self.wfile.flush()
                            time.sleep(hub.trickle_s)
                except (BrokenPipeError, ConnectionResetError):
                    return
                if stop < len(data):  # promised more than we send: the client sees a broken body
                    self.wfile.flush()
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def siblings(self):
        out = []
        for name, data in sorted(self.files.items()):
            s = {"rfilename": name, "size": len(data),
                 "blobId": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
            if name.endswith(WEIGHT_EXT):
                s["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            out.append(s)
        return out

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
