#!/usr/bin/env python3
"""Serves the WebGPU check page on 127.0.0.1 and waits for its results.

GET /            index.html and the page's scripts (this directory)
GET /shaders/..  the directory `wattn shaders --emit` wrote
POST /log        one progress line from the page, printed to stdout
POST /results    the page's JSON results: written to --results, then the server exits

The chosen port is written to --port-file once the server listens (port 0: a free one).
Exits 0 after receiving the results, 2 if --timeout seconds pass without them.
"""

import argparse
import functools
import http.server
import os
import sys
import threading


class Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, page_dir, shaders_dir, on_results, **kwargs):
        self.page_dir = page_dir
        self.shaders_dir = shaders_dir
        self.on_results = on_results
        super().__init__(*args, directory=page_dir, **kwargs)

    def translate_path(self, path):
        path = path.split("?", 1)[0].split("#", 1)[0]
        if path.startswith("/shaders/"):
            name = os.path.basename(path)
            return os.path.join(self.shaders_dir, name)
        return super().translate_path(path)

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(204)
        self.end_headers()
        if self.path == "/log":
            print(body.decode("utf-8", "replace"), flush=True)
        elif self.path == "/results":
            self.on_results(body)

    def log_message(self, format, *args):
        pass  # keep the check's output to the page's own lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shaders", required=True, help="directory written by `wattn shaders --emit`")
    parser.add_argument("--results", required=True, help="file the page's JSON results are written to")
    parser.add_argument("--port-file", required=True, help="file the listening port is written to")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the results")
    args = parser.parse_args()

    done = threading.Event()

    def on_results(body):
        tmp = args.results + ".tmp"
        with open(tmp, "wb") as f:
            f.write(body)
        os.replace(tmp, args.results)
        done.set()

    handler = functools.partial(
        Handler,
        page_dir=os.path.dirname(os.path.abspath(__file__)),
        shaders_dir=os.path.abspath(args.shaders),
        on_results=on_results,
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with open(args.port_file + ".tmp", "w") as f:
        f.write(f"{server.server_address[1]}\n")
    os.replace(args.port_file + ".tmp", args.port_file)
    received = done.wait(args.timeout)
    server.shutdown()
    if not received:
        print(f"serve.py: no results from the page within {args.timeout:.0f} s", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
