"""Command-line flags (Megatron-LM names) -> config dataclasses, validated before any work.

Model-architecture flags default to ``None`` so that ``--load`` of a converted checkpoint can
supply the architecture: a flag given explicitly must agree with the checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Optional

from megatron_pref.errors import UserError
from megatron_pref.model import (NORMALIZATIONS, POSITION_EMBEDDINGS, TRANSFORMER_IMPLS, ModelConfig,
                                 ParallelConfig, PrecisionConfig)

REF_LOGPROBS_MODES = ("precompute", "online")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")


class ConfigError(UserError):
    """A bad flag or input file: reported as one line, never a traceback."""


# The demo's model: small enough to learn the bundled task in a few CPU minutes.
DEMO_MODEL = dict(num_layers=2, hidden_size=128, num_attention_heads=4, ffn_hidden_size=256,
                  max_position_embeddings=256, normalization="RMSNorm", swiglu=True,
                  position_embedding_type="rope", make_vocab_size_divisible_by=16)
# The demo's recipe (flags not given on the command line). The policy starts from random
# weights, so an RPO-style NLL term (--sft-weight) teaches it to produce answers at all; the
# preference term then separates right from plausible-wrong ones. Measured on 2 CPU cores:
# held-out preference accuracy 0 -> 0.95, greedy exact match 0 -> 0.83 (0.83-0.92 from seed to seed),
# in about 1.5 minutes.
DEMO_RECIPE = dict(train_iters=1000, lr=2e-3, lr_decay_style="cosine", lr_warmup_iters=50, sft_weight=1.0,
                   eval_interval=250)


@dataclass
class DataConfig:
    data_path: Optional[list] = None  # preprocessed prefixes, or .jsonl/.parquet files
    valid_data_path: Optional[list] = None
    tokenizer_type: Optional[str] = None
    tokenizer_model: Optional[str] = None
    seq_length: int = 256
    max_prompt_length: Optional[int] = None
    data_field_map: Optional[str] = None
    strict: bool = False
    shuffle: bool = True  # --no-shuffle: every epoch in file order

    @property
    def uses_demo(self) -> bool:
        return not self.data_path


@dataclass
class OptimConfig:
    micro_batch_size: int = 1  # packs per micro-batch
    global_batch_size: int = 32  # pairs per optimizer step
    # TRL's DPOConfig default (Megatron-LM has none: pretraining rates are 100x larger and
    # overshoot preference optimisation of a pretrained model).
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_decay_style: str = "linear"  # Megatron-LM's
    lr_warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None
    train_iters: Optional[int] = None
    train_epochs: Optional[float] = None
    clip_grad: float = 1.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    exit_interval: Optional[int] = None
    no_load_optim: bool = False
    optim_fully_reshardable: bool = False  # --dist-ckpt-optim-fully-reshardable
    no_load_rng: bool = False
    finetune: bool = False  # --load's weights only: iteration 0, fresh optimizer and schedule
    override_opt_param_scheduler: bool = False  # on resume: this run's schedule flags win
    use_checkpoint_opt_param_scheduler: bool = False  # on resume: the checkpoint's schedule wins
    exit_signal_handler: bool = False  # SIGTERM: finish the step, save, exit 0
    exit_duration_in_mins: Optional[float] = None


@dataclass
class EvalLogConfig:
    log_interval: int = 100  # Megatron-LM's
    eval_interval: Optional[int] = None
    eval_iters: Optional[int] = None  # None: the whole validation split
    tensorboard_dir: Optional[str] = None
    wandb_project: Optional[str] = None
    wandb_exp_name: Optional[str] = None
    wandb_save_dir: Optional[str] = None
    metrics_file: Optional[str] = None  # default: <save or tensorboard dir>/metrics.jsonl
    no_progress_bar: bool = False


@dataclass
class ReferenceConfig:
    ref_logprobs: str = "precompute"
    ref_load: Optional[str] = None
    ref_cache_dir: Optional[str] = None


@dataclass
class RunConfig:
    model: ModelConfig
    parallel: ParallelConfig
    precision: PrecisionConfig
    data: DataConfig
    optim: OptimConfig
    checkpoint: CheckpointConfig
    log: EvalLogConfig
    reference: ReferenceConfig
    loss: str
    loss_config: object  # megatron_pref.losses.LossConfig
    seed: int = 1234
    skip_nonfinite_batches: bool = False
    logprob_chunk_tokens: int = 1024
    distributed_timeout_minutes: int = 10  # torch.distributed's collective timeout
    # Model flags given explicitly on the command line (checked against a loaded checkpoint).
    explicit_model_fields: dict = field(default_factory=dict)
    # Compare checkpoint and preprocessed-data files with their recorded checksums on load
    # (--no-verify-checksums: don't).
    verify_checksums: bool = True


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _model_flag_names() -> dict:
    return {
        "num_layers": int, "hidden_size": int, "num_attention_heads": int, "num_query_groups": int,
        "ffn_hidden_size": int, "kv_channels": int, "max_position_embeddings": int,
        "norm_epsilon": float, "rotary_base": int, "rotary_percent": float,
        "rope_scaling_factor": float, "make_vocab_size_divisible_by": int,
        "hidden_dropout": float, "attention_dropout": float, "init_method_std": float,
    }


def build_parser() -> argparse.ArgumentParser:
    from megatron_pref.losses import F_DIVERGENCES, LOSSES, NLL_NORMALIZATIONS, LossConfig

    from megatron_pref.cli_errors import OneLineArgumentParser

    p = OneLineArgumentParser(
        error_type=ConfigError,
        prog="pretrain_pref.py",
        description="Preference optimisation (DPO family, SPO, SLIME) on megatron-core. "
                    "With no data flags, trains a tiny GPT on the bundled demo task.")
    g = p.add_argument_group("preference")
    g.add_argument("--loss", default="spo",
                   help=f"one of: {', '.join(sorted(LOSSES))}; or a comma-separated weighted sum "
                        f"(--loss dpo,sft --loss-weights 1.0,0.2), as TRL's loss_type list")
    for f in dataclasses.fields(LossConfig):
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.name == "f_divergence_type":
            g.add_argument(_flag(f.name), choices=F_DIVERGENCES, default=default)
        elif f.name == "nll_normalization":
            g.add_argument(_flag(f.name), choices=NLL_NORMALIZATIONS, default=default)
        elif isinstance(default, bool):
            g.add_argument(_flag(f.name), action="store_true", default=default)
        else:
            g.add_argument(_flag(f.name), type=type(default) if default is not None else float, default=default)
    g.add_argument("--ref-logprobs", choices=REF_LOGPROBS_MODES, default="precompute")
    g.add_argument("--ref-load", default=None, help="reference checkpoint (default: the initial policy)")
    g.add_argument("--ref-cache-dir", default=None, help="where precomputed reference log-probs are cached")

    g = p.add_argument_group("model (architecture flags default to the --load checkpoint's)")
    for name, typ in _model_flag_names().items():
        g.add_argument(_flag(name), type=typ, default=None)
    g.add_argument("--group-query-attention", action="store_true", default=None)
    g.add_argument("--normalization", choices=NORMALIZATIONS, default=None)
    g.add_argument("--swiglu", action="store_true", default=None)
    g.add_argument("--openai-gelu", action="store_true", default=None)
    g.add_argument("--position-embedding-type", choices=POSITION_EMBEDDINGS, default=None)
    g.add_argument("--use-rope-scaling", action="store_true", default=None)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=None)
    g.add_argument("--add-qkv-bias", action="store_true", default=None)
    g.add_argument("--add-bias-linear", action="store_true", default=None)

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="overlap the data-parallel gradient reduction with the backward pass")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="overlap the distributed optimizer's parameter all-gather with the next forward pass "
                        "(needs --use-distributed-optimizer and --overlap-grad-reduce)")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10,
                   help="how long a collective waits for the other ranks before the run stops (NCCL and gloo)")

    g = p.add_argument_group("precision and kernels")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp8-format", choices=("hybrid", "e4m3"), default=None)
    g.add_argument("--fp8-recipe", choices=("delayed", "tensorwise", "blockwise", "mxfp8"), default="delayed")
    g.add_argument("--transformer-impl", choices=TRANSFORMER_IMPLS, default=None,
                   help="default: transformer_engine with a GPU and TE, else local")
    g.add_argument("--logprob-chunk-tokens", type=int, default=1024)

    g = p.add_argument_group("batching and optimisation")
    g.add_argument("--micro-batch-size", type=int, default=1, help="packs per micro-batch (1)")
    g.add_argument("--global-batch-size", type=int, default=None, help="pairs per optimizer step")
    g.add_argument("--lr", type=float, default=OptimConfig.lr,
                   help=f"peak learning rate ({OptimConfig.lr:g}, TRL's DPO default; Megatron-LM has none)")
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=LR_DECAY_STYLES, default=OptimConfig.lr_decay_style)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--train-epochs", type=float, default=None)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--skip-nonfinite-batches", action="store_true",
                   help="skip a batch whose loss is NaN/inf instead of stopping")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="preprocessed prefixes (tools/preprocess_pref_data.py) or .jsonl/.parquet files")
    g.add_argument("--valid-data-path", nargs="+", default=None)
    g.add_argument("--tokenizer-type", choices=("SentencePieceTokenizer", "HuggingFaceTokenizer"), default=None)
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--seq-length", type=int, default=None, help="pack length in tokens")
    g.add_argument("--max-prompt-length", type=int, default=None)
    g.add_argument("--data-field-map", default=None, help="rename columns: old=new,old2=new2")
    g.add_argument("--strict", action="store_true", help="bad rows are errors instead of skipped")
    g.add_argument("--no-shuffle", action="store_true",
                   help="train on the pairs in file order, every epoch (default: a new permutation each epoch, "
                        "from --seed)")
    g.add_argument("--seed", type=int, default=1234)

    g = p.add_argument_group("checkpoints, evaluation and logging")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--exit-interval", type=int, default=None, help="stop after a step divisible by this")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                   help="save the distributed optimizer's state so it loads at any TP/PP/DP layout "
                        "(gathered per parameter); default: loads at another DP size only")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--no-verify-checksums", action="store_true",
                   help="load checkpoints and preprocessed data without comparing their files with the checksums "
                        "recorded when they were written (default: compare; a mismatch is an error)")
    g.add_argument("--finetune", action="store_true",
                   help="load --load's weights only: start at iteration 0 with a fresh optimizer, schedule and "
                        "data order; the reference is that checkpoint")
    g.add_argument("--override-opt_param-scheduler", action="store_true",
                   help="on resume, take the lr schedule (--lr, --min-lr, --lr-warmup-iters, --lr-decay-iters or "
                        "--train-iters, --lr-decay-style, --weight-decay) from the flags, not the checkpoint")
    g.add_argument("--use-checkpoint-opt_param-scheduler", action="store_true",
                   help="on resume, keep the checkpoint's lr schedule whatever the flags say")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM, finish the current step, save a checkpoint and exit 0")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save and exit after the step during which this many minutes of training have passed")
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=None)
    g.add_argument("--log-interval", type=int, default=EvalLogConfig.log_interval)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--wandb-project", default=None)
    g.add_argument("--wandb-exp-name", default=None)
    g.add_argument("--wandb-save-dir", default=None)
    g.add_argument("--metrics-file", default=None)
    g.add_argument("--no-progress-bar", action="store_true")
    return p


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def explicit_flags(argv) -> set:
    """Destinations of the flags given on the command line (not defaulted)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def parse_run_config(argv=None) -> RunConfig:
    """Command line -> validated RunConfig (the demo's recipe fills flags not given)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if not args.data_path:
        given = explicit_flags(argv)
        for name, value in DEMO_RECIPE.items():
            if name not in given:
                setattr(args, name, value)
    return config_from_args(args)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Flags -> RunConfig, with every check that needs no files, no model and no GPU."""
    from megatron_pref.losses import LossConfig, check_options

    loss_kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(LossConfig)}
    loss_config = LossConfig(**loss_kwargs)
    try:
        check_options(args.loss, loss_config)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    demo = not args.data_path
    explicit = {name: getattr(args, name) for name in list(_model_flag_names()) + [
        "normalization", "swiglu", "openai_gelu", "position_embedding_type", "use_rope_scaling",
        "untie_embeddings_and_output_weights", "add_qkv_bias", "add_bias_linear"]
        if getattr(args, name) is not None}
    if args.group_query_attention and args.num_query_groups is None:
        raise ConfigError("--group-query-attention needs --num-query-groups")

    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "micro_batch_size",
                 "log_interval", "logprob_chunk_tokens", "distributed_timeout_minutes"):
        _check(getattr(args, name) >= 1, f"{_flag(name)} must be >= 1, got {getattr(args, name)}")
    _check(args.micro_batch_size == 1, "--micro-batch-size: one pack per micro-batch is supported "
                                       "(a pack already holds many pairs; raise --seq-length instead)")
    for name in ("train_iters", "save_interval", "exit_interval", "eval_interval", "eval_iters", "global_batch_size",
                 "seq_length", "max_prompt_length", "lr_decay_iters"):
        value = getattr(args, name)
        _check(value is None or value >= 1, f"{_flag(name)} must be >= 1, got {value}")
    for name in ("lr", "min_lr", "clip_grad", "weight_decay", "adam_eps"):
        value = getattr(args, name)
        _check(value is None or (math.isfinite(value) and value >= 0), f"{_flag(name)} must be a finite number >= 0, got {value}")
    _check(args.train_epochs is None or args.train_epochs > 0, "--train-epochs must be > 0")
    _check(args.exit_duration_in_mins is None or (math.isfinite(args.exit_duration_in_mins) and args.exit_duration_in_mins > 0),
           f"--exit-duration-in-mins must be > 0, got {args.exit_duration_in_mins}")
    _check(not (args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler),
           "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude each other")
    _check(not args.finetune or args.load, "--finetune needs --load (the checkpoint whose weights it starts from)")
    for name in ("override_opt_param_scheduler", "use_checkpoint_opt_param_scheduler"):
        _check(not (args.finetune and getattr(args, name)),
               f"{_flag(name).replace('-opt-param-', '-opt_param-')} has no effect with --finetune (it starts a fresh "
               "schedule from the flags)")
    _check(args.train_iters is None or args.train_epochs is None, "give --train-iters or --train-epochs, not both")
    _check(args.lr_warmup_iters >= 0, "--lr-warmup-iters must be >= 0")
    # numpy's and torch's generators take seeds in [0, 2**32).
    _check(0 <= args.seed < 2**32, f"--seed must be in [0, 2**32 - 1], got {args.seed}")
    _check(args.min_lr <= args.lr, f"--min-lr {args.min_lr} is above --lr {args.lr}")
    for name in ("adam_beta1", "adam_beta2"):
        _check(0.0 <= getattr(args, name) < 1.0, f"{_flag(name)} must be in [0, 1), got {getattr(args, name)}")
    model_ranges = {"norm_epsilon": ("> 0", lambda v: v > 0), "init_method_std": ("> 0", lambda v: v > 0),
                    "rope_scaling_factor": ("> 0", lambda v: v > 0), "rotary_percent": ("in (0, 1]", lambda v: 0 < v <= 1),
                    "hidden_dropout": ("in [0, 1)", lambda v: 0 <= v < 1), "attention_dropout": ("in [0, 1)", lambda v: 0 <= v < 1)}
    for name, (allowed, ok) in model_ranges.items():
        value = explicit.get(name)
        _check(value is None or (math.isfinite(value) and ok(value)), f"{_flag(name)} must be {allowed}, got {value}")
    if args.transformer_impl == "transformer_engine":
        from megatron_pref.model import te_available

        _check_optional_packages([("--transformer-impl transformer_engine", "transformer_engine")])
        _check(te_available(), "--transformer-impl transformer_engine: Transformer Engine is not importable here "
                               "(pip install -e '.[gpu]', or use the Docker image)")
    if args.overlap_param_gather:  # as Megatron-LM: the gather is the distributed optimizer's
        _check(args.use_distributed_optimizer, "--overlap-param-gather needs --use-distributed-optimizer")
        _check(args.overlap_grad_reduce, "--overlap-param-gather needs --overlap-grad-reduce")
    if args.fp8_format:
        _check(args.transformer_impl != "local", "--fp8-format needs --transformer-impl transformer_engine")
        _check(args.bf16, "--fp8-format needs --bf16 (FP8 GEMMs with bf16 parameters and activations)")
    if demo:  # the bundled demo brings its own data and tokenizer: these would be ignored
        for name in ("valid_data_path", "tokenizer_type", "tokenizer_model", "data_field_map"):
            _check(getattr(args, name) is None, f"{_flag(name)} needs --data-path (without it the bundled demo "
                                                "task and its tokenizer are used)")
    if args.tokenizer_model is None and args.load and os.path.isdir(os.path.join(args.load, "tokenizer")):
        # A converted checkpoint carries its Hugging Face tokenizer.
        args.tokenizer_model = os.path.join(args.load, "tokenizer")
        args.tokenizer_type = args.tokenizer_type or "HuggingFaceTokenizer"
    _check_optional_packages(_optional_packages_needed(args))
    if args.tokenizer_model is not None:
        _check(args.tokenizer_type is not None, "--tokenizer-model needs --tokenizer-type")
        _check(os.path.exists(args.tokenizer_model), f"--tokenizer-model {args.tokenizer_model}: no such file or directory")
    if not demo:
        for path in args.data_path + (args.valid_data_path or []):
            _check(_data_path_exists(path), f"--data-path {path}: no such file (nor {path}.bin/.idx)")
        _check(args.tokenizer_model is not None, "--data-path needs --tokenizer-type and --tokenizer-model")
    if args.load:
        _check(os.path.isdir(args.load), f"--load {args.load}: no such directory")
    if args.ref_load:
        _check(os.path.isdir(args.ref_load), f"--ref-load {args.ref_load}: no such directory")
    if args.ref_load and not _loss_requires_reference(args.loss):
        raise ConfigError(f"--ref-load is set but --loss {args.loss} is reference-free")
    _check_output_locations(args)
    _warn_ineffective_flags(args)

    vpp = None
    if args.num_layers_per_virtual_pipeline_stage is not None:
        per_stage, pp = args.num_layers_per_virtual_pipeline_stage, args.pipeline_model_parallel_size
        _check(per_stage >= 1, f"--num-layers-per-virtual-pipeline-stage must be >= 1, got {per_stage}")
        _check(pp > 1, "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1 "
                       "(virtual stages interleave pipeline stages)")
        layers = explicit.get("num_layers") or (DEMO_MODEL["num_layers"] if demo and not args.load else None)
        if layers is None:
            raise ConfigError("--num-layers-per-virtual-pipeline-stage needs --num-layers")
        _check(layers % (pp * per_stage) == 0,
               f"--num-layers {layers} is not divisible by --pipeline-model-parallel-size {pp} x "
               f"--num-layers-per-virtual-pipeline-stage {per_stage}")
        vpp = layers // (pp * per_stage)
        vpp = vpp if vpp > 1 else None  # one virtual stage per rank is the plain 1F1B schedule

    return RunConfig(
        model=ModelConfig(vocab_size=1),  # resolved later from the tokenizer / checkpoint
        parallel=ParallelConfig(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=vpp,
            sequence_parallel=args.sequence_parallel),
        precision=PrecisionConfig(bf16=args.bf16, fp8_format=args.fp8_format, fp8_recipe=args.fp8_recipe,
                                  transformer_impl=args.transformer_impl or "auto"),
        data=DataConfig(data_path=args.data_path, valid_data_path=args.valid_data_path,
                        tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model,
                        seq_length=args.seq_length or 256, max_prompt_length=args.max_prompt_length,
                        data_field_map=args.data_field_map, strict=args.strict, shuffle=not args.no_shuffle),
        optim=OptimConfig(
            micro_batch_size=args.micro_batch_size,
            global_batch_size=args.global_batch_size or 32,
            lr=args.lr,
            min_lr=args.min_lr, lr_decay_style=args.lr_decay_style, lr_warmup_iters=args.lr_warmup_iters,
            lr_decay_iters=args.lr_decay_iters,
            train_iters=args.train_iters,
            train_epochs=args.train_epochs, clip_grad=args.clip_grad, weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
            use_distributed_optimizer=args.use_distributed_optimizer,
            overlap_grad_reduce=args.overlap_grad_reduce, overlap_param_gather=args.overlap_param_gather),
        checkpoint=CheckpointConfig(save=args.save, load=args.load, save_interval=args.save_interval,
                                    exit_interval=args.exit_interval, no_load_optim=args.no_load_optim, no_load_rng=args.no_load_rng,
                                    optim_fully_reshardable=args.dist_ckpt_optim_fully_reshardable,
                                    finetune=args.finetune, override_opt_param_scheduler=args.override_opt_param_scheduler,
                                    use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
                                    exit_signal_handler=args.exit_signal_handler,
                                    exit_duration_in_mins=args.exit_duration_in_mins),
        log=EvalLogConfig(log_interval=args.log_interval,
                          eval_interval=args.eval_interval,
                          eval_iters=args.eval_iters, tensorboard_dir=args.tensorboard_dir,
                          wandb_project=args.wandb_project, wandb_exp_name=args.wandb_exp_name,
                          wandb_save_dir=args.wandb_save_dir, metrics_file=args.metrics_file,
                          no_progress_bar=args.no_progress_bar),
        reference=ReferenceConfig(ref_logprobs=args.ref_logprobs, ref_load=args.ref_load,
                                  ref_cache_dir=args.ref_cache_dir),
        loss=args.loss,
        loss_config=loss_config,
        seed=args.seed,
        skip_nonfinite_batches=args.skip_nonfinite_batches,
        logprob_chunk_tokens=args.logprob_chunk_tokens,
        distributed_timeout_minutes=args.distributed_timeout_minutes,
        explicit_model_fields=explicit,
        verify_checksums=not args.no_verify_checksums,
    )


