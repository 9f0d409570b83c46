"""Prediction latency per lesion, end to end, against bare network inference, in one run.

Usage::

    python benchmarks/bench_predict.py [--sizes 80 299] [--repeat 5] [--cli-repeat 1]
    python benchmarks/bench_predict.py --quick
    python benchmarks/bench_predict.py --device cuda

On a synthetic CT of realistic size (512 x 512 x 100, int16 HU on disk, 0.75 x 0.75 x 2.5 mm,
one 24 mm cyst-like lesion), with an untrained ``inception_v3`` checkpoint made by
``build_model`` + ``save_checkpoint`` for each patch size (80 px: the quick preset; 299 px:
the paper preset), it times:

* **ours, in process**: ``Classifier.load`` once, then ``Classifier.predict(volume, mask=...)``
  (CT checks, ``check_geometry``, ``lesions_from_mask``, ``extract_patch`` with the
  checkpoint's patch settings, the temperature-scaled softmax, the decision), without and
  with Grad-CAM; and each of those stages alone;
* **ours, CLI**: ``liverlesion predict --model ... --image ... --mask ... -o ...`` in a fresh
  process (interpreter start, imports, checkpoint load, NIfTI reads, results.csv/json, overlay
  PNG): with default settings, the checkpoint having its ONNX export next to it (``liverlesion
  export``), so ``--backend auto`` runs onnxruntime and torch is never imported; and with
  ``--backend torch``, ``--no-gradcam`` and as by default (Grad-CAM on); next to them, in the same
  run, the reference for a CLI run: a fresh ``python -c "import torch"``;
* **ours, serve**: ``make_server`` (defaults: onnx backend, Grad-CAM on) in a thread of this
  process, then ``POST /api/predict`` with the NIfTI image and mask (one lesion), per request;
* **the reference**: the same ``LesionNet`` forward on a ready ``(1, 3, S, S)`` tensor
  (``torch.inference_mode``), i.e. what the network itself costs.

Weights are random (they do not change the speed). Repeats run after one untimed warm-up;
medians are shown. No pass/fail threshold.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import numpy as np

SHAPE_ZYX = (100, 512, 512)
SPACING_ZYX = (2.5, 0.75, 0.75)
LESION_RADIUS_MM = 12.0
CLASSES = ["cyst", "metastasis"]
LARGE_PX = 150  # at and above this patch size: fewer repeats, no Grad-CAM rows (keeps a CPU run short)


# ----------------------------------------------------------------------------- machine


def machine_info(device: str) -> dict:
    """CPU, cores, torch threads, load average, accelerator and library versions."""
    import timm

    return _common.machine_info(device, timm=timm.__version__)


def print_machine(info: dict) -> None:
    _common.print_machine(info, f"torch {info['torch']}, timm {info['timm']}")


# ----------------------------------------------------------------------------- inputs


def synthetic_ct(seed: int = 0):
    """A 512 x 512 x 100 CT (int16 HU): air, a body ellipse of soft tissue, one water-like lesion."""
    from liverlesion.volume import Volume

    rng = np.random.default_rng(seed)
    nz, ny, nx = SHAPE_ZYX
    yy, xx = np.mgrid[:ny, :nx]
    body = ((yy - ny / 2) / (0.42 * ny)) ** 2 + ((xx - nx / 2) / (0.47 * nx)) ** 2 <= 1
    liver = ((yy - 0.45 * ny) / (0.2 * ny)) ** 2 + ((xx - 0.35 * nx) / (0.2 * nx)) ** 2 <= 1
    base = np.where(body, 40, -1000).astype(np.int16)
    base[liver] = 60
    array = np.empty(SHAPE_ZYX, dtype=np.int16)
    for z in range(nz):  # slice by slice: the float noise for the whole volume would need 200 MB
        array[z] = base + rng.normal(0, 12, size=(ny, nx)).astype(np.int16)
    centre = np.array([nz * 0.5, ny * 0.45, nx * 0.35])  # in the liver
    r = np.ceil(LESION_RADIUS_MM / np.array(SPACING_ZYX)).astype(int) + 1
    lo, hi = (centre - r).astype(int), (centre + r + 1).astype(int)
    gz, gy, gx = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij")
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip((gz, gy, gx), centre, SPACING_ZYX, strict=True))
    inside = d2 <= LESION_RADIUS_MM**2
    mask = np.zeros(SHAPE_ZYX, dtype=np.uint8)
    mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = inside
    array[mask > 0] = (8 + rng.normal(0, 12, size=int(inside.sum()))).astype(np.int16)
    origin = (-nx * SPACING_ZYX[2] / 2, -ny * SPACING_ZYX[1] / 2, 0.0)
    image = Volume(array, SPACING_ZYX, origin, np.eye(3), {"modality": "CT", "format": "synthetic"})
    return image, image.with_array(mask)


def make_checkpoint(path: Path, size: int, backbone: str) -> Path:
    """An untrained, self-describing checkpoint with the quick preset's settings at ``size`` px."""
    import torch

    from liverlesion.config import load_config
    from liverlesion.model import build_model, save_checkpoint

    cfg = load_config(preset="quick")
    cfg.model.backbone = backbone
    cfg.model.weights = "none"
    cfg.patch.size_px = size
    in_chans = 2 * cfg.patch.neighbours + 1 if cfg.patch.mode == "2.5d" else 1
    torch.manual_seed(0)
    model, _ = build_model(cfg.model, num_classes=len(CLASSES), in_chans=in_chans)
    return save_checkpoint(path, model.eval(), cfg, CLASSES, in_chans, temperature=1.0, threshold=0.5, fold=0)


