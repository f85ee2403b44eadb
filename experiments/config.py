"""Run configuration: typed dataclasses, YAML presets and dotted `key=value` overrides.

    cfg = load_config("experiments/configs/default.yaml", ["model.dim=128", "train.steps=50"])

Unknown keys are errors that print the full dotted path and the valid keys; values are parsed
as YAML (`3`, `true`, `[a, b]`, `dense,moe`). In lists of named entries (modalities) an item can
be addressed by name: `model.modalities.image.loss_weight=0.5`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mot.config import ModelConfig, check, check_non_negative, check_positive


@dataclass
class TrainConfig:
    """batch_size sequences per micro-batch, `accumulate` micro-batches per optimizer step;
    the learning rate warms up linearly for `warmup` steps, then decays to lr * min_lr_ratio
    at the last step along a cosine or an exponential (`schedule`);
    dtype "bfloat16" runs forward and loss under CPU/CUDA autocast; checkpoints every
    `save_every` steps (and at the end) under out_dir/checkpoints, newest `keep_checkpoints`
    kept; `resume` continues from the newest one; `nonfinite` decides what a NaN/inf loss or
    gradient does: "abort" (stop with the step number) or "skip" (drop the step, go on).
    Under torchrun: `ep` processes share each MoE block's experts (it must divide the number of
    processes; the rest is data parallel), and a rank that dies or hangs stops the others
    within `timeout` seconds."""

    steps: int = 300
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"
    warmup: int = 30
    weight_decay: float = 0.1
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    out_dir: str = "runs/default"
    tb_dir: str | None = None  # TensorBoard folder; default out_dir/tb
    device: str = "cpu"
    threads: int | None = None
    accumulate: int = 1
    dtype: str = "float32"
    save_every: int = 100
    keep_checkpoints: int = 3
    resume: bool = False
    nonfinite: str = "abort"
    ep: int = 1
    timeout: float = 300.0

    def __post_init__(self):
        for key in ("steps", "batch_size", "seq_len", "log_every", "eval_every", "eval_batches",
                    "accumulate", "save_every", "keep_checkpoints", "ep"):
            check_positive(f"train.{key}", getattr(self, key))
        check(self.dtype in ("float32", "bfloat16"),
              f"train.dtype ({self.dtype!r}) must be one of ['float32', 'bfloat16']")
        check(self.nonfinite in ("abort", "skip"),
              f"train.nonfinite ({self.nonfinite!r}) must be one of ['abort', 'skip']")
        check(self.timeout > 0, f"train.timeout ({self.timeout}) must be > 0 seconds")
        check(self.lr > 0, f"train.lr ({self.lr}) must be > 0")
        check(self.schedule in ("cosine", "exponential"),
              f"train.schedule ({self.schedule!r}) must be one of ['cosine', 'exponential']")
        check(self.schedule == "cosine" or self.min_lr_ratio > 0,
              f"train.min_lr_ratio ({self.min_lr_ratio}) must be > 0 for an exponential decay")
        check(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio ({self.min_lr_ratio}) must be "
                                            "in [0, 1]")
        check(0 < self.beta2 < 1, f"train.beta2 ({self.beta2}) must be in (0, 1)")
        for key in ("warmup", "weight_decay", "grad_clip", "seed"):
            check_non_negative(f"train.{key}", getattr(self, key))
        if self.threads is not None:
            check_positive("train.threads", self.threads)


def default_mix() -> dict[str, float]:
    return {"caption_image": 0.3, "image_caption": 0.25, "arithmetic": 0.15, "prose": 0.3}


@dataclass
class DataConfig:
    """name: the token stream: "synthetic" (a generated text+image stream) or "digits" (real
    handwritten digits with captions, arithmetic and prose; see experiments/data/digits.py).
    mix: digits document kinds and their ratios; cache_dir: where built corpora and trained
    tokenizers are kept; text_vocab: BPE vocabulary size; vq_steps, audio_vq_steps: training
    steps of the image VQ-VAE and of the audio VQ (audio kinds need espeak-ng)."""

    name: str = "synthetic"
    path: str | None = None  # the folder of data.name "packed" (python -m experiments.ingest)
    num_tokens: int = 200_000
    val_fraction: float = 0.05
    seed: int = 1234
    mix: dict[str, float] = field(default_factory=default_mix)
    cache_dir: str = "runs/cache"
    text_vocab: int = 512
    vq_steps: int = 1500
    audio_vq_steps: int = 600

    def __post_init__(self):
        from experiments.data import DATASETS

        check(self.name in DATASETS, f"data.name ({self.name!r}) must be one of {sorted(DATASETS)}")
        check_positive("data.num_tokens", self.num_tokens)
        check(0 < self.val_fraction < 0.5, f"data.val_fraction ({self.val_fraction}) must be "
                                           "in (0, 0.5)")
        from experiments.data.digits import KINDS as kinds
        check(isinstance(self.mix, dict) and set(self.mix) <= set(kinds)
              and all(isinstance(v, (int, float)) and v >= 0 for v in self.mix.values())
              and sum(self.mix.values()) > 0,
              f"data.mix ({self.mix!r}) must map some of {list(kinds)} to ratios >= 0, not all 0")
        check_positive("data.text_vocab", self.text_vocab)
        check_positive("data.vq_steps", self.vq_steps)
        check_positive("data.audio_vq_steps", self.audio_vq_steps)

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self):
        check(self.train.seq_len <= self.model.max_seq_len,
              f"train.seq_len ({self.train.seq_len}) must be <= model.max_seq_len "
              f"({self.model.max_seq_len})")


def _dataclass_type(tp) -> type | None:
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def from_dict(cls, data: dict | None, path: str = ""):
    """Build dataclass `cls` from a (YAML) dict, recursing into nested dataclass fields."""
    data = {} if data is None else data
    where = path or "config"
    check(isinstance(data, dict), f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    check(not unknown, f"unknown key(s) {[path + k for k in unknown]}; valid keys under "
                       f"{where}: {names}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        sub = _dataclass_type(tp)
        args = typing.get_args(tp)
        if sub is not None and isinstance(value, dict):
            value = from_dict(sub, value, f"{path}{name}.")
        elif typing.get_origin(tp) is list and args and _dataclass_type(args[0]) \
                and isinstance(value, list):
            value = [from_dict(args[0], v, f"{path}{name}.{i}.") if isinstance(v, dict) else v
                     for i, v in enumerate(value)]
        kwargs[name] = value
    return cls(**kwargs)


def apply_override(data: dict, override: str) -> None:
    """Set `a.b.c=value` in a nested dict (creating mappings on the way)."""
    check("=" in override, f"override {override!r} must look like key=value")
    key, raw = override.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else None
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            index = _list_index(node, part, ".".join(parts[:i + 1]))
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if last:
            node[part] = value
        else:
            node = node.setdefault(part, {})
            check(isinstance(node, (dict, list)), f"override {key!r}: {part!r} holds a value, "
                                                  "not a mapping")


def _list_index(items: list, part: str, where: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    names = [item.get("name") for item in items if isinstance(item, dict)]
    check(part in names, f"override {where!r}: no item {part!r}; valid: "
                         f"{list(range(len(items)))} or names {names}")
    return names.index(part)


def config_to_dict(cfg) -> dict:
    """A plain dict (YAML-ready) of a config, block configs included."""
    return dataclasses.asdict(cfg)


def model_dict(saved: dict) -> dict:
    """A saved model config as today's code reads it (fields added since filled with their
    defaults), for comparing a checkpoint's config with the current one."""
    return config_to_dict(from_dict(ModelConfig, saved, "model."))


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML preset (or start from defaults), apply overrides, validate everything."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        check(path.is_file(), f"config file {str(path)!r} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        check(isinstance(data, dict), f"config file {str(path)!r} must hold a mapping")
    if any("modalities" in o.split("=", 1)[0] for o in overrides):
        # Overrides may address list items: start from the effective modality list.
        model = data.setdefault("model", {})
        if "modalities" not in model:
            model["modalities"] = [dataclasses.asdict(m) for m in ModelConfig().modalities]
    for override in overrides:
        apply_override(data, override)
    return from_dict(RunConfig, data)
