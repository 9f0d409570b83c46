"""One typed configuration for the whole pipeline.

A YAML file sets values, the CLI overrides them (``--set section.key=value``),
unknown keys are rejected with the list of valid ones, and the resolved config
is saved as ``config.yaml`` in every run folder.

Defaults where the paper (Romero et al. 2019) is silent are our choices; each is
commented. ``presets/quick.yaml`` (CPU demo) and ``presets/paper.yaml`` (full
protocol for a GPU) override them.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from liverlesion.decision import parse_threshold_method
from liverlesion.errors import UserError
from liverlesion.fileio import write_text
from liverlesion.model_input import POOLS


@dataclass
class PatchConfig:
    """How lesion-centred 2-D / 2.5-D patches are cut (patches.py)."""

    mode: str = "2.5d"  # "2.5d": k neighbours stacked as channels; "2d": each slice a sample (grey -> 3 ch)
    neighbours: int = 1  # k slices each side of the largest cross-section (2.5d: 2k+1 channels)
    stacks: int = 1  # 2.5d: also a stack centred on each of m slices either side (2m+1 samples); 2d: ignored
    slice_step_mm: float = 0.0  # spacing between neighbouring slices in mm; 0 = native slice spacing
    size_px: int = 224  # output patch side in pixels (paper input not stated; quick: 160, paper: 299)
    margin_mm: float = (
        4.0  # context around the lesion's bounding box on each side (tight: the lesion fills the input)
    )
    min_field_mm: float = 16.0  # smallest field of view, so tiny lesions keep some surrounding liver
    scale_with_lesion: bool = True  # field = lesion extent + margin (False: fixed field = min_field_mm)
    window_center: float = 60.0  # liver window centre in HU (common 60/150 soft-tissue liver window)
    window_width: float = 250.0  # liver window width in HU; widened slightly so water (0 HU) is not clipped
    interpolation: str = "linear"  # resampling of the image: linear | bspline | nearest


@dataclass
class ModelConfig:
    """Network: timm backbone + the paper's head (model.py)."""

    backbone: str = "inception_v3"  # any timm name; inception_v3 has the paper's 2048 pooled channels
    weights: str = "imagenet"  # imagenet | none | PATH to a checkpoint or state_dict
    head_hidden: int = 512  # paper: FC 512 -> Dropout 0.4 -> FC 512
    dropout: float = 0.4  # paper
    freeze_backbone_epochs: int = 0  # train only the head for the first N epochs
    freeze_bn: bool = False  # pretrained weights only: keep backbone BatchNorm statistics fixed (try for very small batches)
    # late fusion of the network with the radiomics-style features: radiomics_vote (the handcrafted half
    # is the soft vote of the radiomics LR and RF baselines) | radiomics (the LR alone, as before
    # 2026-12-07) | none (the paper)
    fusion: str = "radiomics_vote"
    # the network's weight a in the fused logits a*network + (1-a)*handcrafted half, each half calibrated
    # first: a number in [0, 1], taken where mixing the network in at it lowers the NLL on the training
    # patients' out-of-fold logits, else 0 (0.2: a minority vote, see README "fusion") | auto (chosen
    # per fold on the same logits, one-standard-error rule on NLL and on ROC AUC)
    fusion_weight: str = "0.2"
    # where the head reads the backbone: mid (second-to-last timm stage; inception_v3: Mixed_6e, 768
    # channels: mid-level features describe texture) | last (the paper: Mixed_7c, 2048) | a stage name
    features_from: str = "mid"
    # how the feature map becomes one vector: lesion (average inside the lesion mask, which the network
    # then takes as one extra input channel; the lesion's features, not the surrounding liver's) |
    # global (average over the whole patch, the paper's GAP; the paper preset)
    pool: str = "lesion"
    tta: str = "flips"  # test-time augmentation, identical in cv/predict/serve/export: flips | none


