"""Three CPU speed-ups of the lpft recipe, each against what it replaced, in one run.

* **cache: BatchNorm folded.** ``lpft.build_cache`` runs a copy of the frozen network with each
  convolution's BatchNorm folded into its weights (``model.fold_batchnorm``), against the network
  as it is (``fold_batchnorm`` replaced by the identity).
* **top block input channels-last.** The fine-tuned top block(s) read the cached activations
  channels-last (``LesionNet.upper_map``), against the cached NCHW slice as it is: a training step
  (forward, backward, AdamW) and the validation forward, with the block's weights channels-last
  as in the recipe (``lpft.channels_last``).
* **AdamW foreach.** The paper's head trained on pooled features (the probe stage, and the
  cross-fitted probes of the fusion weight) with ``foreach=True`` against the single-tensor loop
  that PyTorch picks on CPU; the losses after the steps are compared (same arithmetic).

Each pair runs alternately, ``--repeats`` times (the top-block pair: ``4 x --repeats`` single calls
after a warm-up, ``_common.timed_rounds``); the best of each is printed with the machine. No
pass/fail threshold.

    python benchmarks/bench_lpft_speed.py [--preset quick] [--lesions 24] [--repeats 3] [--json OUT]

About two minutes on 2 CPU cores. Results: benchmarks/README.md, "Folded BatchNorm, channels-last
input, foreach AdamW".
"""

from __future__ import annotations

import copy
import time

import _common
import numpy as np
import torch
import torch.nn.functional as F

import liverlesion.model as model_module
from liverlesion import lpft
from liverlesion.model_input import takes_mask


def main() -> None:
    args = _common.lpft_parser(__doc__.split("\n\n")[0], repeats=3).parse_args()
    cfg, model, init, n_top, arrays = _common.lpft_setup(args)
    size, stacks = cfg.patch.size_px, 2 * cfg.patch.stacks + 1
    info = _common.machine_info("cpu")
    info["command"] = _common.command_line(None)
    print(
        f"{cfg.model.backbone} ({init}), {size} px, {stacks} stacks, top {n_top} block(s), "
        f"{args.lesions} lesions, batch {cfg.train.batch_size}, {torch.get_num_threads()} torch threads"
    )
    rates: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        rates.setdefault(name, []).append(value)

    # 1. the cache pass, folded against as it is
    folded, plain = model_module.fold_batchnorm, (lambda m: m)
    caches = {}
    for _ in range(args.repeats):
        for name, fold in (("cache, BatchNorm folded (shipped)", folded), ("cache, as it is", plain)):
            model_module.fold_batchnorm = fold
            try:
                t = time.perf_counter()
                caches[name] = lpft.build_cache(copy.deepcopy(model), arrays, cfg, n_top, progress=False)
                images = sum(c.shape[0] * c.shape[1] for c in caches[name].lower)
                add(name, images / (time.perf_counter() - t))
            finally:
                model_module.fold_batchnorm = folded
    a, b = caches.values()
    diff = max(float(np.abs(x - z).max()) for x, z in zip(a.pooled, b.pooled, strict=True))
    scale = max(float(np.abs(x).max()) for x in b.pooled)

    # 2. the top block on cached activations, input channels-last against the NCHW slice
    upper = lpft._Upper(copy.deepcopy(model), n_top)
    h = torch.from_numpy(np.concatenate([c.reshape(-1, *c.shape[2:]) for c in a.lower]))
    batch, val = h[: cfg.train.batch_size], h[: 4 * cfg.train.batch_size]
    y = torch.arange(len(batch)) % 2
    top = upper.top
    with lpft.channels_last(upper):
        for p in upper.parameters():
            p.requires_grad_(True)
        opt = torch.optim.AdamW(upper.parameters(), lr=1e-6, foreach=True)
        layouts = (("channels-last (shipped)", torch.channels_last), ("NCHW slice", None))

        def run(x, train: bool, layout):
            x = x[:, :-1] if takes_mask(model.pool) else x
            if layout is not None:
                x = x.contiguous(memory_format=layout)
            if not train:
                with torch.inference_mode():
                    return top(x)
            loss = F.cross_entropy(upper.head(top(x).mean((2, 3))), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        for train, what, x in ((True, "step", batch), (False, "validation", val)):
            upper.train(train)
            seconds = _common.timed_rounds(
                [(name, lambda x=x, tr=train, m=m: run(x, tr, m)) for name, m in layouts],
                4 * args.repeats,
                "cpu",
            )
            for name, times in seconds.items():
                rates[f"top {what}, input {name}"] = [len(x) / t for t in times]

    # 3. the head on pooled features: AdamW foreach against single-tensor
    feats = torch.from_numpy(np.concatenate([p.reshape(-1, p.shape[-1]) for p in a.pooled])).float()
    labels = torch.arange(len(feats)) % 2
    losses = {}
    for _ in range(args.repeats):
        for name, foreach in (
            ("head steps, AdamW foreach (shipped)", True),
            ("head steps, AdamW single-tensor", False),
        ):
            torch.manual_seed(0)
            head = copy.deepcopy(model.head).train()
            opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4, foreach=foreach)
            steps = 0
            t = time.perf_counter()
            for _epoch in range(4):
                for s in range(0, len(feats), cfg.train.batch_size):
                    xb, yb = feats[s : s + cfg.train.batch_size], labels[s : s + cfg.train.batch_size]
                    loss = F.cross_entropy(head(xb), yb)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    steps += 1
            add(name, steps / (time.perf_counter() - t))
            losses[name] = float(loss.detach())

    print(f"\n{'what':<46} {'best':>9}  runs   (cache: images/s; top: samples/s; head: steps/s)")
    for name, v in rates.items():
        print(f"{name:<46} {max(v):>9.1f}  {' '.join(f'{x:.1f}' for x in v)}")
    print(
        f"pooled frozen features, folded against as it is: largest difference {diff:.2e} (largest value {scale:.2f})"
    )
    print("head loss after the steps: " + ", ".join(f"{k.split(', ')[1]} {v:.6f}" for k, v in losses.items()))
    info["load_avg_after"] = _common.load_avg()
    _common.print_machine(info, f"torch {torch.__version__}")
    _common.write_results(
        args.json,
        info,
        args,
        best={k: max(v) for k, v in rates.items()},
        runs=rates,
        max_feature_difference=diff,
        head_losses=losses,
    )


if __name__ == "__main__":
    main()
