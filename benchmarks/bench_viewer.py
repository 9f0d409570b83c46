"""The viewer's latency per lesion (issue 11 §3: serve <= 1 s per lesion), on loopback.

Usage::

    python benchmarks/bench_viewer.py [--size 80] [--repeat 5] [--backbone inception_v3]

On ``bench_predict``'s synthetic CT (512 x 512 x 100, int16 HU, one 24 mm lesion, NIfTI image +
mask) with an untrained checkpoint at ``--size`` px and its ONNX export next to it (as
``liverlesion export`` writes; ``serve``'s default backend then runs onnxruntime), it starts
``make_server`` with its defaults in a thread and times over HTTP:

* opening the study once (``POST /api/studies``: upload, two NIfTI reads, checks);
* per lesion, with the study loaded: a click in the mask and a click with a diameter
  (``POST .../classify?wait=1``: the whole answer, model included), a slice PNG, the overlay PNG,
  and the overlay with Grad-CAM (first Grad-CAM request loads torch: shown apart).

Weights are random (they do not change the speed). Medians after one warm-up. No pass/fail.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import bench_predict
import numpy as np


def _post(url: str, body: bytes, ctype: str) -> bytes:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype})
    with urllib.request.urlopen(req, timeout=600) as r:
        return r.read()


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=600) as r:
        return r.read()


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=80, help="patch size in px (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=5, help="timed clicks (default: %(default)s)")
    ap.add_argument("--backbone", default="inception_v3", help="timm backbone (default: %(default)s)")
    args = ap.parse_args(argv)

    from liverlesion.export import export_model
    from liverlesion.io import write_volume
    from liverlesion.onnx_backend import export_path
    from liverlesion.runtime import resolve_threads
    from liverlesion.serve import make_server

    rows: list[tuple[str, list[float]]] = []
    with tempfile.TemporaryDirectory(prefix="bench-viewer-") as tmp_s:
        tmp = Path(tmp_s)
        image, mask = bench_predict.synthetic_ct()
        write_volume(image, tmp / "ct.nii.gz")
        write_volume(mask, tmp / "mask.nii.gz")
        ckpt = bench_predict.make_checkpoint(tmp / "model" / "model.pt", args.size, args.backbone)
        export_model(ckpt, "onnx", export_path(ckpt))
        server = make_server([ckpt], port=0, threads=resolve_threads(None))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            boundary = uuid.uuid4().hex
            parts = []
            for name in ("image", "mask"):
                path = tmp / f"{'ct' if name == 'image' else 'mask'}.nii.gz"
                head = (
                    f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{path.name}"\r\n'
                    "Content-Type: application/octet-stream\r\n\r\n"
                )
                parts.append(head.encode() + path.read_bytes() + b"\r\n")
            parts.append(f"--{boundary}--\r\n".encode())
            body, ctype = b"".join(parts), f"multipart/form-data; boundary={boundary}"
            t0 = time.perf_counter()
            info = json.loads(_post(base + "/api/studies", body, ctype))
            rows.append(("open the study (upload + reads), once per study", [time.perf_counter() - t0]))
            sid = info["study_id"]
            zz, yy, xx = np.nonzero(mask.array)
            k, y, x = int(np.median(zz)), float(yy.mean()), float(xx.mean())
            in_mask = json.dumps({"slice": k, "x_px": x, "y_px": y}).encode()
            free = json.dumps(
                {"slice": k, "x_px": x, "y_px": y, "diameter_mm": 24, "use_mask": False}
            ).encode()
            classify = f"{base}/api/studies/{sid}/classify?wait=1"
            steps = {
                "click in the mask: classify?wait=1 (per lesion)": lambda: _post(
                    classify, in_mask, "application/json"
                ),
                "click + diameter: classify?wait=1 (per lesion)": lambda: _post(
                    classify, free, "application/json"
                ),
                "slice PNG (per scroll step)": lambda: _get(f"{base}/api/studies/{sid}/slice/{k}.png"),
                "overlay PNG, no Grad-CAM": lambda: _get(
                    f"{base}/api/studies/{sid}/lesions/case-L01/overlay.png"
                ),
            }
            for fn in steps.values():
                fn()  # warm-up
            times: dict[str, list[float]] = {name: [] for name in steps}
            for _ in range(args.repeat):
                for name, fn in steps.items():
                    times[name].append(_timed(fn))
            rows += list(times.items())
            cam = f"{base}/api/studies/{sid}/lesions/case-L01/overlay.png?gradcam=1"
            rows.append(
                ("overlay PNG + Grad-CAM, first (loads torch once per server)", [_timed(lambda: _get(cam))])
            )
            again = [
                _timed(lambda: (_post(classify, in_mask, "application/json"), _get(cam)))
                for _ in range(args.repeat)
            ]
            rows.append(("click in the mask + overlay with Grad-CAM (per lesion)", again))
        finally:
            server.shutdown()
            server.server_close()
    print(f"bench_viewer: {args.backbone} at {args.size} px, onnx backend, CT {image.shape} (z, y, x)")
    width = max(len(n) for n, _ in rows)
    for name, t in rows:
        print(f"  {name:<{width}}  {1000 * statistics.median(t):8.0f} ms  (n={len(t)})")
    print("target (issue 11 §3): serve <= 1 s per lesion, the study kept loaded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