@dataclass
class TrainConfig:
    """Optimisation (train.py)."""

    recipe: str = (
        "lpft"  # lpft: head on frozen features, then top blocks fine-tuned (cached) | end_to_end (paper)
    )
    epochs: int = 30  # end_to_end / lpft fine-tuning stage: upper bound (early stopping on inner validation)
    probe_epochs: int = 60  # lpft stage 1: epochs of the head on cached frozen features (early stopping)
    probe_lr: float = 1e-3  # lpft stage 1: AdamW learning rate of the head
    finetune_blocks: int = (
        1  # lpft stage 2: last backbone blocks fine-tuned on cached activations (0: probe only)
    )
    finetune_lr: float = 1e-4  # lpft stage 2: learning rate of the unfrozen blocks and the head
    aug_views: int = 2  # lpft: augmented views per lesion (and per stack) whose frozen activations are cached
    # lpft fine-tuning stage: cached views of each lesion sample drawn at random per epoch (0: every
    # view every epoch). Fewer make an epoch shorter, so early stopping looks more often and stops
    # sooner after the best epoch; train.epochs and train.patience then count these shorter epochs
    finetune_views: int = 0
    batch_size: int = 32
    lr: float = 3e-4  # AdamW learning rate for the head; backbone gets lr * backbone_lr_mult
    backbone_lr_mult: float = 0.3  # pretrained layers move more slowly than the new head
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # adamw | sgd
    scheduler: str = "cosine"  # cosine | none
    warmup_epochs: int = 1
    patience: int = 6  # early-stopping patience (epochs) on inner-validation loss
    # early stopping counts an epoch as better only when the inner-validation loss (nats per lesion)
    # falls by more than this below the last epoch that counted; a loss creeping down by less no longer
    # keeps training going. The kept weights are still those of the lowest loss seen. 0.002: more than a
    # patience's worth of the creep (0.0015 in 6 epochs) that once kept a fold training 28 epochs instead
    # of about 11, and far under the epoch-to-epoch noise of ~40 validation lesions (see README)
    min_delta: float = 0.002
    # early stopping and the kept epoch compare inner-validation cross-entropy: calibrated (after the
    # temperature the fold fits on it afterwards, so over-confidence alone does not count) | loss (raw)
    select_on: str = "calibrated"
    val_fraction: float = 0.2  # inner validation split (by patient) of each training fold
    class_weighting: str = "loss"  # loss (weighted cross-entropy) | sampler | none
    label_smoothing: float = 0.0
    seed: int = 0
    deterministic: bool = False  # torch deterministic algorithms (slower)
    num_workers: int = 0  # DataLoader workers
    precision: str = "auto"  # auto (16-mixed on GPU, 32 on CPU) | 32 | 16-mixed | bf16-mixed
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: str = "auto"  # number of devices or "auto" (DDP under torchrun)
    max_threads: int = 0  # torch CPU threads; 0 = torch default
    # augmentation (training only)
    aug_flip: bool = True  # random horizontal and vertical flips
    aug_rotate_deg: float = 15.0  # uniform rotation in [-deg, deg]
    aug_scale: float = 0.1  # uniform zoom in [1-s, 1+s]
    aug_intensity: float = (
        0.02  # brightness/contrast jitter on the windowed [0, 1] scale; small, as HU are calibrated
    )


@dataclass
class CVConfig:
    """Cross-validation (splits.py)."""

    folds: int = 5  # patient-level StratifiedGroupKFold
    seed: int = 0


@dataclass
class EvalConfig:
    """Evaluation (evaluate.py)."""

    positive_class: str = "metastasis"  # metrics' positive class
    n_bootstrap: int = 1000  # patient-level bootstrap resamples for 95% CIs
    threshold: str = "youden"  # how the threshold is chosen on inner-validation data: youden | a probability
    min_size_mm: float = (
        5.0  # lesions whose smallest axis is below this are "too small to characterise" (cv and predict)
    )
    n_calibration_bins: int = 10
    gradcam_max: int = 24  # lesions shown in the Grad-CAM gallery


