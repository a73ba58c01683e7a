"""A stand-in OTLP/HTTP collector for the benchmark: answers every POST with an empty
ExportTraceServiceResponse (a protobuf message with no fields is zero bytes) and counts
requests and bytes, so a run with telemetry on measures the relay's export cost, not a
collector's. Usage: python3 bench/otlp_sink.py PORT COUNT_FILE"""
import http.server
import sys


class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a collector does
    requests = 0
    received = 0

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(n)
        Sink.requests += 1
        Sink.received += n
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()
        with open(sys.argv[2], "w") as f:
            f.write(f"{Sink.requests} {Sink.received}\n")

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer.daemon_threads = True
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
