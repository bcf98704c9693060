"""A no-op OTLP trace receiver for the benchmarks: `python -m bench._support.otlp_sink`.

It implements `opentelemetry.proto.collector.trace.v1.TraceService` over gRPC and throws every span away
after counting it per `service.name`, so a benchmark measures what exporting costs the services (building,
batching, serializing and sending spans) and not what a real collector does with them. It runs in a process
of its own so that its work neither slows the benchmark's load generator nor counts as the suite's CPU.

Protocol on stdio: it prints `listening PORT` once it serves (on 127.0.0.1, a free port), then answers each
`count` line on stdin with one JSON line `{"service.name": spans, …}`; end of stdin stops it.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: Counter[str] = Counter()
        self.lock = threading.Lock()

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,  # noqa: N802 (the proto's name)
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        counts: Counter[str] = Counter()
        for resource_spans in request.resource_spans:
            name = next((a.value.string_value for a in resource_spans.resource.attributes
                         if a.key == "service.name"), "?")
            counts[name] += sum(len(scope.spans) for scope in resource_spans.scope_spans)
        with self.lock:
            self.spans.update(counts)
        return trace_service_pb2.ExportTraceServiceResponse()


def main() -> None:
    sink = Sink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening {port}", flush=True)
    for line in sys.stdin:
        if line.strip() == "count":
            with sink.lock:
                print(json.dumps(dict(sink.spans)), flush=True)
    server.stop(0)


if __name__ == "__main__":
    main()
