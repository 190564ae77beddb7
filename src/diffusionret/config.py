"""The run config: what ``diffusionret train`` / ``eval`` / ``extract`` read from YAML.

A :class:`RunConfig` is a tree of frozen dataclasses filled from one YAML file plus ``a.b=value``
overrides (:func:`load_run_config`); unknown keys are errors and every section validates itself.
The architecture (:class:`~diffusionret.models.config.ModelConfig`) is *built* from the ``model``
section, so a run config can name a preset, override single fields, start from CLIP weights or
from a checkpoint. Reference values (docs/reference.md §4.4-4.5) are the defaults.

Example (the shape of every file in ``configs/``)::

    stage: discrimination
    output_dir: runs/msrvtt_stage1
    model: {preset: vit_b32, clip_weights: ${DIFFUSIONRET_CLIP}}
    data: {dataset: msrvtt, ...}
    optim: {lr: 1.0e-4, clip_lr_scale: 1.0e-3}
    train: {epochs: 5}
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

from diffusionret.config_utils import ConfigError, apply_overrides, dump_yaml, from_dict, load_yaml, to_dict
from diffusionret.data.config import DataConfig
from diffusionret.inputs import INPUT_FIELDS
from diffusionret.models.config import LEGACY_MODEL_KEYS, InputConfig, ModelConfig
from diffusionret.retrieval.reranker import RerankConfig

logger = logging.getLogger(__name__)

Stage = Literal["discrimination", "generation"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Device = Literal["auto", "cpu", "cuda"]
Ties = Literal["optimistic", "pessimistic", "mean", "reference"]

# Set by the run, not model.arch: whether there are denoisers follows from ``stage``, and their
# temperature from the diffusion section (stage 2 sets it on the network it loads).
_RUN_FIELDS = ("denoisers", "denoiser_temp", *LEGACY_MODEL_KEYS)


@dataclass(frozen=True)
class ModelSection:
    """Which network a run trains or evaluates.

    Attributes:
        preset: ``vit_b32`` (the paper's model) or ``tiny`` (CPU tests and the demo).
        arch: fields of :class:`ModelConfig` to change on the preset (``agg_module``,
            ``temporal_layers``, ``max_position``, a nested ``clip`` mapping). With ``clip_weights``
            the CLIP part is inferred from the weights instead.
        clip_weights: OpenAI-format CLIP file (``ViT-B-32.pt``) to start stage 1 from; ``None``
            starts from random CLIP weights (tests only: retrieval will be poor).
        init_checkpoint: a checkpoint to start from. Required for stage 2 (the stage-1 result: a
            trainer ``last.pt``, a ``model.safetensors`` / run folder, or an official ``best.pth``);
            optional for stage 1 (continue fine-tuning a model).
        init_use_ema: take the EMA weights of a trainer ``init_checkpoint``.
    """

    preset: Literal["vit_b32", "tiny"] = "vit_b32"
    arch: dict[str, Any] = field(default_factory=dict)
    clip_weights: Optional[Path] = None
    init_checkpoint: Optional[Path] = None
    init_use_ema: bool = False

    def __post_init__(self) -> None:
        bad = sorted(set(self.arch) & set(_RUN_FIELDS))
        if bad:
            raise ValueError(f"model.arch: {bad} are set by the run (stage / diffusion section), not the architecture")
        # Validate the architecture now, so a typo fails at load time and not after data loading.
        self.architecture()
        if self.clip_weights is not None and self.init_checkpoint is not None:
            raise ValueError("give model.clip_weights or model.init_checkpoint, not both")

    def architecture(self, **changes: Any) -> ModelConfig:
        """The :class:`ModelConfig` of ``preset`` with ``arch`` (then ``changes``) applied."""
        base = ModelConfig.tiny() if self.preset == "tiny" else ModelConfig.vit_b32()
        merged = to_dict(base)
        for key, value in {**self.arch, **changes}.items():
            if key == "clip" and isinstance(value, Mapping):
                merged["clip"] = {**merged["clip"], **value}
            else:
                merged[key] = to_dict(value)
        return from_dict(ModelConfig, merged, "model.arch")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with the reference's groups and hyperparameters (docs/reference.md §4.3).

    Attributes:
        lr: learning rate of the non-CLIP parameters (reference 1e-4).
        clip_lr_scale: CLIP learning rate = ``lr * clip_lr_scale`` (reference ``coef_lr`` 1e-3).
        weight_decay: decoupled weight decay of matrices (reference 0.2); biases and norms get 0.
        betas, eps: Adam moments (reference 0.9 / 0.98, 1e-6).
        warmup_proportion: fraction of all optimizer steps spent in linear warm-up (reference 0.1).
        grad_clip: global gradient-norm clip (reference 1.0); ``None`` disables it.
        max_logit_scale: upper clamp of CLIP's log-temperature after every step (ln 100).
    """

    lr: float = 1e-4
    clip_lr_scale: float = 1e-3
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_proportion: float = 0.1
    grad_clip: Optional[float] = 1.0
    max_logit_scale: float = math.log(100.0)

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.clip_lr_scale < 0 or self.weight_decay < 0:
            raise ValueError("lr must be > 0, clip_lr_scale and weight_decay >= 0")
        if not all(0.0 <= b < 1.0 for b in self.betas) or self.eps <= 0:
            raise ValueError(f"betas must be in [0, 1) and eps > 0, got {self.betas}, {self.eps}")
        if not 0.0 <= self.warmup_proportion < 1.0:
            raise ValueError(f"warmup_proportion must be in [0, 1), got {self.warmup_proportion}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or null, got {self.grad_clip}")


@dataclass(frozen=True)
class TrainConfig:
    """The training loop.

    Attributes:
        epochs: passes over the training split (reference 5).
        max_steps: stop after this many optimizer steps (smoke runs); the LR schedule spans
            ``min(max_steps, epochs * steps_per_epoch)``.
        shuffle: shuffle the training split every epoch (seeded by ``data.seed + epoch``).
        precision: ``auto`` = bf16 autocast on GPUs that support it (else fp16 with loss scaling),
            fp32 on CPU; ``fp32`` everywhere disables autocast.
        device: ``auto`` = CUDA when available.
        ema_decay: EMA of the trainable weights (reference ``moment`` 0.99); ``null`` disables it.
        log_every: log the running losses every this many steps (reference ``n_display`` 50).
        checkpoint_every: also write ``last.pt`` every this many steps (``null``: every epoch only).
        keep_epoch_checkpoints: keep ``epoch_<k>.pt`` for every epoch besides ``last.pt``.
        find_unused_parameters: DDP option, for model variants with parameters a step does not use.
        feature_cache: generation stage only: ``on`` encodes the training split once with the frozen
            model into a memory-mapped feature file and trains the denoisers from it, in their
            factored form (the same losses and gradients as encoding every step up to float
            rounding, much faster); ``off`` encodes every step;
            ``auto`` = ``on`` when the training data is deterministic (``data.augment: none``) or
            when ``feature_cache_views`` caches several augmented views.
        feature_cache_views: with ``data.augment``, cache this many augmented views of every video
            (view v is the augmentation draw of epoch v) and train epoch e from view ``e mod N``; 1
            (the default) caches the one deterministic view and needs ``data.augment: none``.
        feature_cache_dir: folder of the cache (``train.safetensors`` and, while encoding, its
            shards); default ``<output_dir>/feature_cache``. Must be shared by all ranks. A cache
            made by another model or other input settings is detected and re-encoded.
        feature_cache_dtype: storage dtype of the cached features: ``float32`` (training is then the
            same as without the cache) or ``float16`` (half the disk and page cache; not bit-equal).
    """

    epochs: int = 5
    max_steps: Optional[int] = None
    shuffle: bool = True
    precision: Precision = "auto"
    device: Device = "auto"
    ema_decay: Optional[float] = 0.99
    log_every: int = 50
    checkpoint_every: Optional[int] = None
    keep_epoch_checkpoints: bool = False
    find_unused_parameters: bool = False
    # ``bool`` too: YAML 1.1 reads an unquoted on/off as true/false; normalised to "on"/"off" below.
    feature_cache: Union[Literal["auto", "on", "off"], bool] = "auto"
    feature_cache_dir: Optional[Path] = None
    feature_cache_dtype: Literal["float32", "float16"] = "float32"
    feature_cache_views: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.feature_cache, bool):
            object.__setattr__(self, "feature_cache", "on" if self.feature_cache else "off")
        if self.epochs <= 0 or self.log_every <= 0:
            raise ValueError("epochs and log_every must be positive")
        if self.feature_cache_views < 1:
            raise ValueError(f"feature_cache_views must be >= 1, got {self.feature_cache_views}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive or null, got {self.max_steps}")
        if self.checkpoint_every is not None and self.checkpoint_every <= 0:
            raise ValueError(f"checkpoint_every must be positive or null, got {self.checkpoint_every}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) or null, got {self.ema_decay}")