@dataclass
class Config:
    """The resolved configuration."""

    preset: str = "default"
    patch: PatchConfig = field(default_factory=PatchConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        return write_text(path, self.to_yaml())


PRESETS_DIR = Path(__file__).parent / "presets"
#: ``--preset default``: the built-in defaults, the same as giving no preset.
DEFAULT_PRESET = "default"


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _coerce(value: Any, target_type: Any, where: str) -> Any:
    t = (
        target_type
        if isinstance(target_type, type)
        else {"int": int, "float": float, "bool": bool, "str": str}.get(str(target_type), str)
    )
    if t is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"config {where}={value!r}: expected true or false")
    try:
        if t is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return t(value)
    except (TypeError, ValueError) as e:
        raise UserError(f"config {where}={value!r}: expected a value of type {t.__name__}") from e


def _apply(obj: Any, updates: dict[str, Any], where: str) -> None:
    valid = {f.name: f for f in fields(obj)}
    for key, value in updates.items():
        if key not in valid:
            near = difflib.get_close_matches(str(key), list(valid), n=1)
            hint = f"did you mean {where}{near[0]}? " if near else ""
            raise UserError(
                f"config key '{where}{key}' is unknown; {hint}valid keys here: {', '.join(sorted(valid))}"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"config {where}{key}: expected a mapping of settings, got {value!r}")
            _apply(current, value, f"{where}{key}.")
        else:
            setattr(obj, key, _coerce(value, valid[key].type, f"{where}{key}"))


_CHOICES: dict[str, tuple[str, ...]] = {
    "patch.mode": ("2.5d", "2d"),
    "patch.interpolation": ("linear", "bspline", "nearest"),
    "model.fusion": ("radiomics_vote", "radiomics", "none"),
    "model.tta": ("flips", "none"),
    "model.pool": POOLS,  # model_input owns the list
    "train.select_on": ("loss", "calibrated"),
    "train.recipe": ("lpft", "end_to_end"),
    "train.optimizer": ("adamw", "sgd"),
    "train.scheduler": ("cosine", "none"),
    "train.class_weighting": ("loss", "sampler", "none"),
    "train.precision": ("auto", "32", "32-true", "16-mixed", "bf16-mixed"),
    "train.accelerator": ("auto", "cpu", "gpu", "cuda", "mps"),
}
# (lowest, highest, inclusive low) of numeric settings; None = unbounded
_RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "patch.neighbours": (0, 10, True),
    "patch.stacks": (0, 10, True),
    "patch.slice_step_mm": (0, 50, True),
    "patch.size_px": (8, 1024, True),
    "patch.margin_mm": (0, 100, True),
    "patch.min_field_mm": (1, 500, True),
    "patch.window_width": (1, 5000, True),
    "model.head_hidden": (1, 65536, True),
    "model.dropout": (0, 1, True),
    "model.freeze_backbone_epochs": (0, None, True),
    "train.epochs": (1, None, True),
    "train.probe_epochs": (1, None, True),
    "train.probe_lr": (0, 10, False),
    "train.finetune_blocks": (0, 50, True),
    "train.finetune_lr": (0, 10, False),
    "train.aug_views": (0, 256, True),
    "train.finetune_views": (0, 256, True),
    "train.batch_size": (1, None, True),
    "train.lr": (0, 10, False),
    "train.backbone_lr_mult": (0, 100, True),
    "train.weight_decay": (0, 10, True),
    "train.warmup_epochs": (0, None, True),
    "train.patience": (1, None, True),
    "train.min_delta": (0, 10, True),
    "train.val_fraction": (0, 0.9, False),
    "train.label_smoothing": (0, 1, True),
    "train.num_workers": (0, 256, True),
    "train.max_threads": (0, 4096, True),
    "cv.folds": (2, 100, True),
    "eval.n_bootstrap": (0, 1_000_000, True),
    "eval.n_calibration_bins": (2, 1000, True),
    "eval.gradcam_max": (0, 10000, True),
    "eval.min_size_mm": (0, 1000, True),
}


