"""Load on `liverlesion serve`: N concurrent `/api/predict` requests on loopback.

Starts the server in-process on 127.0.0.1 (random port, an untrained timm ``test_resnet``
checkpoint, a small synthetic CT + mask as NIfTI), fires N requests at once from N threads, and
reports: how many got HTTP 200 (and any other status or connection error), latency percentiles,
throughput, the server process's peak RSS growth, and whether any ``liverlesion-serve-*`` temp
folder is left. The reference is one request alone (its latency, times N, is what a strictly
serial server would need for the burst).

    python benchmarks/bench_serve_load.py                    # 50 concurrent requests
    python benchmarks/bench_serve_load.py --clients 100 --max-concurrent 64   # beyond the limit: 503s
    python benchmarks/bench_serve_load.py --upload-mb 50     # pad the CT upload (streamed to disk)

No pass/fail threshold; ``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # helpers: tiny synthetic CT and checkpoint
sys.path.insert(0, str(REPO / "src"))


def _multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    for name, (filename, data) in files.items():
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n\r\n'
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _post(url: str, body: bytes, ctype: str) -> tuple[int | str, float]:
    t0 = time.perf_counter()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            r.read()
            status: int | str = r.status
    except urllib.error.HTTPError as e:
        e.read()
        status = e.code
    except OSError as e:  # refused / reset: the failure mode a small listen backlog gives
        status = type(e).__name__
    return status, time.perf_counter() - t0


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=50, help="concurrent requests")
    ap.add_argument("--max-concurrent", type=int, default=None, help="server limit (default: the server's)")
    ap.add_argument("--upload-mb", type=float, default=0.0, help="pad the CT NIfTI upload to about this size")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    import torch

    from helpers import make_ct_with_two_lesions, make_tiny_checkpoint
    from liverlesion.io import write_volume
    from liverlesion.serve import DEFAULT_MAX_CONCURRENT, make_server

    torch.set_num_threads(a.threads)
    limit = a.max_concurrent or DEFAULT_MAX_CONCURRENT
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    tmpdir = work / "tmp"  # the server's TMPDIR: left-over upload folders are counted here
    tmpdir.mkdir()
    tempfile.tempdir = str(tmpdir)
    ckpt = make_tiny_checkpoint(work / "model.pt", seed=3, size_px=32)
    image, mask = make_ct_with_two_lesions()
    ct = write_volume(image, work / "ct.nii").read_bytes()
    if a.upload_mb > 0 and len(ct) < a.upload_mb * 2**20:
        ct += b"\0" * int(a.upload_mb * 2**20 - len(ct))  # NIfTI extension-free padding after the data
    files = {
        "image": ("ct.nii", ct),
        "mask": ("mask.nii.gz", write_volume(mask, work / "m.nii.gz").read_bytes()),
    }
    body, ctype = _multipart({"min_size_mm": "5"}, files)

    server = make_server([ckpt], host="127.0.0.1", port=0, max_upload_bytes=2 * 1024**3, max_concurrent=limit)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/api/predict"
    try:
        alone = [_post(url, body, ctype) for _ in range(3)]
        assert all(s == 200 for s, _ in alone), alone
        single = sorted(t for _, t in alone)[1]
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.perf_counter()
        start = threading.Barrier(a.clients)

        def one(_):
            start.wait()
            return _post(url, body, ctype)

        with ThreadPoolExecutor(a.clients) as pool:
            got = list(pool.map(one, range(a.clients)))
        wall = time.perf_counter() - t0
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    statuses: dict[str, int] = {}
    for s, _ in got:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
    ok = [t for s, t in got if s == 200]
    left = sorted(p.name for p in tmpdir.iterdir())
    res = {
        "clients": a.clients,
        "max_concurrent": limit,
        "upload_mb": round(len(body) / 2**20, 2),
        "statuses": statuses,
        "wall_s": round(wall, 2),
        "latency_p50_s": round(_pct(ok, 0.5), 3) if ok else None,
        "latency_max_s": round(max(ok), 3) if ok else None,
        "throughput_per_s": round(len(ok) / wall, 2),
        "single_request_s": round(single, 3),
        "serial_reference_s": round(single * a.clients, 2),
        "peak_rss_growth_mb": round(rss1 - rss0, 1),
        "temp_folders_left": len(left),
    }
    print(f"serve: {a.clients} concurrent /api/predict on loopback, upload {res['upload_mb']} MB each")
    print(f"  statuses            {statuses}")
    print(f"  burst wall time     {res['wall_s']} s  (reference: {a.clients} x single {single:.3f} s = "
          f"{res['serial_reference_s']} s)")  # fmt: skip
    print(f"  latency p50 / max   {res['latency_p50_s']} / {res['latency_max_s']} s")
    print(f"  throughput          {res['throughput_per_s']} requests/s")
    print(f"  peak RSS growth     {res['peak_rss_growth_mb']} MB (server + clients, one process)")
    print(f"  temp folders left   {len(left)}")
    print(f"  command: {' '.join(sys.argv)}; load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