def _loss_requires_reference(name: str) -> bool:
    from megatron_pref.losses import requires_reference

    return requires_reference(name)


DEFAULT_RUN_DIR = os.path.join("runs", "last")


def reference_cache_dir(ref_cache_dir: Optional[str], save: Optional[str]) -> str:
    """Where precomputed reference log-probs are cached: --ref-cache-dir, else under --save,
    else under ./runs/last (the default location, probed like the explicit ones)."""
    return ref_cache_dir or os.path.join(save or DEFAULT_RUN_DIR, "reference_cache")


def _check_output_locations(args) -> None:
    """Directories and files the run writes must be writable now, not after hours of training."""
    from megatron_pref.cli_errors import check_output_dir, check_output_file

    directories = {"save": args.save, "tensorboard_dir": args.tensorboard_dir, "ref_cache_dir": args.ref_cache_dir,
                   "wandb_save_dir": args.wandb_save_dir}
    problems = [check_output_dir(path, _flag(name)) for name, path in directories.items() if path is not None]
    if (args.ref_cache_dir is None and args.save is None and args.ref_logprobs == "precompute"
            and _loss_requires_reference(args.loss)):
        default = reference_cache_dir(None, None)
        problem = check_output_dir(default, "the default reference cache (--ref-cache-dir)")
        problems.append(problem and f"{problem} (give --ref-cache-dir or --save a writable directory, "
                                    "or use --ref-logprobs online)")
    if args.metrics_file is not None:
        problems.append(check_output_file(args.metrics_file, "--metrics-file"))
    problem = next((p for p in problems if p), None)
    _check(problem is None, problem or "")
    logging_rank = os.environ.get("RANK", "0") == "0"  # the only rank that talks to wandb
    if args.wandb_project and logging_rank:
        import wandb  # installed: _check_optional_packages

        # The mode wandb resolves (WANDB_MODE, `wandb offline`'s settings file, ...): offline
        # and disabled runs need no credentials.
        if wandb.setup().settings.mode in ("offline", "disabled", "dryrun"):
            return
        _check(bool(wandb.login(prompt=False, verify=False)),
               "--wandb-project: no wandb API key (run `wandb login`, set WANDB_API_KEY, or WANDB_MODE=offline "
               "to log locally and `wandb sync` later)")