def validate_config(cfg: Config) -> Config:
    """Check every value of a resolved config (choices, ranges, formats) before any work starts.

    Raises:
        UserError: naming the first bad setting, its value and what it accepts.
    """
    data = cfg.to_dict()
    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = str(data[section][name]).strip().lower()
        if value not in allowed:
            raise UserError(
                f"config {key}={data[section][name]!r}: unknown; choose one of {', '.join(allowed)}"
            )
        setattr(getattr(cfg, section), name, value)
    for key, (lo, hi, inclusive) in _RANGES.items():
        section, name = key.split(".")
        v = float(data[section][name])
        bad = (
            not (v == v)
            or (lo is not None and (v < lo if inclusive else v <= lo))
            or (hi is not None and v > hi)
            or (key == "model.dropout" and v >= 1)
        )
        if bad:
            low = f"{'>=' if inclusive else '>'} {lo:g}" if lo is not None else ""
            high = f"<= {hi:g}" if hi is not None else ""
            rng = " and ".join(x for x in (low, high) if x)
            raise UserError(f"config {key}={data[section][name]!r}: out of range; use a value {rng}")
    if cfg.patch.mode == "2d" and cfg.patch.neighbours < 0:
        raise UserError(f"config patch.neighbours={cfg.patch.neighbours}: must be >= 0")
    parse_threshold_method(cfg.eval.threshold)
    cfg.model.fusion_weight = str(cfg.model.fusion_weight).strip().lower()
    fixed_fusion_weight(cfg.model)  # raises on a bad value
    d = str(cfg.train.devices).strip().lower()
    if not (d == "auto" or d.isdigit() and int(d) >= 1):
        raise UserError(
            f"config train.devices={cfg.train.devices!r}: use auto or a number of devices, e.g. 1"
        )
    if not cfg.eval.positive_class.strip():
        raise UserError(
            "config eval.positive_class is empty; name the positive lesion class, e.g. metastasis"
        )
    return cfg


# model.fusion -> what its handcrafted half is (the words the report and the console use)
FUSION_HALF = {
    "radiomics_vote": "the soft vote (mean probability) of a logistic regression and a random forest on "
    "the radiomics-style features, the two radiomics baselines",
    "radiomics": "a logistic regression on the radiomics-style features",
}


def fusion_votes(model: ModelConfig) -> bool:
    """Whether the fusion's handcrafted half is the LR and RF vote (``radiomics_vote``), not the LR alone."""
    return model.fusion == "radiomics_vote"


def fixed_fusion_weight(model: ModelConfig) -> float | None:
    """``model.fusion_weight`` as a number, or None for ``auto`` (chosen per fold by ``fusion.choose_alpha``)."""
    text = str(model.fusion_weight).strip().lower()
    if text == "auto":
        return None
    try:
        w = float(text)
    except ValueError:
        w = float("nan")
    if not 0.0 <= w <= 1.0:  # also NaN
        raise UserError(
            f"config model.fusion_weight={model.fusion_weight!r}: use a number from 0 (the radiomics "
            "half alone) to 1 (the network alone), e.g. 0.2, or auto"
        )
    return w


