"""Load test for ``imgrec serve``: requests/s and p50/p99 latency at several concurrencies, with dynamic
batching on and off, for a small model and resnet18 at its small-image size.

    python benchmarks/serve_load.py                         # trains the two models first (a few minutes)
    python benchmarks/serve_load.py --simple runs/a --resnet runs/b --out benchmarks/results/serve_load.md

Each configuration runs a real ``imgrec serve`` process on 127.0.0.1 (loopback only) and a load generator in
this process: ``concurrency`` keep-alive connections, each sending one Fashion-MNIST PNG per request as the
raw body and waiting for the answer (a closed loop). Every level is bounded by a request count and a time
limit. "Batching off" is ``--max-batch 1``: the same server, one image per forward pass.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpuinfo  # noqa: E402


# -- a minimal HTTP/1.1 client: cheap enough that the load generator does not starve the server ------------
async def _one_connection(port: int, request: bytes, deadline: float, budget: list[int], latencies: list[float],
                          errors: list[str]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while budget[0] > 0 and time.perf_counter() < deadline:
            budget[0] -= 1
            t = time.perf_counter()
            writer.write(request)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                body = await reader.readexactly(int(m.group(1))) if m else b""
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                errors.append(type(e).__name__)
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            latencies.append(time.perf_counter() - t)
            if status != 200:
                errors.append(f"{status} {body[:80]!r}")
            if b"connection: close" in head.lower():
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
    finally:
        writer.close()


async def _load(port: int, request: bytes, concurrency: int, max_requests: int, max_seconds: float):
    budget = [max_requests]
    latencies: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()
    await asyncio.gather(*(_one_connection(port, request, start + max_seconds, budget, latencies, errors)
                           for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - start


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc): less sensitive to other load than req/s."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def run_once(pid: int, port: int, request: bytes, concurrency: int, max_requests: int, max_seconds: float) -> dict:
    cpu0 = cpu_seconds(pid)
    latencies, errors, elapsed = asyncio.run(_load(port, request, concurrency, max_requests, max_seconds))
    return {"latencies": latencies, "errors": errors, "seconds": elapsed, "cpu_s": cpu_seconds(pid) - cpu0}


def summarize(runs: list[dict], concurrency: int) -> dict:
    """Pool the repetitions of one level: req/s over their total time, percentiles over all their latencies."""
    lat = sorted(x for r in runs for x in r["latencies"])
    errors = [e for r in runs for e in r["errors"]]
    seconds = sum(r["seconds"] for r in runs)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")  # noqa: E731
    each = [len(r["latencies"]) / r["seconds"] for r in runs if r["seconds"]]
    return {"concurrency": concurrency, "requests": len(lat), "errors": len(errors),
            "error_examples": sorted(set(errors))[:3], "seconds": seconds,
            "rps": len(lat) / seconds if seconds else 0.0, "rps_min": min(each), "rps_max": max(each),
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "mean_ms": statistics.fmean(lat) * 1000 if lat else float("nan"),
            "cpu_ms_per_req": 1000 * sum(r["cpu_s"] for r in runs) / max(1, len(lat))}


# -- servers and models ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, max_batch: int, max_wait_ms: float, extra: list[str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "imgrec.cli", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms),
           "--no-access-log", "--log-level", "warning", "--timeout-s", "60", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
                if s.recv(100).startswith(b"HTTP/1.1 200"):
                    return proc, port
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def train(model: str, out: Path, train_limit: int) -> Path:
    if (out / "model.json").exists():
        return out
    print(f"training {model} for the benchmark → {out}", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "imgrec.cli", "train", "--model", model, "--epochs", "1",
                    "--train-limit", str(train_limit), "--image-size", "28", "--out", str(out), "--quiet"], check=True)
    return out


def sample_request() -> bytes:
    from PIL import Image

    from imgrec.data.named import load_named
    x, _ = load_named("fashion-mnist", "test")
    buf = io.BytesIO()
    Image.fromarray(x[0]).save(buf, format="PNG")
    png = buf.getvalue()
    return (b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            b"Content-Length: %d\r\n\r\n" % len(png)) + png


# -- the report -------------------------------------------------------------------------------------------
def machine() -> dict:
    import torch
    cpu = cpuinfo("model name").get("model name") or platform.processor() or "unknown"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def report(results: list[dict], info: dict, load_before: str, load_after: str, args) -> str:
    lines = [
        "# Serving load test (`benchmarks/serve_load.py`)", "",
        f"- machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}, Python {info['python']}",
        f"- date: {info['date']}; load average (1/5/15 min) before: {load_before}, after: {load_after}",
        f"- per level: at most {args.requests} requests or {args.seconds:g} s per server after a short warm-up, in "
        f"{args.repeat} runs that alternate between the batching-on and batching-off servers (both running, "
        "order swapped each time), pooled; "
        "one 28×28 Fashion-MNIST PNG per request as the raw body; closed loop (each connection waits for its "
        "answer); server CPU = user + system time of the server process per answered request",
        f"- batching on: `--max-batch {args.max_batch} --max-wait-ms {args.max_wait_ms:g}`; off: `--max-batch 1`. "
        "One server process (`--workers 1`), default threads, `--no-access-log`, `--timeout-s 60`; "
        "client and server share the machine's cores over 127.0.0.1", "",
        "| model | batching | concurrency | requests | req/s | (runs: min–max) | p50 ms | p99 ms | server CPU ms/req "
        "| errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['model']} | {r['batching']} | {r['concurrency']} | {r['requests']} | {r['rps']:.1f} | "
                     f"{r['rps_min']:.0f}–{r['rps_max']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['cpu_ms_per_req']:.2f} | {r['errors']} |")
    lines += ["", "Speed-up from batching (req/s on ÷ off):", "", "| model | concurrency | on ÷ off |", "|---|---:|---:|"]
    for model in dict.fromkeys(r["model"] for r in results):
        for c in args.concurrency:
            on = [r for r in results if r["model"] == model and r["batching"] == "on" and r["concurrency"] == c]
            off = [r for r in results if r["model"] == model and r["batching"] == "off" and r["concurrency"] == c]
            if on and off and off[0]["rps"]:
                lines.append(f"| {model} | {c} | {on[0]['rps'] / off[0]['rps']:.2f}× |")
    lines += ["", "Reading the numbers: \"server CPU ms/req\" is the server process's own CPU time per answer, so it "
              "moves much less than req/s when other programs share the machine; req/s and latency depend on how "
              "much of the machine the server got (see the load average)."]
    errs = [r for r in results if r["errors"]]
    if errs:
        lines += ["", "Errors seen:"] + [f"- {r['model']} batching {r['batching']} c={r['concurrency']}: "
                                         f"{r['error_examples']}" for r in errs]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--simple", type=Path, help="a simple_cnn model directory (default: train one)")
    p.add_argument("--resnet", type=Path, help="a resnet18 model directory at 28 px (default: train one)")
    p.add_argument("--models", nargs="+", default=["simple", "resnet"], choices=("simple", "resnet"))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=600, help="most requests per level")
    p.add_argument("--seconds", type=float, default=20.0, help="most seconds per level (all repetitions)")
    p.add_argument("--repeat", type=int, default=3, help="alternating on/off runs per level, pooled")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, help="passed to imgrec serve --threads")
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "imgrec-serve-bench")
    p.add_argument("--out", type=Path, help="write the Markdown report here (default: print it)")
    args = p.parse_args(argv)

    models = {}
    if "simple" in args.models:
        models["simple_cnn"] = args.simple or train("simple_cnn", args.work_dir / "simple_cnn", 5000)
    if "resnet" in args.models:
        models["resnet18 (28 px)"] = args.resnet or train("resnet18", args.work_dir / "resnet18", 2000)
    request = sample_request()
    extra = ["--threads", str(args.threads)] if args.threads else []
    info, load_before = machine(), loadavg()
    print(f"load average before: {load_before}", file=sys.stderr)
    results = []
    for name, model_dir in models.items():
        # Both servers run side by side and their runs alternate, so that other work on the machine
        # falls on both alike; each level is repeated and pooled.
        servers = {"on": start_server(model_dir, args.max_batch, args.max_wait_ms, extra),
                   "off": start_server(model_dir, 1, args.max_wait_ms, extra)}
        try:
            for c in args.concurrency:
                runs: dict[str, list[dict]] = {"on": [], "off": []}
                for batching, (proc, port) in servers.items():  # warm-up, not measured
                    asyncio.run(_load(port, request, c, min(4 * c, 64), 10))
                for rep in range(args.repeat):
                    order = ("on", "off") if rep % 2 == 0 else ("off", "on")  # neither always goes first
                    for batching in order:
                        proc, port = servers[batching]
                        runs[batching].append(run_once(proc.pid, port, request, c, args.requests // args.repeat,
                                                       args.seconds / args.repeat))
                for batching in ("on", "off"):
                    r = summarize(runs[batching], c)
                    r.update(model=name, batching=batching)
                    results.append(r)
                    print(f"{name:18s} batching {batching:3s} c={c:<3d} {r['requests']:5d} req "
                          f"{r['rps']:8.1f} req/s ({r['rps_min']:.0f}-{r['rps_max']:.0f})  p50 {r['p50_ms']:7.1f} ms  "
                          f"p99 {r['p99_ms']:7.1f} ms  cpu {r['cpu_ms_per_req']:.2f} ms/req  errors {r['errors']}",
                          file=sys.stderr, flush=True)
        finally:
            for proc, _ in servers.values():
                stop_server(proc)
    text = report(results, info, load_before, loadavg(), args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
