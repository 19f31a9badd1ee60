"""Typed, validated configuration: the model, the data and the training run.

A run is described by one YAML file with three sections (`model`, `data`, `train`). Each maps onto
a dataclass below; unknown keys, wrong types and bad values raise `UserError` with one line that
names the key. No global argument object: these objects are passed to whatever needs them.

`ModelConfig.layer_attention` names each layer's attention variant by looking up (layer kind,
attention_impl) in `ATTENTION_VARIANTS`; what a variant computes and costs is lm.attention's to say.
"""

import dataclasses
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from core.errors import UserError
from lm.config_layout import check_parallel_layout
from lm.config_types import apply_overrides, build_section, did_you_mean

# What `model.arch` sets; explicit keys override it. GPT-2 (2019) and the Llama layout (Touvron et
# al., 2023): rotary positions, RMSNorm, a SwiGLU MLP, no biases, an output layer of its own.
ARCH_PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": {"position": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True, "tie_embeddings": True},
    "llama": {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "tie_embeddings": False},
}


@dataclass
class ModelConfig:
    """A decoder-only transformer. The defaults are GPT-2 small.

    `arch` names the parameter layout (GPT-2's names, or names that map one-to-one onto Hugging
    Face's Llama, see lm.model) and presets the options left unset (None) from ARCH_PRESETS.
    """

    arch: Literal["gpt2", "llama"] = "gpt2"
    vocab_size: int = 50257
    block_size: int = 1024  # context length
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    # Key/value heads: n_head is multi-head attention, fewer is grouped-query (each group of
    # n_head / n_kv_head query heads shares one), 1 is multi-query. None means n_head.
    n_kv_head: int | None = None
    d_ff: int | None = None  # MLP width; None: 4 * n_embd (gelu), or about 8/3 * n_embd (swiglu)
    position: Literal["learned", "rope"] | None = None  # learned absolute positions, or rotary
    rope_theta: float = 10000.0  # the rotary base: frequencies theta^(-2i/head_dim)
    norm: Literal["layernorm", "rmsnorm"] | None = None
    mlp: Literal["gelu", "swiglu"] | None = None  # GPT-2's tanh-GELU MLP, or SiLU-gated (Shazeer, 2020)
    tie_embeddings: bool | None = None  # the output layer shares the token embedding's weight
    dropout: float = 0.0  # on embeddings and residual branches (not on A: twicing needs one A)
    bias: bool | None = None  # biases in the linear layers (and LayerNorm)
    layer_norm_epsilon: float = 1e-5  # of LayerNorm or RMSNorm
    init_std: float = 0.02
    # Which layers use twicing attention, the rest use softmax: "none", "all", "last:K" or a list
    # of layer indices. The paper's language model twices the last 2 of 16 layers.
    twicing_layers: str | list[int] = "none"
    # How twicing layers run (softmax layers are one SDPA pass under all but "reference"). "fused":
    # the implementation benchmarks/measured_fastest.json records fastest on this GPU for this head
    # size (today two SDPA passes everywhere), two SDPA passes off a GPU. "triton": the Triton kernel
    # where it takes the inputs (a CUDA GPU, bf16/fp16, head size 64 or 128), else two SDPA passes;
    # training refuses it on a machine with no CUDA GPU and Triton. "sdpa": two SDPA passes
    # everywhere. "reference" materialises A (tests only).
    attention_impl: Literal["fused", "triton", "sdpa", "reference"] = "fused"

    def __post_init__(self):
        for key, value in ARCH_PRESETS[self.arch].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head"):
            if getattr(self, name) <= 0:
                raise UserError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise UserError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise UserError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})")
        if self.position == "rope" and self.head_dim % 2:
            raise UserError(f"model.position=rope rotates feature pairs: the head size ({self.head_dim}) must be even")
        if self.rope_theta <= 1:
            raise UserError(f"model.rope_theta must be greater than 1, got {self.rope_theta}")
        if self.d_ff is not None and self.d_ff <= 0:
            raise UserError(f"model.d_ff must be positive, got {self.d_ff}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout}")
        self.twicing_layer_indices()  # validates the selector

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "swiglu":  # two thirds of 4 * n_embd, as many weights as GPT-2's MLP, rounded to 64
            return -(-8 * self.n_embd // (3 * 64)) * 64  # ceil(8 n_embd / 3 / 64) * 64
        return 4 * self.n_embd

    def twicing_layer_indices(self) -> list[int]:
        """Resolve `twicing_layers` to a sorted list of layer indices."""
        sel, n = self.twicing_layers, self.n_layer
        if isinstance(sel, list):
            bad = [i for i in sel if not 0 <= i < n]
            if bad:
                raise UserError(f"model.twicing_layers: layer {bad[0]} is out of range for n_layer={n}")
            return sorted(set(sel))
        if sel == "none":
            return []
        if sel == "all":
            return list(range(n))
        if sel.startswith("last:") and sel[5:].isascii() and sel[5:].isdigit() and int(sel[5:]) <= n:
            return list(range(n - int(sel[5:]), n))
        raise UserError(
            f"model.twicing_layers must be 'none', 'all', 'last:K' (K <= {n}) or a list of layers, got {sel!r}"
        )

    def layer_kinds(self) -> list[str]:
        """The attention of every layer as the model's math: "twicing" or "softmax"."""
        twicing = set(self.twicing_layer_indices())
        return ["twicing" if i in twicing else "softmax" for i in range(self.n_layer)]

    def layer_attention(self) -> list[str]:
        """The attention variant of every layer, by its name in `lm.attention.ATTENTION`."""
        return [ATTENTION_VARIANTS[kind, self.attention_impl] for kind in self.layer_kinds()]


# Which registered attention variant (lm.attention, which owns what each one computes and costs) runs
# a layer of each kind under each model.attention_impl. Names, so that configs load without torch.
ATTENTION_VARIANTS: dict[tuple[str, str], str] = {
    ("softmax", "fused"): "softmax",
    ("twicing", "fused"): "twicing",
    ("softmax", "triton"): "softmax",
    ("twicing", "triton"): "twicing_triton",
    ("softmax", "sdpa"): "softmax",
    ("twicing", "sdpa"): "twicing_sdpa",
    ("softmax", "reference"): "softmax_reference",
    ("twicing", "reference"): "twicing_reference",
}


@dataclass
class DataSource:
    """One corpus of a weighted mixture: a shard directory, and its share of every global batch."""

    name: str = ""  # in metric names (data/tokens/<name>, val/loss/<name>): letters, digits, _ . -
    path: str = ""
    weight: float = 1.0  # relative: the shares are the weights over their sum


@dataclass
class DataConfig:
    """Where the token shards are (a directory written by `lm prep` / `data_prep`): one `path`, or a
    weighted mixture of `sources` that share a tokenizer (lm.mixture draws their windows)."""

    path: str = ""
    sources: list[DataSource] = field(default_factory=list)
    train_split: str = "train"
    val_split: str = "val"
    verify_checksums: bool = True

    def __post_init__(self):
        if self.path and self.sources:
            raise UserError("data.path and data.sources are alternatives: give one of them")
        names = set()
        for i, s in enumerate(self.sources):
            if not s.name or not all(c.isascii() and (c.isalnum() or c in "_.-") for c in s.name):
                raise UserError(f"data.sources[{i}].name must be letters, digits, '_', '.' or '-', got {s.name!r}")
            if s.name in names:
                raise UserError(f"data.sources[{i}].name {s.name!r} is used twice: each source needs its own name")
            if not s.path:
                raise UserError(f"data.sources[{i}] ({s.name}) needs a path: a token shard directory")
            if not 0 < s.weight < float("inf"):
                raise UserError(f"data.sources[{i}].weight ({s.name}) must be a positive number, got {s.weight}")
            names.add(s.name)


@dataclass
class WandbConfig:
    """Weights & Biases logging of what TensorBoard gets, from rank 0 (lm.metrics); needs `pip install wandb`."""

    project: str = "twicing-lm"
    entity: str | None = None  # the team or user; None: wandb's default for the logged-in user
    name: str | None = None  # the run's display name; None: the run directory's name
    mode: Literal["online", "offline", "disabled"] = "online"  # offline: written under the run directory only


@dataclass
class TrainConfig:
    """Optimisation, parallelism, logging and checkpointing of one run."""

    out_dir: str = "runs/default"
    steps: int = 1000
    batch_size: int = 8  # sequences per optimizer step, summed over data-parallel ranks
    micro_batch_size: int = 8  # sequences per rank per forward pass
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    # The LR after warmup (lm.schedule): cosine to min_lr at the last step; wsd: constant at lr, then
    # over the last decay_steps steps down to min_lr (decay_shape linear, or 1-sqrt as in Hägele et
    # al., 2024); constant: lr to the end.
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_steps: int | None = None  # wsd only, and needed there: 1 .. steps - warmup_steps
    decay_shape: Literal["linear", "1-sqrt"] = "linear"  # wsd's decay
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    zero_stage: Literal[0, 1, 2, 3] = 0
    tensor_parallel: int = 1  # ranks per tensor-parallel group
    # Megatron sequence parallelism (TP > 1): between the TP regions the activations are split
    # along the sequence over the TP group (all-gather in, reduce-scatter out: lm.parallel.layers).
    sequence_parallel: bool = False
    # Ranks per context-parallel group: each sequence split into this many chunks (lm.parallel.context);
    # data-parallel size = world / (tensor_parallel x context_parallel). all_to_all (Ulysses) swaps the
    # sequence split for a head split around attention; ring passes key/value chunks round the group.
    context_parallel: int = 1
    context_parallel_impl: Literal["all_to_all", "ring"] = "ring"
    # bf16: fp32 weights and Adam state, bf16 compute under torch.autocast (DeepSpeed's
    # torch_autocast mode, the plain loop's recipe). bf16-weights: DeepSpeed's bf16 mode, bf16
    # weights with an fp32 master copy in the optimizer (less memory for weights, slower on GPU).
    precision: Literal["fp32", "bf16", "bf16-weights"] = "fp32"
    compile: bool = False  # torch.compile the model (in place, names unchanged) before DeepSpeed wraps it
    # Recompute blocks in backward instead of keeping their activations: "none", "full" (every
    # block) or "every:K" (blocks 0, K, 2K, ...; every:1 is full). See GPT.recompute_blocks.
    activation_checkpointing: str = "none"
    # ZeRO-Offload: Adam's state and update on the CPU ("optimizer", stages 1-3), and at stage 3
    # the weights' partitions as well ("optimizer+params"); see lm.ds_config.offload_config.
    offload: Literal["none", "optimizer", "optimizer+params"] = "none"
    memory_check: bool = True  # refuse to start a run that `lm plan` says does not fit a rank's memory
    seed: int = 1337
    eval_interval: int = 100  # steps between validations; 0 validates only at the end
    eval_windows: int = 16  # validation windows (of block_size tokens) per validation, of each source of a mixture
    log_interval: int = 10  # steps between console lines, and between the loop's waits for the device
    checkpoint_interval: int = 0  # 0 saves only at the end
    keep_last: int = 0  # complete checkpoints to keep (oldest deleted first); 0 keeps all
    nonfinite: Literal["stop", "skip"] = "stop"  # a step with a non-finite loss or gradient (see lm.numerics)
    skip_limit: int = 10  # with nonfinite: skip, this many skipped steps in a row stop the run
    tensorboard: bool = True
    wandb: WandbConfig | None = None  # also log to Weights & Biases (None: not)
    # The accelerator's dense peak TFLOP/s for train/mfu; None: lm.flops' table of GPUs (no MFU on the CPU).
    peak_tflops: float | None = None
    # Signals that end the run with a checkpoint and exit 0 (lm.stopping), as SIGTERM or TERM; [] for none.
    save_on_signal: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    deepspeed: dict = field(default_factory=dict)  # extra DeepSpeed config, merged over ours

    def __post_init__(self):
        for name in (
            "steps",
            "batch_size",
            "micro_batch_size",
            "log_interval",
            "tensor_parallel",
            "context_parallel",
            "skip_limit",
        ):
            if getattr(self, name) <= 0:
                raise UserError(f"train.{name} must be positive, got {getattr(self, name)}")
        for name in (
            "warmup_steps",
            "eval_interval",
            "eval_windows",
            "checkpoint_interval",
            "keep_last",
            "weight_decay",
            "grad_clip",
        ):
            if getattr(self, name) < 0:
                raise UserError(f"train.{name} must not be negative, got {getattr(self, name)}")
        if not 0 < self.lr or not 0 <= self.min_lr <= self.lr:
            raise UserError(
                f"train.lr must be positive and 0 <= train.min_lr <= train.lr, got lr={self.lr}, min_lr={self.min_lr}"
            )
        if self.batch_size % self.micro_batch_size:
            raise UserError(
                f"train.batch_size ({self.batch_size}) must be a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size})"
            )
        self.checkpointed_blocks(1)  # validates the value
        self.check_schedule()
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise UserError(f"train.peak_tflops must be positive, got {self.peak_tflops}")
        self.save_on_signal = [stop_signal_name(name) for name in self.save_on_signal]
        if self.offload != "none" and self.zero_stage == 0:
            raise UserError(f"train.offload={self.offload} needs ZeRO stage 1, 2 or 3 (train.zero_stage is 0)")
        if self.offload == "optimizer+params" and self.zero_stage != 3:
            raise UserError(
                f"train.offload=optimizer+params offloads ZeRO-3's weight partitions and needs train.zero_stage=3, "
                f"got {self.zero_stage}"
            )

    def check_schedule(self) -> None:
        if self.schedule != "wsd":
            if self.decay_steps is not None:
                raise UserError(f"train.decay_steps is wsd's; train.schedule is {self.schedule}")
            return
        room = self.steps - self.warmup_steps
        if self.decay_steps is None or not 0 < self.decay_steps <= room:
            raise UserError(
                f"train.schedule=wsd needs train.decay_steps from 1 to train.steps - train.warmup_steps "
                f"({self.steps} - {self.warmup_steps} = {room}), got {self.decay_steps}"
            )

    def checkpointed_blocks(self, n_layer: int) -> list[int]:
        """The blocks `activation_checkpointing` recomputes in backward, of a model of n_layer blocks."""
        value = self.activation_checkpointing
        if value == "none":
            return []
        if value == "full":
            return list(range(n_layer))
        k = value[6:] if value.startswith("every:") else ""
        if k.isascii() and k.isdigit() and int(k) > 0:
            return list(range(0, n_layer, int(k)))
        raise UserError(
            f"train.activation_checkpointing must be 'none', 'full' or 'every:K' (K a positive integer), got {value!r}"
        )

    def grad_accum_steps(self, data_parallel_size: int) -> int:
        """Micro steps per optimizer step, so that micro_batch * accum * dp == batch_size."""
        per_step = self.micro_batch_size * data_parallel_size
        if self.batch_size % per_step:
            raise UserError(
                f"train.batch_size ({self.batch_size}) is not divisible by micro_batch_size ({self.micro_batch_size}) "
                f"x data-parallel size ({data_parallel_size})"
            )
        return self.batch_size // per_step


def stop_signal_name(name: str) -> str:
    """The canonical name ("SIGTERM") of a signal a run may stop on, given as "SIGTERM", "TERM" or "term"."""
    canonical = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
    if canonical in ("SIGKILL", "SIGSTOP"):
        raise UserError(f"train.save_on_signal: {canonical} cannot be caught, so no run can save on it")
    if canonical not in signal.Signals.__members__:
        raise UserError(f"train.save_on_signal: {name!r} is not a signal name (such as SIGTERM or USR1)")
    return canonical


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        check_parallel_layout(self.model, self.train)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Any, source: str = "config") -> "RunConfig":
        if not isinstance(raw, dict):
            raise UserError(f"{source}: expected a mapping with sections model, data, train")
        sections = {}
        for key, value in raw.items():
            if key not in _SECTIONS:
                raise UserError(f"{source}: unknown section {key!r}{did_you_mean(str(key), _SECTIONS)}")
            sections[key] = build_section(_SECTIONS[key], value, source, key)
        try:
            return cls(**sections)
        except UserError as exc:
            raise UserError(f"{source}: {exc}") from None


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config and apply `section.key=value` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where else ""
        raise UserError(f"{path}: not valid YAML{line}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping with sections model, data, train")
    return RunConfig.from_dict(apply_overrides(raw, overrides), source=str(path))
