"""A real HTTP server over a directory, on a free loopback port, in a background thread."""

import functools
import http.server
import threading


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler without per-request log lines; records request paths."""

    requests = None  # set per server: list of (method, path, headers)

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass

    def send_head(self):
        if self.requests is not None:
            self.requests.append((self.command, self.path, dict(self.headers)))
        return super().send_head()


class HttpServer:
    """Serves ``directory``; ``url(name)`` is a file's URL; ``requests`` lists what was asked."""

    def __init__(self, directory, handler=QuietHandler):
        self.requests = []
        handler_class = type("Handler", (handler,), {"requests": self.requests})
        self.server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(handler_class, directory=str(directory))
        )
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self):
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, name):
        return f"{self.base_url}/{name.lstrip('/')}"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