@dataclass(frozen=True)
class DiffusionConfig:
    """The generation stage's diffusion process (docs/reference.md §1.6-1.7, §2).

    Attributes:
        steps: diffusion steps T, for training *and* re-ranking (reference README: 50; its
            training default of 1000 mismatched evaluation, docs/reference.md §8.13); recorded with the model.
        schedule: ``cosine`` (reference) or ``linear``.
        denoiser_temp: temperature of the denoisers' frame pooling (``--temp`` 1).
        num_negatives: hard negatives per query in training (``--num`` 127), capped to what the
            global batch offers.
        negative_label: value of the negatives in x0 (``--neg``: 0 or -1).
        loss_temp: CE temperature of the generation loss (``--d_temp`` 100).
        negatives: where the hard negatives come from: ``batch`` (the reference: the global batch)
            or ``dataset`` (the whole training split, by WTI similarity over the cached features;
            needs the feature cache). Never the query's own video nor a video with the same caption.
    """

    steps: int = 50
    schedule: Literal["cosine", "linear"] = "cosine"
    denoiser_temp: float = 1.0
    num_negatives: int = 127
    negative_label: Literal[0, -1] = 0
    loss_temp: float = 100.0
    negatives: Literal["batch", "dataset"] = "batch"

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.num_negatives <= 0 or self.loss_temp <= 0 or self.denoiser_temp <= 0:
            raise ValueError("steps, num_negatives, loss_temp and denoiser_temp must be positive")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation, both after training and by ``diffusionret eval``.

    Attributes:
        split: the split metrics are reported on (``test`` = ``data.test_split``).
        model_selection: which weights a training run keeps as its result (``model.safetensors``):
            ``val``: the best epoch (model or EMA) on ``data.val_split``, which must be a real
            validation split; ``last``: the final epoch, for datasets without a validation split
            (MSR-VTT 1k-A and ActivityNet val_1 are the test sets; the reference selected on them,
            docs/reference.md §8.8); ``test``: the reference's behaviour, selection on the test split
            (optimistic numbers; logged as a warning).
        test_after_training: evaluate the selected model on the test split when training ends.
        chunk_size: texts/videos per block of the WTI matrix (bounded memory).
        rerank: also report the diffusion re-ranked ranking (generation-stage models; a model
            without denoisers is evaluated discriminatively, with a warning).
        top_k: candidates per query re-ranked (``t2v_num`` / ``v2t_num`` 32).
        alpha, temp: fusion ``sim + alpha * softmax(temp * x0)`` (reference 1, 1).
        eta: DDIM eta of the re-ranking sampler (0: deterministic, the reference).
        ties: tie policy of the metrics (``reference`` reproduces the reference's counting).
        seed: seed of the re-ranking noise, so two evaluations give the same numbers.
        allow_missing: report metrics although videos of the split could not be read.
        select_metric: ``<direction>/<metric>`` used for model selection (higher is better).
        precision: autocast for feature extraction (``auto``: bf16/fp16 on GPU, fp32 on CPU).
        every_epochs: validate every this many epochs (the last epoch is always validated).
    """

    split: str = "test"
    model_selection: Literal["val", "last", "test"] = "val"
    test_after_training: bool = True
    chunk_size: int = 128
    rerank: bool = True
    top_k: int = 32
    alpha: float = 1.0
    temp: float = 1.0
    eta: float = 0.0
    ties: Ties = "optimistic"
    seed: int = 42
    allow_missing: bool = False
    select_metric: str = "t2v/R1"
    precision: Precision = "auto"
    every_epochs: int = 1

    def __post_init__(self) -> None:
        if min(self.chunk_size, self.top_k, self.every_epochs) <= 0:
            raise ValueError("chunk_size, top_k and every_epochs must be positive")
        if not re.fullmatch(r"(t2v|v2t)/\w+", self.select_metric):
            raise ValueError(f"select_metric must look like 't2v/R1', got {self.select_metric!r}")


@dataclass(frozen=True)
class RunConfig:
    """One training or evaluation run.

    Attributes:
        stage: ``discrimination`` (stage 1) or ``generation`` (stage 2: needs ``model.init_checkpoint``).
        output_dir: the run folder (config, metrics, logs, plots, checkpoints).
        data: the dataset (:class:`~diffusionret.data.config.DataConfig`), including the *global*
            batch sizes (``batch_size``: training, reference 128, divisible by the world size;
            stage 2 mines its negatives from it; ``batch_size_val``: feature extraction) and workers.
        seed: global seed (model init, shuffling, stage-2 noise).
    """

    stage: Stage
    output_dir: Path
    data: DataConfig
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 42
    #: Which of the input settings of ``data`` (:data:`INPUT_FIELDS`) the YAML file or an override
    #: wrote; evaluating a checkpoint takes the others from the input config it records. Set by
    #: :func:`load_run_config` (a config built in Python states all of them); not part of the YAML.
    data_inputs_given: frozenset[str] = field(default=frozenset(INPUT_FIELDS), compare=False, repr=False,
                                              metadata={"config": False})

    def __post_init__(self) -> None:
        if self.stage == "generation" and self.model.init_checkpoint is None:
            raise ValueError("stage 'generation' starts from a stage-1 checkpoint: set model.init_checkpoint")
        if self.eval.model_selection == "val" and self.data.val_split is None:
            raise ValueError(f"eval.model_selection is 'val' but data.val_split is not set: dataset "
                             f"{self.data.dataset!r} would validate on its test split. Set data.val_split to a "
                             f"real validation split, or eval.model_selection to 'last' (final epoch) or "
                             f"'test' (the reference's test-set selection)")
        cache = self.train.feature_cache
        if cache == "on" and self.stage != "generation":
            raise ValueError("train.feature_cache 'on' applies to stage 'generation' only (stage 1 trains the "
                             "encoders, whose features change every step); use 'auto' or 'off'")
        views = self.train.feature_cache_views
        if cache == "on" and self.data.augment != "none" and views == 1:
            raise ValueError(f"train.feature_cache 'on' with data.augment {self.data.augment!r}: a cache holds one "
                             "deterministic view per sample, so augmentation would be lost; set data.augment "
                             "to 'none', train.feature_cache_views to 2 or more (augmented views), or "
                             "train.feature_cache to 'auto'/'off'")
        if views > 1 and self.data.augment == "none":
            raise ValueError(f"train.feature_cache_views {views} with data.augment 'none': without augmentation "
                             "every view is the same; set train.feature_cache_views to 1")
        if self.stage == "generation" and self.diffusion.negatives == "dataset" and (
                not self.uses_feature_cache() or self.data.augment != "none"):
            raise ValueError("diffusion.negatives 'dataset' mines negatives over the cached features of the whole "
                             "training split: it needs train.feature_cache 'on'/'auto' and data.augment 'none'")

    def uses_feature_cache(self) -> bool:
        """Whether training runs from the feature cache (``train.feature_cache`` resolved)."""
        if self.stage != "generation" or self.train.feature_cache == "off":
            return False
        # ``auto``: a deterministic pipeline gives the same features every epoch; with augmentation,
        # only cached augmented views stand in for the online draws.
        return self.data.augment == "none" or self.train.feature_cache_views > 1

    def model_config(self) -> ModelConfig:
        """The architecture a fresh model of this run gets (denoisers for stage 2, their temperature)."""
        return self.model.architecture(denoisers=self.stage == "generation", denoiser_temp=self.diffusion.denoiser_temp)

    def rerank_config(self) -> RerankConfig:
        """Re-ranking as this run evaluates: the diffusion section's process, the eval section's fusion."""
        d, ev = self.diffusion, self.eval
        return RerankConfig(steps=d.steps, schedule=d.schedule, top_k=ev.top_k, alpha=ev.alpha, temperature=ev.temp,
                            eta=ev.eta)

    def with_model_inputs(self, recorded: InputConfig, source: str = "the model") -> "RunConfig":
        """This run with the input settings it did not state taken from a model's ``recorded`` ones.

        Settings the run states (:attr:`data_inputs_given`) are kept, with a warning when they
        differ from the model's: its numbers will be off.
        """
        taken = {name: getattr(recorded, name) for name in INPUT_FIELDS
                 if name not in self.data_inputs_given and getattr(recorded, name) != getattr(self.data, name)}
        differ = {name: (getattr(recorded, name), getattr(self.data, name)) for name in INPUT_FIELDS
                  if name in self.data_inputs_given and getattr(recorded, name) != getattr(self.data, name)}
        if differ:
            logger.warning("%s was trained with other input settings than data.* of this run: %s", source,
                           ", ".join(f"{k} {a!r} (model) != {b!r} (run)" for k, (a, b) in differ.items()))
        if not taken:
            return self
        logger.info("input settings from %s: %s", source, ", ".join(f"{k}={v!r}" for k, v in taken.items()))
        return dataclasses.replace(self, data=dataclasses.replace(self.data, **taken))

    def input_config(self) -> InputConfig:
        """The input settings of this run's data section (recorded with the models it saves)."""
        data = self.data
        return InputConfig(max_frames=data.max_frames, fps=data.fps, sampling=data.sampling, size=data.size,
                           max_words=data.max_words)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_yaml(self) -> str:
        return dump_yaml(self)


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(data: Any, where: str = "config") -> Any:
    """Replace ``${NAME}`` in every string of a nested config with the environment variable ``NAME``.

    Raises:
        ConfigError: naming the key, when a referenced variable is not set.
    """
    if isinstance(data, dict):
        return {k: expand_env(v, f"{where}.{k}") for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v, f"{where}[{i}]") for i, v in enumerate(data)]
    if isinstance(data, str):
        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise ConfigError(f"{where}: environment variable ${{{name}}} is not set")
            return os.environ[name]

        return _ENV.sub(sub, data)
    return data


def load_run_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a run config from YAML plus ``a.b=value`` overrides; ``${VAR}`` is read from the environment.

    Relative paths stay relative to the working directory (the command in each config's first
    line is run from the repository root).

    Raises:
        ConfigError: naming the file and key, for unknown keys, bad values or unset variables.
    """
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    try:
        config = from_dict(RunConfig, expand_env(data))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from exc
    section = data.get("data")
    given = frozenset(INPUT_FIELDS) & frozenset(section if isinstance(section, Mapping) else ())
    return dataclasses.replace(config, data_inputs_given=given)
