"""``imgrec serve``: the HTTP API and web page for a model directory (FastAPI, the ``serve`` extra, is imported
only when the command runs)."""
from __future__ import annotations

import argparse

from imgrec.cli.common import add_backend_option


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a model over HTTP: a JSON API and a web page",
        description="Serve a model directory: POST /v1/predict, GET /v1/model, /healthz, /readyz, "
                    "the web page at / and API docs at /docs. Concurrent requests are batched.")
    p.add_argument("--model", required=True, help="model directory (a run directory), or an exported .onnx file")
    p.add_argument("--which", default="best", choices=("best", "last"), help="which weights (default best)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests addressed to this host name (the Host header), e.g. the machine's "
                        "name on the network; repeatable; * answers any. By default only 127.0.0.1, localhost, "
                        "[::1] and the --host address are answered (others get 403: DNS rebinding)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages of this origin (scheme://host[:port]) use the API, with CORS headers; "
                        "repeatable; * allows any. By default requests from another site's pages get 403")
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch", type=int, default=32, help="images per forward pass (1 turns batching off)")
    g.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a request may wait for others to join its batch (default 5)")
    g = p.add_argument_group("limits")
    g.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body in MB (default 10)")
    g.add_argument("--max-files", type=int, default=32, help="images in one request (default 32)")
    g.add_argument("--queue-size", type=int, default=128,
                   help="images waiting for the model before requests get 503 (default 128)")
    g.add_argument("--timeout-s", type=float, default=10.0, help="per-request time limit → 504 (default 10)")
    g = p.add_argument_group("answers")
    g.add_argument("--accept-rate", type=float, metavar="RATE",
                   help="share of in-distribution images to answer; images less like the training images than "
                        "that share of the validation images get \"unknown\": true (default: the model's, 0.95)")
    g.add_argument("--no-unknown", action="store_true", help="never answer \"unknown\"")
    g.add_argument("--neighbours-data", "--neighbors-data", metavar="PATH",
                   help="where the training data is now, when it moved since training: the folder holding a named "
                        "dataset's files, or the image folder, CSV list or pack itself. ?neighbours=K shows the "
                        "training images nearest to an upload; without their files it answers labels and "
                        "similarities only")
    g.add_argument("--metrics", action="store_true",
                   help="answer GET /metrics in Prometheus' text format (requests by status, latency, batch sizes, "
                        "queue depth); off by default: the numbers show how busy the server is")
    g = p.add_argument_group("processes")
    g.add_argument("--workers", type=int, default=1, help="server processes, each with its own model (default 1)")
    g.add_argument("--threads", type=int, help="PyTorch threads per worker (default: CPU cores / workers)")
    g.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N, mps")
    add_backend_option(g)
    g.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    g.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="log one line per request (method, path, status; never bodies)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from imgrec.errors import ConfigError
    try:
        from imgrec.serve.app import ServeSettings, serve
    except ModuleNotFoundError as e:
        raise ConfigError(f"serving needs {e.name}: pip install 'imgrec[serve]'") from None

    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_upload_mb=args.max_upload_mb,
                             max_files=args.max_files, queue_size=args.queue_size, timeout_s=args.timeout_s,
                             accept_rate=args.accept_rate, unknown=not args.no_unknown, metrics=args.metrics,
                             neighbours_data=args.neighbours_data, allowed_hosts=args.allow_host,
                             allowed_origins=args.allow_origin)
    if args.no_unknown and args.accept_rate is not None:
        raise ConfigError("--accept-rate and --no-unknown contradict each other: give one")
    try:
        serve(args.model, settings, host=args.host, port=args.port, workers=args.workers, which=args.which,
              device=args.device, threads=args.threads, backend=args.backend, log_level=args.log_level,
              access_log=args.access_log)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown: a normal end for a server
        pass
    except ModuleNotFoundError as e:  # raised while loading, before listening: PyTorch is not installed
        if (e.name or "").split(".")[0] != "torch":
            raise
        raise ConfigError("the PyTorch backend needs torch, which is not installed here; export the model where it "
                          "is (imgrec export --model DIR) and serve DIR/model.onnx with --backend onnxruntime"
                          ) from None
    return 0