def _warn_ineffective_flags(args) -> None:
    """Flags that would do nothing with the others given: one warning line each (rank 0).

    Megatron-LM ignores them silently; they are warned about, not refused, so that launch
    scripts which always pass them (and add --save or a validation split per run) keep working.
    """
    import sys

    unused = []
    if args.save is None and args.save_interval is not None:
        unused.append(f"--save-interval {args.save_interval} has no effect without --save: no checkpoint is written")
    if args.data_path and not args.valid_data_path:  # the bundled demo has its validation split
        for flag, value in (("--eval-interval", args.eval_interval), ("--eval-iters", args.eval_iters)):
            if value is not None:
                unused.append(f"{flag} {value} has no effect without --valid-data-path: no evaluation runs")
    if os.environ.get("RANK", "0") == "0":
        for line in unused:
            print(f"warning: {line}", file=sys.stderr, flush=True)


def _optional_packages_needed(args) -> list:
    """(the flag as given, the package) for every optional package the flags need (the packages
    and their pip installs: cli_errors.OPTIONAL_PACKAGES)."""
    from megatron_pref.data.readers import PARQUET_SUFFIXES
    from megatron_pref.data.errors import DataError
    from megatron_pref.data.tokenizer import HUGGINGFACE, canonical_tokenizer_type

    needed = []
    if args.tensorboard_dir:
        needed.append(("--tensorboard-dir", "tensorboard"))
    if args.wandb_project:
        needed.append(("--wandb-project", "wandb"))
    for flag, paths in (("--data-path", args.data_path), ("--valid-data-path", args.valid_data_path)):
        parquet = [p for p in paths or [] if p.lower().endswith(PARQUET_SUFFIXES)]
        if parquet:
            needed.append((f"{flag} {parquet[0]}", "pyarrow"))
    if args.tokenizer_type:
        try:
            hugging_face = canonical_tokenizer_type(args.tokenizer_type) == HUGGINGFACE
        except DataError:  # an unknown type: reported with the data
            hugging_face = False
        if hugging_face:
            needed.append((f"--tokenizer-type {args.tokenizer_type}", "transformers"))
    return needed