# ----------------------------------------------------------------------------- timing


def run_cli(args_list: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(args_list, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(
            f"bench_predict: {shlex.join(args_list)} failed (exit {r.returncode}):\n{r.stderr.strip()[-2000:]}"
        )
    return wall


def bench_size(
    args, size: int, tmp: Path, image_file: Path | None, mask_file: Path | None, volume, mask_vol, env
) -> list:
    """All rows for one patch size: ``(name, seconds per run)``; the "(b)" row is the bare reference."""
    import torch

    from liverlesion.export import export_model
    from liverlesion.io import check_geometry
    from liverlesion.lesions import lesions_from_mask
    from liverlesion.onnx_backend import export_path
    from liverlesion.patches import extract_patch
    from liverlesion.predict import Classifier, check_ct_volume
    from liverlesion.runtime import resolve_threads

    ckpt = make_checkpoint(tmp / f"model_{size}" / "model.pt", size, args.backbone)
    rows = []
    t0 = time.perf_counter()
    clf = Classifier.load(ckpt, device=args.device, backend="torch")
    rows.append(("Classifier.load (once per session)", [time.perf_counter() - t0]))
    onnx_clf = None
    if not args.device.startswith("cuda"):
        t0 = time.perf_counter()
        export_model(ckpt, "onnx", export_path(ckpt))  # what `liverlesion export --model CKPT` writes
        rows.append(("liverlesion export (once per checkpoint)", [time.perf_counter() - t0]))
        onnx_clf = Classifier.load(
            ckpt, device="cpu", backend="onnx", threads=resolve_threads(args.threads or None)
        )

    def predict(gradcam: bool, which=clf):
        df = which.predict(volume, mask=mask_vol, gradcam=gradcam)
        assert len(df) == 1 and df["status"].iloc[0] == "classified", df[["lesion_id", "status"]]

    def find():
        check_ct_volume(volume, "image")
        check_geometry(volume, mask_vol, tolerance=1e-3)
        return lesions_from_mask(volume, mask_vol, None, "case", "")

    lesion_mask = find()[0][1]
    patch = extract_patch(volume, lesion_mask, clf.patch_config)
    x = torch.from_numpy(np.ascontiguousarray(patch.image)).to(args.device)
    net = clf.members[0].model

    def bare():
        with torch.inference_mode():
            net(x)

    bare_name = "(b) bare LesionNet forward, batch 1, ready tensor"
    fns = [
        (bare_name, bare),
        ("(a) Classifier.predict, 1 lesion, no Grad-CAM", lambda: predict(False)),
        ("      CT checks + check_geometry + lesions_from_mask", find),
        ("      extract_patch", lambda: extract_patch(volume, lesion_mask, clf.patch_config)),
        ("      Classifier.member_probs (network + softmax)", lambda: clf.member_probs(patch.image)),
    ]
    if onnx_clf is not None:
        fns.append(("(a) Classifier.predict, onnx backend, no Grad-CAM", lambda: predict(False, onnx_clf)))
        fns.append(("      member_probs, onnx backend", lambda: onnx_clf.member_probs(patch.image)))
    large = size >= LARGE_PX
    if not args.quick and not large and args.gradcam:
        fns.append(("(a) Classifier.predict, 1 lesion, with Grad-CAM", lambda: predict(True)))
    if not args.device.startswith("cuda") and torch.get_num_threads() > 1:

        def bare_1thread():
            # On a CPU shared with other jobs, torch's intra-op threads wait for each other at
            # every small op; one thread shows how much of the latency that costs.
            old = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                bare()
            finally:
                torch.set_num_threads(old)

        fns.insert(1, ("    same, torch.set_num_threads(1)", bare_1thread))
    if args.device.startswith("cuda"):
        net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)

        def bare_bf16():
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                net_cl(x_cl)

        fns.insert(1, ("    same, bf16 autocast + channels_last", bare_bf16))
    times = _common.timed_rounds(fns, args.repeat_large if large else args.repeat, args.device)
    rows += [(name, times[name]) for name, _ in fns]
    if not args.files:
        return rows
    base = [
        sys.executable,
        "-m",
        "liverlesion",
        "predict",
        "--model",
        str(ckpt),
        "--image",
        str(image_file),
        "--mask",
        str(mask_file),
    ]
    modes = []
    if onnx_clf is not None:
        modes.append(("default", CLI_DEFAULT, []))
    modes.append(("no_cam", "(a) CLI `predict --backend torch --no-gradcam`, new process", TORCH_NO_CAM))
    if not args.quick and not large and args.gradcam:
        modes.append(
            ("cam", "(a) CLI `predict --backend torch` (Grad-CAM on), new process", ["--backend", "torch"])
        )
    for key, name, extra in modes:
        walls = [
            run_cli([*base, "-o", str(tmp / f"out_{size}_{key}_{i}"), *extra], env)
            for i in range(args.cli_repeat)
        ]
        rows.append((name, walls))
    if onnx_clf is not None and not args.quick:
        rows.append((SERVE_ROW, serve_times(ckpt, image_file, mask_file, args)))
    return rows


CLI_DEFAULT = "(a) CLI `liverlesion predict`, defaults (onnx export present), new process"
TORCH_NO_CAM = ["--backend", "torch", "--no-gradcam"]
SERVE_ROW = "(a) serve: POST /api/predict, 1 lesion (defaults: onnx, Grad-CAM)"


def serve_times(ckpt: Path, image_file: Path, mask_file: Path, args) -> list[float]:
    """Seconds per ``POST /api/predict`` (NIfTI image + mask, one lesion) after one warm-up request."""
    import threading
    import urllib.request
    import uuid

    from liverlesion.runtime import resolve_threads
    from liverlesion.serve import make_server

    boundary = uuid.uuid4().hex
    parts = []
    for name, path in (("image", image_file), ("mask", mask_file)):
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{path.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        parts.append(head.encode() + path.read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    body = b"".join(parts)
    # as `liverlesion serve --model CKPT` does: threads default to the free cores
    server = make_server([ckpt], port=0, threads=resolve_threads(args.threads or None), device=args.device)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/api/predict"
    times = []
    try:
        for i in range(1 + args.serve_repeat):
            req = urllib.request.Request(
                url, data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
            )
            t0 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=600) as r:
                r.read()
            if i:  # the first request loads torch for Grad-CAM, once per server
                times.append(time.perf_counter() - t0)
    finally:
        server.shutdown()
        server.server_close()
    return times


# ----------------------------------------------------------------------------- driver


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="patch sizes in px (default: 80 299)")
    ap.add_argument("--backbone", default="inception_v3", help="timm backbone (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=5, help="timed in-process repeats (default: %(default)s)")
    ap.add_argument(
        "--repeat-large",
        type=int,
        default=3,
        help=f"timed in-process repeats at sizes >= {LARGE_PX} px (default: %(default)s)",
    )
    ap.add_argument(
        "--cli-repeat", type=int, default=1, help="CLI runs per mode and size (default: %(default)s)"
    )
    ap.add_argument(
        "--serve-repeat", type=int, default=3, help="timed serve requests per size (default: %(default)s)"
    )
    ap.add_argument("--device", default="auto", help="auto (cuda when present) | cpu | cuda[:N]")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads (default: as the CLI, the free cores; torch rows in process: torch's)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="80 px only, 3 repeats, no Grad-CAM rows, no import floor: about a minute on 2 cores",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    _common.resolve_device(ap, args)
    if args.quick:
        args.sizes = args.sizes or [80]
        args.repeat = min(args.repeat, 3)
    args.sizes = args.sizes or [80, 299]
    # Lent GPU machines may lack these; the rows that need them are then left out, with a note.
    args.files = importlib.util.find_spec("SimpleITK") is not None
    args.gradcam = importlib.util.find_spec("pytorch_grad_cam") is not None
    args.notes = []
    if not args.files:
        args.notes.append("SimpleITK is not installed: no NIfTI files, so no CLI rows and no import floor")
    if not args.gradcam:
        args.notes.append("pytorch-grad-cam is not installed: no Grad-CAM rows")
    for name in ("repeat", "repeat_large", "cli_repeat", "serve_repeat"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if any(s < 75 for s in args.sizes) and args.backbone.startswith("inception"):
        ap.error(f"--sizes {args.sizes}: inception_v3 needs at least 75 px")
    return args


FLOOR_CODE = "import torch"  # issue 11's reference for a CLI run


def _import_floor(env: dict, repeat: int) -> list[float]:
    return [run_cli([sys.executable, "-c", FLOOR_CODE], env) for _ in range(repeat)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = _common.start_run(args, argv, machine_info)
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if not args.device.startswith("cuda"):
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CLI picks CUDA when it sees one

    results: dict[int, list] = {}
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp_name:
        tmp = Path(tmp_name)
        image, mask = synthetic_ct()
        read_s = None
        if args.files:
            from liverlesion.io import read_volume, write_volume

            image_file = write_volume(image, tmp / "ct.nii")
            mask_file = write_volume(mask, tmp / "lesion.nii")
            t0 = time.perf_counter()
            volume = read_volume(image_file, kind="image")  # float32 HU, as every reader returns it
            read_s = time.perf_counter() - t0
            mask_vol = read_volume(mask_file, kind="mask")
            where = f"int16 NIfTI {image_file.stat().st_size / 2**20:.0f} MB (read_volume {read_s:.2f} s, not in the rows)"
        else:
            image_file = mask_file = None
            volume, mask_vol = image.with_array(image.array.astype(np.float32)), mask
            where = "in memory (float32 HU, as read_volume returns it)"
        print(
            f"CT {volume.shape} (z, y, x), spacing {SPACING_ZYX} mm, {where}; "
            f"1 lesion, {2 * LESION_RADIUS_MM:.0f} mm; {args.backbone}, random weights",
            flush=True,
        )
        for note in args.notes:
            print(f"note: {note}")
        floor = []
        for size in args.sizes:
            if args.files:  # taken next to each size's CLI rows, so both see the same load
                floor += _import_floor(env, args.cli_repeat)
            results[size] = bench_size(args, size, tmp, image_file, mask_file, volume, mask_vol, env)
    info["load_avg_after"] = _common.load_avg()

    print()
    print_machine(info)
    print(
        f"in-process rows: median (min) of {args.repeat} runs ({args.repeat_large} at >= {LARGE_PX} px) after 1 "
        f"warm-up, the steps taken in turn; CLI rows: {args.cli_repeat} run(s)"
    )
    print()
    header = f"{'size':>4}  {'step':<58} {'median ms':>10} {'min ms':>9} {'vs bare':>9}"
    rule = _common.print_header(header)
    for size, rows in results.items():
        ref = statistics.median(next(secs for name, secs in rows if name.startswith("(b)")))
        for name, secs in rows:
            med = statistics.median(secs)
            once = name.startswith(("Classifier.load", "liverlesion export"))
            ratio = f"{med / ref:.2f}x" if not once else ""
            print(f"{size:>4}  {name:<58} {1000 * med:>10.1f} {1000 * min(secs):>9.1f} {ratio:>9}")
        print(rule)
    if floor:
        name = f'reference: fresh `python -c "{FLOOR_CODE}"`'
        ref = statistics.median(floor)
        print(f"{'':>4}  {name:<58} {1000 * ref:>10.1f} {1000 * min(floor):>9.1f}")
        for size, rows in results.items():
            for name, secs in rows:
                if name.startswith("(a) CLI"):
                    print(f"{size:>4}  {name[4:]:<58} {statistics.median(secs) / ref:>9.2f}x import torch")
        print("target (issue 11): CLI defaults <= 1.5x import torch; serve <= 1 s per lesion")
    print("vs bare: this step's median / the bare forward's median at the same size")
    _common.write_results(
        args.json,
        info,
        args,
        read_volume_s=read_s,
        notes=args.notes,
        import_floor_s=floor,
        rows={
            str(size): [{"step": n.strip(), "seconds": s} for n, s in rows] for size, rows in results.items()
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
