"""Reading + patch extraction on real CT (3D-IRCADb-01 patient 1) against a bare SimpleITK read.

Usage::

    python benchmarks/bench_io_patches.py [--data PATH] [--repeat N]

In one run, and on the same series, it times

* (a) our pipeline: ``liverlesion.io.read_volume`` of ``PATIENT_DICOM`` (header scan,
  slice sorting and checks, HU, canonical LPS), reading each lesion structure mask
  with ``read_volume(kind="mask")`` + ``check_geometry``, ``lesions_from_mask`` and
  ``extract_patch`` for every lesion with the default ``PatchConfig()``;
* (b) the reference: SimpleITK's bare ``ImageSeriesReader`` (GDCM file ordering, no checks).

Each repeat runs in a fresh worker process (so peak RSS is per variant), after one
untimed pass that warms the OS file cache; variants alternate so that load from other
processes on a shared machine hits both alike. The masks are unzipped once into a
temporary folder beforehand (not timed). Nothing is written next to the data.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import _common

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/3Dircadb1/3Dircadb1.1"
LESION_PREFIXES = ("livertumor", "liverkyst", "liverkyste", "livercyst")


# ----------------------------------------------------------------------------- worker side


def _peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 1024.0**2


def _worker_sitk(image_dir: Path, masks_dir: Path) -> dict:
    import SimpleITK as sitk

    rss0 = _peak_rss_mb()
    t0 = time.perf_counter()
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(image_dir)))
    img = reader.Execute()
    arr = sitk.GetArrayViewFromImage(img)
    t = time.perf_counter() - t0
    return {
        "total_s": t,
        "shape": list(arr.shape),
        "rss_after_imports_mb": rss0,
        "peak_rss_mb": _peak_rss_mb(),
    }


def _worker_pipeline(image_dir: Path, masks_dir: Path) -> dict:
    # Import everything first: import time is not what we measure.
    import numpy as np
    import scipy.ndimage  # noqa: F401  (used by lesions)

    from liverlesion.config import PatchConfig
    from liverlesion.io import check_geometry, read_volume
    from liverlesion.lesions import lesions_from_mask
    from liverlesion.patches import extract_patch

    cfg = PatchConfig()
    rss0 = _peak_rss_mb()
    stages = {"read_image_s": 0.0, "read_masks_s": 0.0, "lesions_s": 0.0, "patches_s": 0.0}
    t_start = time.perf_counter()
    t0 = time.perf_counter()
    image = read_volume(image_dir, kind="image")
    stages["read_image_s"] = time.perf_counter() - t0
    n_patches = 0
    for structure in sorted(p for p in masks_dir.iterdir() if p.is_dir()):
        t0 = time.perf_counter()
        mask = read_volume(structure, kind="mask")
        check_geometry(image, mask, image_name="PATIENT_DICOM", mask_name=structure.name)
        stages["read_masks_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        found = lesions_from_mask(
            image, mask, patient_id="ircadb1_01", mask_name=structure.name, min_voxels=3
        )
        stages["lesions_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        for _, lesion_mask in found:
            patch = extract_patch(image, lesion_mask, cfg)
            assert np.isfinite(patch.image).all()
            n_patches += 1
        stages["patches_s"] += time.perf_counter() - t0
    total = time.perf_counter() - t_start
    return {
        "total_s": total,
        **stages,
        "n_patches": n_patches,
        "shape": list(image.shape),
        "rss_after_imports_mb": rss0,
        "peak_rss_mb": _peak_rss_mb(),
    }


# ----------------------------------------------------------------------------- driver side


def _machine() -> dict:
    import SimpleITK as sitk

    return {
        **_common.cpu_info(),
        "load_avg_1_5_15": _common.load_avg(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "simpleitk": sitk.Version.VersionString(),
    }


def _run_worker(kind: str, image_dir: Path, masks_dir: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--image-dir",
        str(image_dir),
        "--masks-dir",
        str(masks_dir),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"bench_io_patches: the {kind} worker failed:\n{r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _extract_lesion_masks(masks_zip: Path, dest: Path) -> list[str]:
    """Unzip only the lesion structures (tumours, cysts) of MASKS_DICOM.zip into ``dest``."""
    names = set()
    with zipfile.ZipFile(masks_zip) as zf:
        for member in zf.namelist():
            parts = [p for p in member.split("/") if p]
            if member.endswith("/") or len(parts) < 2:
                continue
            structure = parts[-2]
            if structure.lower().startswith(LESION_PREFIXES):
                names.add(structure)
                (dest / structure).mkdir(parents=True, exist_ok=True)
                (dest / structure / parts[-1]).write_bytes(zf.read(member))
    return sorted(names)


def _fmt(values: list[float]) -> tuple[str, str]:
    return f"{statistics.median(values):.2f}", f"{min(values):.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="3Dircadb1.N patient folder (default: %(default)s)"
    )
    ap.add_argument("--repeat", type=int, default=3, help="timed repeats per variant (default: %(default)s)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    ap.add_argument("--worker", choices=["sitk", "pipeline"], help=argparse.SUPPRESS)
    ap.add_argument("--image-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--masks-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        fn = _worker_sitk if args.worker == "sitk" else _worker_pipeline
        print(json.dumps(fn(args.image_dir, args.masks_dir)))
        return 0

    image_dir, masks_zip = args.data / "PATIENT_DICOM", args.data / "MASKS_DICOM.zip"
    if not image_dir.is_dir() or not masks_zip.is_file():
        print(
            f"bench_io_patches: 3D-IRCADb-01 patient data not found at {args.data} "
            f"(need PATIENT_DICOM/ and MASKS_DICOM.zip; see shared/data/README.md); pass --data PATH",
            file=sys.stderr,
        )
        return 2
    if args.repeat < 1:
        print(f"bench_io_patches: --repeat {args.repeat}: must be at least 1", file=sys.stderr)
        return 2

    machine = _machine()
    with tempfile.TemporaryDirectory(prefix="bench-ircadb-") as tmp:
        masks_dir = Path(tmp)
        structures = _extract_lesion_masks(masks_zip, masks_dir)
        # Untimed pass of each variant: warms the OS file cache and checks both run.
        _run_worker("sitk", image_dir, masks_dir)
        _run_worker("pipeline", image_dir, masks_dir)
        runs: dict[str, list[dict]] = {"sitk": [], "pipeline": []}
        for _ in range(args.repeat):
            for kind in ("sitk", "pipeline"):
                runs[kind].append(_run_worker(kind, image_dir, masks_dir))
    machine["load_avg_after"] = _common.load_avg()

    sitk_t = [r["total_s"] for r in runs["sitk"]]
    pipe = runs["pipeline"]
    rows = [
        ("(b) SimpleITK ImageSeriesReader, image only", sitk_t, [r["peak_rss_mb"] for r in runs["sitk"]]),
        ("(a) liverlesion: read_volume(image)", [r["read_image_s"] for r in pipe], None),
        (
            f"    + read {len(structures)} lesion masks + check_geometry",
            [r["read_masks_s"] for r in pipe],
            None,
        ),
        ("    + lesions_from_mask", [r["lesions_s"] for r in pipe], None),
        (
            f"    + extract_patch x {pipe[0]['n_patches']} (PatchConfig())",
            [r["patches_s"] for r in pipe],
            None,
        ),
        ("(a) liverlesion pipeline, total", [r["total_s"] for r in pipe], [r["peak_rss_mb"] for r in pipe]),
    ]
    print(
        f"3D-IRCADb-01 {args.data.name}: CT {pipe[0]['shape']} (z, y, x), lesion structures: {', '.join(structures)}"
    )
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable), "
        f"load avg {machine['load_avg_1_5_15']} -> {machine['load_avg_after']}, Python {machine['python']}, "
        f"SimpleITK {machine['simpleitk']}"
    )
    print(f"repeats: {args.repeat} per variant, each in a fresh process, file cache warm\n")
    header = f"{'step':<52} {'median s':>9} {'min s':>7} {'peak RSS MB':>12}"
    rule = _common.print_header(header)
    for name, times, rss in rows:
        med, mn = _fmt(times)
        rss_text = f"{max(rss):.0f}" if rss and all(v is not None for v in rss) else ""
        print(f"{name:<52} {med:>9} {mn:>7} {rss_text:>12}")
    read_ratio = statistics.median([r["read_image_s"] for r in pipe]) / statistics.median(sitk_t)
    total_ratio = statistics.median([r["total_s"] for r in pipe]) / statistics.median(sitk_t)
    print(rule)
    print(f"ratio read_volume / SimpleITK read (medians): {read_ratio:.2f}x")
    print(f"ratio whole pipeline / SimpleITK read (medians): {total_ratio:.2f}x")
    base = runs["sitk"][0]["rss_after_imports_mb"], pipe[0]["rss_after_imports_mb"]
    if all(b is not None for b in base):
        print(
            f"(RSS after imports, before timing: SimpleITK worker {base[0]:.0f} MB, pipeline worker {base[1]:.0f} MB)"
        )
    if args.json:
        _common.write_json(args.json, {"machine": machine, "structures": structures, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
