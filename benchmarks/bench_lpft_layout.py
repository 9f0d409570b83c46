"""The lpft recipe's two heavy steps with channels-last weights (what it uses) against NCHW, in one run.

* **cache**: ``lpft.build_cache`` over random lesions (TTA flips + ``train.aug_views`` augmented
  views of every 2.5-D stack), i.e. the frozen lower backbone's forward pass;
* **fine-tune step**: forward + backward + AdamW step of the top block(s) and the paper's head
  (``lpft._Upper``) on cached activations of one batch, in training mode;
* **validation**: the same network's forward pass in eval mode (the per-epoch inner validation).

Each is timed with ``lpft.channels_last`` as shipped and with it replaced by a no-op (NCHW weights),
alternating, and the frozen features of the two layouts are compared. The preset's weights
(ImageNet, offline where cached; ``--weights none`` for random ones, whose activations grow huge)
and random inputs. No pass/fail threshold: the script prints the
figures and the machine.

    python benchmarks/bench_lpft_layout.py [--preset quick] [--lesions 24] [--steps 6] [--repeats 2]

Takes about a minute on 2 CPU cores. Results: benchmarks/README.md, "Channels-last weights".
"""

from __future__ import annotations

import contextlib
import copy
import time

import _common
import numpy as np
import torch

from liverlesion import lpft


def _nchw(module):
    return contextlib.nullcontext(module)


def main() -> None:
    ap = _common.lpft_parser(__doc__.split("\n\n")[0], repeats=2)
    ap.add_argument("--steps", type=int, default=6, help="timed fine-tuning steps")
    args = ap.parse_args()
    cfg, model, init, n_top, arrays = _common.lpft_setup(args)
    size, stacks = cfg.patch.size_px, 2 * cfg.patch.stacks + 1
    shipped = lpft.channels_last
    layouts = {"channels-last (shipped)": shipped, "NCHW": _nchw}
    info = _common.machine_info("cpu")
    info["command"] = _common.command_line(None)
    print(
        f"{cfg.model.backbone} ({init}), {size} px, {stacks} stacks, top {n_top} block(s) fine-tuned, "
        f"{args.lesions} lesions, batch {cfg.train.batch_size}, {torch.get_num_threads()} torch threads"
    )

    cache_rate: dict[str, list[float]] = {k: [] for k in layouts}
    step_rate: dict[str, list[float]] = {k: [] for k in layouts}
    eval_rate: dict[str, list[float]] = {k: [] for k in layouts}
    caches = {}
    for _ in range(args.repeats):
        for name, ctx in layouts.items():
            lpft.channels_last = ctx
            m = copy.deepcopy(model)  # the fine-tuning steps below change the weights
            try:
                t = time.perf_counter()
                cache = lpft.build_cache(m, arrays, cfg, n_top, progress=False)
                images = sum(c.shape[0] * c.shape[1] for c in cache.lower)
                cache_rate[name].append(images / (time.perf_counter() - t))
                caches[name] = cache
                upper = lpft._Upper(m, n_top).train()
                for p in upper.parameters():
                    p.requires_grad_(True)
                h = torch.from_numpy(np.concatenate([c.reshape(-1, *c.shape[2:]) for c in cache.lower]))
                h = h[: cfg.train.batch_size]
                y = torch.arange(len(h)) % 2
                with ctx(upper):
                    opt = torch.optim.AdamW(upper.parameters(), lr=1e-5)
                    for i in range(args.steps + 1):
                        if i == 1:  # the first step pays one-off costs (kernel selection)
                            t = time.perf_counter()
                        loss = torch.nn.functional.cross_entropy(upper(h), y)
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                step_rate[name].append(args.steps * len(h) / (time.perf_counter() - t))
                upper.eval()
                with ctx(upper), torch.inference_mode():
                    upper(h)
                    t = time.perf_counter()
                    for _ in range(args.steps):
                        upper(h)
                eval_rate[name].append(args.steps * len(h) / (time.perf_counter() - t))
            finally:
                lpft.channels_last = shipped
    a, b = caches.values()
    diff = max(float(np.abs(x - z).max()) for x, z in zip(a.pooled, b.pooled, strict=True))
    scale = max(float(np.abs(x).max()) for x in a.pooled)
    print(f"\n{'layout':<26} {'cache images/s':>15} {'fine-tune samples/s':>20} {'validation samples/s':>21}")
    for name in layouts:
        print(
            f"{name:<26} {max(cache_rate[name]):>15.1f} {max(step_rate[name]):>20.1f} "
            f"{max(eval_rate[name]):>21.1f}"
        )
    print("(best of the repeats; each repeat ran both layouts in turn)")
    print(
        f"pooled frozen features, largest difference between layouts: {diff:.2e} (largest value {scale:.2f})"
    )
    info["load_avg_after"] = _common.load_avg()
    _common.print_machine(info, f"torch {torch.__version__}")
    best = {
        name: {
            "cache_images_per_s": max(cache_rate[name]),
            "finetune_samples_per_s": max(step_rate[name]),
            "validation_samples_per_s": max(eval_rate[name]),
        }
        for name in layouts
    }
    _common.write_results(args.json, info, args, layouts=best, max_feature_difference=diff)


if __name__ == "__main__":
    main()
