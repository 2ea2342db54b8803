"""Local HTTP servers that answer like the real ones, so that the real download code runs offline."""

import hashlib
import http.server
import threading
import time

HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FileServer:
    """Serves {path: bytes} on 127.0.0.1 with HTTP Range; can cut the first response after N bytes.

    It also answers like the Hugging Face Hub's `/{repo_type}s/{repo}/resolve/{revision}/{file}` does for
    huggingface_hub: HEAD and GET carry ETag, X-Repo-Commit, Content-Length and Accept-Ranges. `status`
    makes every request fail with that HTTP status (a broken server); `delay` holds every GET's body back that many
    seconds (a slow download); `headers` keeps each GET's request headers."""

    def __init__(self, files):
        self.files, self.cut_after, self.ranges, self.status, self.requests = files, None, [], None, []
        self.delay, self.headers = 0.0, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send_file_headers(self, body):
                self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
                self.send_header("X-Repo-Commit", HUB_COMMIT)
                self.send_header("Accept-Ranges", "bytes")

            def do_HEAD(self):
                server.requests.append(("HEAD", self.path))
                body = server.files.get(self.path)
                if server.status or body is None:
                    self.send_error(server.status or 404)
                    return
                self.send_response(200)
                self.send_file_headers(body)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()

            def do_GET(self):
                server.requests.append(("GET", self.path))
                server.headers.append(dict(self.headers))
                body = server.files.get(self.path)
                if server.status or body is None:
                    self.send_error(server.status or 404)
                    return
                start = 0
                if rng := self.headers.get("Range"):
                    server.ranges.append(rng)
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_file_headers(body)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                time.sleep(server.delay)
                if server.cut_after is not None:  # announce everything, send part, hang up
                    self.wfile.write(body[start : start + server.cut_after])
                    server.cut_after = None
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