def _read_yaml_config(path: Path, name: str, fix: str) -> dict[str, Any]:
    """A YAML config file's sections (``{}`` when empty); ``name`` and ``fix`` word its one-line errors."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{name}: not UTF-8 text (byte {e.start}); save the YAML config as UTF-8 text") from e
    except OSError as e:
        raise UserError(f"{name}: cannot be read ({e.strerror}); check the path and its permissions") from e
    except yaml.YAMLError as e:
        raise UserError(f"{name}: not valid YAML ({str(e).splitlines()[0]}); {fix}") from e
    if data is not None and not isinstance(data, dict):
        raise UserError(f"{name}: expected a mapping of sections (patch:, model:, train:, ...); {fix}")
    return data or {}


def load_config(
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    base: Config | None = None,
) -> Config:
    """Resolve a config: defaults (or ``base``) <- preset <- YAML file <- overrides.

    Args:
        path: Optional YAML file.
        preset: Optional preset name (``quick``, ``paper``, ...).
        overrides: ``["train.epochs=5", ...]`` or a nested dict.
        base: Start from this config instead of the defaults (e.g. a run's own, to resume it).
    """
    cfg = Config() if base is None else config_from_dict(base.to_dict())
    if preset == DEFAULT_PRESET:  # the built-in defaults by name, as the README calls them
        preset = None
    if preset:
        p = PRESETS_DIR / f"{preset}.yaml"
        if not p.exists():
            raise UserError(
                f"--preset {preset!r} is unknown; choose one of: {', '.join(available_presets())}, "
                f"or {DEFAULT_PRESET} (the built-in defaults, as with no --preset)"
            )
        _apply(cfg, yaml.safe_load(p.read_text()) or {}, "")
        cfg.preset = preset
    if path:
        path = Path(path)
        if path.is_dir():
            raise UserError(f"--config {path}: is a folder; give the path of a YAML config file")
        if not path.is_file():
            raise UserError(f"--config {path}: file not found; give the path of a YAML config file")
        _apply(cfg, _read_yaml_config(path, f"--config {path}", "fix the syntax"), "")
    if isinstance(overrides, dict):
        _apply(cfg, overrides, "")
    else:
        for item in overrides or []:
            if "=" not in item:
                raise UserError(f"--set {item!r}: expected section.key=value, e.g. train.epochs=5")
            key, value = item.split("=", 1)
            parts = key.strip().split(".")
            nested: dict[str, Any] = {}
            d = nested
            for p_ in parts[:-1]:
                d = d.setdefault(p_, {})
            d[parts[-1]] = yaml.safe_load(value) if value.strip() else value
            _apply(cfg, nested, "")
    return validate_config(cfg)


# Settings added after configs were first saved, and the value that reproduces what a saved config
# without them did: a checkpoint or run folder from before ``patch.stacks`` cut one stack per lesion, and
# one from before ``train.min_delta`` stopped early on any fall of the loss (``--resume`` keeps that).
_BEFORE_SETTING: dict[tuple[str, str], Any] = {("patch", "stacks"): 0, ("train", "min_delta"): 0.0}


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict()`` output (stored in a checkpoint or a run's config.yaml).

    A setting the saved config lacks because it was written before the setting existed takes the
    value that keeps its old behaviour (``_BEFORE_SETTING``), not today's default.
    """
    data = dict(data)
    for (section, key), old in _BEFORE_SETTING.items():
        if isinstance(data.get(section), dict) and key not in data[section]:
            data[section] = {**data[section], key: old}
    cfg = Config()
    _apply(cfg, data, "")
    return validate_config(cfg)


#: Settings that change how a run is computed, not what: a resumed run may change them (e.g. resumed on a
#: GPU, or with more threads). The evaluation settings are applied afresh to every fold at the end.
RESUMABLE_SETTINGS = frozenset(
    {
        "preset",  # a name; its values are compared one by one
        "train.accelerator",
        "train.devices",
        "train.max_threads",
        "train.num_workers",
        "eval.n_bootstrap",
        "eval.gradcam_max",
        "eval.n_calibration_bins",
    }
)


def setting_differences(
    before: Config, now: Config, ignore: frozenset[str] = RESUMABLE_SETTINGS
) -> list[str]:
    """``section.key before -> now`` for every setting, other than ``ignore``, that differs."""

    def flat(cfg: Config) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in cfg.to_dict().items():
            if isinstance(value, dict):
                out.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                out[key] = value
        return out

    a, b = flat(before), flat(now)
    return [f"{k} {a[k]!r} -> {b.get(k)!r}" for k in a if k not in ignore and a[k] != b.get(k)]


def load_run_config(path: str | Path) -> Config:
    """The config.yaml a run folder was written with (:func:`config_from_dict` rules)."""
    return config_from_dict(_read_yaml_config(Path(path), str(path), "fix or delete the file"))
