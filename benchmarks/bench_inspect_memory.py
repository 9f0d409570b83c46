"""Peak memory (RSS) of `liverlesion inspect` on a large synthetic CT with many lesions.

Writes one synthetic CT (default 600 x 512 x 512 voxels, int16, 0.7 x 0.7 x 1 mm) with N sphere
lesions and their 0/1 mask as NIfTI, then runs ``python -m liverlesion inspect MANIFEST`` in a
fresh process and reports that process's peak RSS (``getrusage(RUSAGE_CHILDREN).ru_maxrss``) and wall time.
The reference is the bare size of the data: the image as float32 HU (what ``read_volume`` holds)
plus the mask as uint8, i.e. what any reader must hold at once.

    python benchmarks/bench_inspect_memory.py                        # this checkout's src/
    python benchmarks/bench_inspect_memory.py --src /tmp/old/src     # another version, same data
    python benchmarks/bench_inspect_memory.py --data /tmp/big --keep # reuse / keep the NIfTI files

No pass/fail threshold; ``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def write_case(folder: Path, shape: tuple[int, int, int], n_lesions: int, seed: int = 0) -> Path:
    """Write ``ct.nii.gz``, ``mask.nii.gz`` and ``manifest.csv`` (one row, connected components)."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.csv"
    if manifest.exists():
        return manifest
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    ct = rng.normal(50, 15, shape).astype(np.int16)  # soft tissue
    mask = np.zeros(shape, np.uint8)
    # Spheres 8-30 mm on a grid that keeps them apart (one connected component each).
    per_row = int(np.ceil(np.sqrt(n_lesions)))
    for i in range(n_lesions):
        r_mm = rng.uniform(4, 15)
        cz = (nz // 2) + int(rng.integers(-nz // 4, nz // 4))
        cy = int((i // per_row + 0.5) * ny / per_row)
        cx = int((i % per_row + 0.5) * nx / per_row)
        rz, ry, rx = int(np.ceil(r_mm / 1.0)), int(np.ceil(r_mm / 0.7)), int(np.ceil(r_mm / 0.7))
        z, y, x = np.ogrid[-rz : rz + 1, -ry : ry + 1, -rx : rx + 1]
        ball = (z * 1.0) ** 2 + (y * 0.7) ** 2 + (x * 0.7) ** 2 <= r_mm**2
        sl = (slice(cz - rz, cz + rz + 1), slice(cy - ry, cy + ry + 1), slice(cx - rx, cx + rx + 1))
        mask[sl][ball] = 1
        ct[sl][ball] = 10 if i % 2 else 90
    for arr, name in ((ct, "ct.nii.gz"), (mask, "mask.nii.gz")):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((0.7, 0.7, 1.0))
        sitk.WriteImage(img, str(folder / name), useCompression=True)
    manifest.write_text("patient_id,image,lesion_class,mask\nP1,ct.nii.gz,metastasis,mask.nii.gz\n")
    return manifest


def run_inspect(manifest: Path, src: Path) -> dict:
    """Run ``inspect`` in a fresh process; its peak RSS (MB), wall time (s) and lesion count."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "liverlesion",
            "inspect",
            str(manifest),
            "--out",
            str(manifest.parent / "t.csv"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    import resource

    # the largest reaped child's peak RSS (KiB on Linux); inspect is the only child run
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"inspect failed ({proc.returncode}): {err.decode()[-2000:]}")
    n = sum(1 for _ in open(manifest.parent / "t.csv")) - 1
    return {"peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "wall_s": round(wall, 2), "lesions": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[600, 512, 512], metavar=("Z", "Y", "X"))
    ap.add_argument("--lesions", type=int, default=20)
    ap.add_argument("--src", type=Path, default=REPO / "src", help="liverlesion source folder to run")
    ap.add_argument("--data", type=Path, default=None, help="folder for the NIfTI files (reused if present)")
    ap.add_argument("--keep", action="store_true", help="keep the data folder")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    tmp = None
    folder = a.data
    if folder is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-inspect-")
        folder = Path(tmp.name)
    manifest = write_case(folder, tuple(a.shape), a.lesions)
    res = run_inspect(manifest, a.src)
    nz, ny, nx = a.shape
    ref_mb = nz * ny * nx * (4 + 1) / 2**20
    print(f"inspect, {nz}x{ny}x{nx} int16 NIfTI, {res['lesions']} lesions (src {a.src})")
    print(f"  peak RSS      {res['peak_rss_mb']:8.0f} MB")
    print(f"  reference     {ref_mb:8.0f} MB  (image as float32 + mask as uint8)")
    print(f"  ratio         {res['peak_rss_mb'] / ref_mb:8.2f}x")
    print(f"  wall time     {res['wall_s']:8.1f} s")
    print(f"  command: {' '.join(sys.argv)}; load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores")
    if a.json:
        a.json.write_text(json.dumps({**res, "reference_mb": round(ref_mb, 1), "shape": a.shape}, indent=2))
    if tmp is not None and not a.keep:
        tmp.cleanup()


if __name__ == "__main__":
    main()