def _check_optional_packages(needed) -> None:
    """One line for the first (flag, package) whose package is not installed."""
    from megatron_pref.cli_errors import missing_dependency

    for flag, package in needed:
        problem = missing_dependency(flag, package)
        _check(problem is None, problem or "")


def _data_path_exists(path: str) -> bool:
    return os.path.isfile(path) or (os.path.isfile(path + ".bin") and os.path.isfile(path + ".idx"))


def resolve_model_config(run: RunConfig, vocab_size: Optional[int],
                         checkpoint_model: Optional[ModelConfig]) -> ModelConfig:
    """The architecture: the checkpoint's if loading (explicit flags must agree), else flags/demo.

    ``vocab_size=None`` resolves everything but the vocabulary (to validate the parallel
    layout before the tokenizer and data are read).
    """
    explicit = dict(run.explicit_model_fields)
    if checkpoint_model is not None:
        for name, value in explicit.items():
            stored = getattr(checkpoint_model, name)
            if stored != value:
                raise ConfigError(f"{_flag(name)} {value} differs from the --load checkpoint's {name}={stored}")
        # Hugging Face models often have more embedding rows than tokens (Qwen2: 151936 rows,
        # 151665 tokens); ids the tokenizer cannot produce are harmless. Fewer rows are not.
        if vocab_size is not None and vocab_size > checkpoint_model.vocab_size:
            raise ConfigError(f"the tokenizer has {vocab_size} tokens but the --load checkpoint's "
                              f"vocab_size is only {checkpoint_model.vocab_size}")
        return checkpoint_model
    base = dict(DEMO_MODEL) if run.data.uses_demo else {}
    base.update(explicit)
    base["vocab_size"] = vocab_size if vocab_size is not None else 1
    base.setdefault("max_position_embeddings", max(run.data.seq_length, 256))
    # Megatron-LM ties embeddings unless told otherwise.
    base.setdefault("untie_embeddings_and_output_weights", False)
    for flag_default in ("swiglu", "add_qkv_bias", "add_bias_linear", "use_rope_scaling", "openai_gelu"):
        base.setdefault(flag_default, False)
    if not run.data.uses_demo:
        missing = [n for n in ("num_layers", "hidden_size", "num_attention_heads") if n not in base]
        if missing:
            raise ConfigError("without --load, give the architecture: missing " +
                              ", ".join(_flag(n) for n in missing))
        base.setdefault("normalization", "LayerNorm")
        base.setdefault("position_embedding_type", "learned_absolute")
    model = ModelConfig(**base)
    try:
        model.validate()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return model
