"""Catalogue at scale: start-up, memory and warm manifests with 100,000 blobs and 20,000 tags.

A cache directory is written directly (no upstream, no proxy): ``--blobs`` files under
``blobs/`` (``--tags`` of them manifests, each answering one tag, the rest small layers), with
their catalogue rows (:mod:`proxy.store.seed`). Then, in one run, on this machine and over
127.0.0.1 only:

* ``ocicache`` (``python -m proxy serve``, its upstream a closed port) is started on it and
  timed from spawn to its "listening" line, which it prints once the catalogue is reconciled
  and loaded: start-up to ready (goal: 3 s or less);
* its resident memory at rest, from ``/proc/<pid>/status`` (VmRSS), once ready;
* warm manifest requests by tag per second with ``wrk`` (``--connections`` keep-alive
  connections, ``--seconds`` per round), against the same figure for a proxy started on a
  catalogue of 10 blobs, measured interleaved in the same run (goal: within 10%).

Both proxies and wrk share the machine's cores; the report names the CPU count and load.
Run: ``python -m loadtests.bench_catalogue [--blobs 100000] [--tags 20000] [--seconds 10]
[--rounds 2] [--out FILE]``. Every wait is bounded; the run stops by itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from proxy.core.mediatypes import OCI_MANIFEST, accept_key, describe
from proxy.store.catalogue import ManifestInfo
from proxy.store.seed import seed
from proxy.store.storage import Storage

ROOT: Final = Path(__file__).resolve().parent.parent
UPSTREAM: Final = "docker.io"
START_TIMEOUT: Final = 120.0
ACCEPT: Final = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"


def _manifest(i: int, layer: str, size: int) -> bytes:
    config = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": layer, "size": size}
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": [], "n": i}
    return json.dumps(doc, sort_keys=True).encode()


def fill(root: Path, blobs: int, tags: int) -> list[str]:
    """Write ``blobs`` files and their rows; returns the repository:tag names."""
    storage = Storage(root)
    storage.prepare()
    layers = blobs - tags
    layer_rows: list[tuple[str, int]] = []
    for i in range(layers):
        data = i.to_bytes(8, "big") * 8
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (storage.blobs / "sha256" / digest[7:]).write_bytes(data)
        layer_rows.append((digest, len(data)))
    manifests: list[tuple[str, ManifestInfo]] = []
    tag_rows: list[tuple[str, str, str, str, str, str]] = []
    names: list[str] = []
    key = accept_key(None)
    for i in range(tags):
        layer, size = layer_rows[i % max(1, layers)] if layers else ("sha256:" + "0" * 64, 0)
        body = _manifest(i, layer, size)
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        (storage.blobs / "sha256" / digest[7:]).write_bytes(body)
        manifests.append((digest, ManifestInfo.of(OCI_MANIFEST, len(body), describe(body))))
        repo, tag = f"library/app{i % 1000}", f"v{i}"
        tag_rows.append((UPSTREAM, repo, tag, key, digest, OCI_MANIFEST))
        names.append(f"{repo}:{tag}")
    seed(root, blobs=layer_rows, manifests=manifests, tags=tag_rows)
    return names


@dataclass
class Started:
    proc: subprocess.Popen[bytes]
    url: str
    ready_s: float

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        m = re.search(r"VmRSS:\s+(\d+) kB", status)
        return int(m.group(1)) / 1024 if m else float("nan")


@contextmanager
def started(cache: Path) -> Iterator[Started]:
    argv = [
        sys.executable, "-m", "proxy", "serve",
        "--listen", "127.0.0.1:0", "--cache-dir", str(cache),
        "--upstream", f"{UPSTREAM}=http://127.0.0.1:9",
        "--tag-ttl", "forever", "--log-level", "warning",
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        line = b""
        while b"listening on" not in line:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"proxy did not start: {line!r}")
            line = proc.stdout.readline()
        ready = time.perf_counter() - t0
        m = re.search(rb"(http://\S+)", line)
        assert m is not None
        yield Started(proc, m.group(1).decode(), ready)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def wrk(url: str, connections: int, seconds: float) -> tuple[float, float]:
    """Requests per second and p99 latency (ms) of GETs of ``url``."""
    script = f'wrk.headers["Accept"] = "{ACCEPT}"'
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
        lua.write(script)
        lua.flush()
        done = subprocess.run(
            [
                "wrk",
                "-t2",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--latency",
                "-s",
                lua.name,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        )
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", done.stdout).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", done.stdout)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    latency = float(p99.group(1)) * scale[p99.group(2)] if p99 else float("nan")
    if "Non-2xx" in done.stdout:
        raise RuntimeError(f"wrk saw errors: {done.stdout}")
    return rps, latency


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.bench_catalogue", description=__doc__.split("\n")[0]
    )
    p.add_argument("--blobs", type=int, default=100_000)
    p.add_argument("--tags", type=int, default=20_000)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ocicache-bench-") as tmp:
        big, small = Path(tmp) / "big", Path(tmp) / "small"
        t0 = time.perf_counter()
        names = fill(big, args.blobs, args.tags)
        fill_s = time.perf_counter() - t0
        small_names = fill(small, 10, 5)
        report: dict[str, object] = {
            "blobs": args.blobs,
            "tags": args.tags,
            "fill_seconds": round(fill_s, 1),
            "cpus": os.cpu_count(),
            "load_before": os.getloadavg(),
            "client": f"wrk -t2 -c{args.connections}, on the same machine as the proxy, no pinning",
        }
        ready: list[float] = []
        rss: list[float] = []
        big_rps: list[float] = []
        small_rps: list[float] = []
        p99s: list[float] = []
        for _ in range(args.rounds):
            with started(big) as proxy:
                ready.append(proxy.ready_s)
                rss.append(proxy.rss_mib())
                repo, tag = names[len(names) // 2].split(":")
                url = f"{proxy.url}/v2/{repo}/manifests/{tag}"
                rps, p99 = wrk(url, args.connections, args.seconds)
                big_rps.append(rps)
                p99s.append(p99)
            with started(small) as proxy:
                repo, tag = small_names[0].split(":")
                rps, _ = wrk(f"{proxy.url}/v2/{repo}/manifests/{tag}", args.connections, args.seconds)
                small_rps.append(rps)
        report |= {
            "ready_seconds": [round(x, 2) for x in ready],
            "rss_at_rest_mib": [round(x, 1) for x in rss],
            "warm_manifest_rps_big": [round(x) for x in big_rps],
            "warm_manifest_rps_small": [round(x) for x in small_rps],
            "p99_ms_big": p99s,
            "big_over_small": round(statistics.median(big_rps) / statistics.median(small_rps), 3),
            "load_after": os.getloadavg(),
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
