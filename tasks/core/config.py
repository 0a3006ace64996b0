"""Typed configuration for the whole pipeline.

One YAML file holds every stage's section. Unknown keys and wrong types are errors that name the
key (pydantic, ``extra="forbid"``); ``section.key=value`` overrides come from the command line; the
resolved config is written beside every output so a result can always be traced to its settings.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from scrapers.schema import (  # noqa: F401
    CATEGORIES,
    REPO_ROOT,
    ConfigError,
    DemoSiteConfig,
    Permission,
    ScrapeConfig,
    Section,
    SourceConfig,
    SourcesFile,
    _format_errors,
    load_sources,
    resolve_path,
)


# ------------------------------------------------------------------------------------ stages
class ExtractConfig(Section):
    min_text_chars: int = Field(default=1, ge=0, description="Pages with less extracted text are rejected.")
    workers: int | None = Field(
        default=None, ge=1,
        description="Extraction processes; None = all cores (at most 8) for 2000+ pages per category, else 1. "
        "Not part of the stage fingerprint: the output does not depend on it.",
    )


class CleanConfig(Section):
    unicode_form: Literal["NFC", "NFKC"] = "NFKC"
    min_chars: int = Field(default=200, ge=0)
    max_chars: int = Field(default=200_000, gt=0, description="Longer documents are split, not dropped.")
    min_alpha_ratio: float = Field(default=0.5, ge=0, le=1, description="Letters over non-space chars (prose).")
    max_symbol_ratio: float = Field(default=0.3, ge=0, le=1)
    scrub_pii: bool = Field(default=True, description="Replace e-mail addresses and phone numbers.")
    near_dup_threshold: float = Field(default=0.8, gt=0, le=1, description="MinHash Jaccard estimate.")
    num_perm: int = Field(default=128, ge=16)
    shingle_words: int = Field(default=5, ge=1)
    boilerplate_min_fraction: float = Field(
        default=0.30, gt=0, le=1, description="A line in at least this share of a source's documents is boilerplate."
    )
    boilerplate_min_docs: int = Field(default=3, ge=2, description="... and in at least this many of them.")
    boilerplate_sample_docs: int = Field(default=5000, ge=1, description="Documents per source sampled for that count.")
    workers: int = Field(default=1, ge=1, description="Local worker processes for cleaning and MinHash.")
    incremental: bool = Field(
        default=True,
        description="Keep a document index under <data_root>/clean_index and only clean documents that are new "
        "or changed since the last run; earlier documents' signatures are the dedup reference.",
    )


class SplitConfig(Section):
    eval_fraction: float = Field(default=0.1, gt=0, lt=1)
    salt: str = Field(default="split-v1", description="Changing it reshuffles the split; never do mid-project.")


class MixConfig(Section):
    ratios: dict[str, float] = Field(
        default_factory=lambda: {
            "recipes": 0.43,
            "product_compositions": 0.25,
            "articles": 0.18,
            "code": 0.10,
            "product_descriptions": 0.03,
            "chemical_additives": 0.01,
        }
    )
    total_tokens: int | None = Field(
        default=None, ge=1, description="Training-token budget; None = largest budget max_repeat allows."
    )
    max_repeat: float = Field(default=4.0, ge=1, description="Most a short category may be up-sampled.")

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(CATEGORIES))
        if unknown:
            raise ValueError(f"unknown categories {unknown}; expected a subset of {list(CATEGORIES)}")
        if any(r < 0 for r in v.values()):
            raise ValueError("ratios must be >= 0")
        total = sum(v.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"ratios must sum to 1, they sum to {total:.6f}")
        return v


class TokenizeConfig(Section):
    seq_len: int = Field(default=2048, ge=8)
    rows_per_shard: int = Field(default=4096, ge=1, description="Packed rows per Arrow shard.")
    batch_docs: int = Field(default=512, ge=1, description="Documents tokenized per batch.")
    workers: int = Field(default=1, ge=1, description="Local worker processes for tokenization.")
    shuffle: bool = Field(default=True, description="Seeded global shuffle of the packed training rows.")
    shuffle_bucket_rows: int = Field(
        default=32768, ge=1, description="Rows held in memory at once by the two-pass shuffle (bounds its memory)."
    )
    token_cache: bool = Field(
        default=True, description="Keep every document's ids in <data_root>/tokcache/ so mix and tokenize (and re-runs) "
        "encode a text once per tokenizer; False encodes everything each time (same output).")
    cache_segment_tokens: int = Field(
        default=1 << 24, ge=1, le=1 << 30,
        description="Token ids buffered per new token-cache segment file (bounds the cache writer's memory: 2 or 4 bytes each).")


class DaskConfig(Section):
    address: str | None = Field(
        default=None,
        description='None = local worker processes; "local" = a distributed LocalCluster; "tcp://host:8786" = a cluster.',
    )
    n_workers: int = Field(default=2, ge=1, description="LocalCluster workers (address: local).")
    threads_per_worker: int = Field(default=1, ge=1, description="LocalCluster threads per worker.")
    processes: bool = Field(default=True, description="LocalCluster workers as processes (False: threads, for tests).")


class QuantizationConfig(Section):
    load_in_4bit: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        default="uint8", description="Set to the compute dtype for FSDP-QLoRA."
    )


class ModelConfig(Section):
    name: str = Field(description="Hub id or local path of the base model (recorded in the adapter).")
    gguf_package: str | None = Field(
        default=None, description="Python package that ships the weights as GGUF (offline demo)."
    )
    gguf_file: str | None = None
    revision: str | None = Field(
        default=None,
        description="The base's exact version, part of the run's identity and recorded with every adapter. A hub "
        "model: the repository's commit hash (passed to from_pretrained). A GGUF package (gguf_package): "
        "'sha256:<hex>' of the GGUF file, checked when the file is read. A local directory: free text naming it.")
    allow_unpinned: bool = Field(
        default=False, description="Allow a hub model without a revision (whatever the repository holds on the day); "
        "otherwise it is refused before anything is loaded.")
    trust_remote_code: bool = False
    tokenizer: str | None = Field(
        default=None,
        description="None = the model's own (AutoTokenizer); 'mistral-common:tekken_240911.json' = a tokenizer file "
        "shipped in mistral-common, or a path to a tekken.json, loaded with MistralCommonBackend.",
    )
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)


class LoraConfig(Section):
    r: int = Field(default=32, ge=1)
    alpha: int = Field(default=64, ge=1)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    bias: Literal["none", "all", "lora_only"] = "all"


class EarlyStoppingConfig(Section):
    """Stop when the held-out loss has stopped improving. Decided at each periodic evaluation
    (train.eval_every), on the token-weighted loss over every category's fixed sample; the adapter the
    run keeps is the one with the lowest held-out loss (a checkpoint is written whenever a new lowest
    loss is measured, and train.keep_best keeps it)."""

    enabled: bool = Field(default=False, description="Stop early when held-out loss stops improving.")
    patience: int = Field(
        default=3, ge=1, description="Evaluations in a row without an improvement of min_delta that stop training.")
    min_delta: float = Field(
        default=0.01, gt=0,
        description="Smallest drop of held-out loss (nats/token) that counts as an improvement. Also the "
                    "standard error that eval_rows_per_category=auto sizes the held-out sample for.")


class TrainConfig(Section):
    """Training. The clock of the schedule is the optimizer step; token-valued fields
    (``max_tokens``, ``warmup_tokens``, ``eval_every_tokens``, ``save_every_tokens``) are converted
    to steps once, at launch, as ceil(tokens / tokens_per_step) with tokens_per_step =
    micro_batch_size x grad_accum x world size x seq_len. That is exact because every step consumes
    the same number of packed rows, and it keeps one schedule for the whole run (a resumed run must
    keep the world size; the checkpoint records it and a different one is refused)."""

    micro_batch_size: int = Field(default=8, ge=1, description="Sequences per GPU per forward pass.")
    grad_accum: int = Field(default=4, ge=1)
    epochs: float = Field(default=2, gt=0, description="Passes over the packed training rows (unless max_tokens/max_steps).")
    max_tokens: int | None = Field(
        default=None, ge=1,
        description="Training-token budget ('N tokens'): the run trains this many tokens (fewer when early stopping "
                    "ends it); overrides epochs. Converted to steps once (see the class doc).",
    )
    max_steps: int | None = Field(default=None, ge=1, description="Optimizer steps; overrides epochs and max_tokens.")
    lr: float = Field(default=2e-4, gt=0)
    optimizer: Literal["paged_adamw_8bit", "adamw_torch"] = "paged_adamw_8bit"
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    warmup_steps: int = Field(default=200, ge=0)
    warmup_tokens: int | None = Field(default=None, ge=0, description="Warmup in tokens; overrides warmup_steps.")
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    eval_every: int = Field(default=400, ge=1)
    eval_every_tokens: int | None = Field(default=None, ge=1, description="Eval cadence in tokens; overrides eval_every.")
    save_every: int = Field(default=400, ge=1)
    save_every_tokens: int | None = Field(default=None, ge=1, description="Checkpoint cadence in tokens; overrides save_every.")
    keep_checkpoints: int = Field(
        default=3, ge=1,
        description="Newest checkpoints kept on disk; the best by eval loss is kept as well (keep_best).",
    )
    keep_best: bool = Field(default=True, description="Never delete the checkpoint with the lowest eval loss.")
    eval_batches: int = Field(
        default=8, ge=1, description="Micro-batches per category for periodic eval (when eval_rows_per_category is unset).")
    eval_rows_per_category: int | Literal["auto"] | None = Field(
        default=None,
        description="Held-out packed rows per category for periodic eval (a fixed sample: the first rows of each "
                    "category, sharded across ranks). auto: before the first step, measure the per-row loss spread on "
                    "eval_pilot_rows rows and take enough rows that the standard error of each category's loss is "
                    "below early_stopping.min_delta (at most eval_max_rows_per_category). None: eval_batches x "
                    "micro_batch_size.")
    eval_pilot_rows: int = Field(default=64, ge=2, description="Rows per category measured to size the auto sample.")
    eval_max_rows_per_category: int = Field(
        default=4096, ge=1, description="Upper bound of the auto sample per category (it bounds the cost of an eval).")
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    gradient_checkpointing: bool = True
    log_every: int = Field(default=1, ge=1)
    # -- divergence guard: a non-finite loss/gradient (or a loss spike) skips the step on all ranks
    max_bad_steps: int = Field(
        default=3, ge=1, description="Skipped (non-finite or spiking) steps in a row that count as divergence."
    )
    spike_factor: float | None = Field(
        default=None, gt=1,
        description="A step whose loss exceeds this factor x the running mean of the last spike_window "
                    "good losses is a spike: it is skipped and counts as divergence at once. None = off.",
    )
    spike_window: int = Field(default=20, ge=2, description="Good steps in the running mean (needs this many first).")
    on_divergence: Literal["rollback", "stop"] = Field(
        default="rollback",
        description="rollback: reload weights, optimizer and schedule from the newest good checkpoint and go on "
                    "with the next batches (the ones that diverged are not replayed); stop: exit with a message.",
    )
    rollback_lr_factor: float = Field(default=1.0, gt=0, le=1, description="LR multiplier applied at each rollback.")
    max_rollbacks: int = Field(default=3, ge=0, description="Rollbacks per run (counted in checkpoints) before training stops.")
    # -- launch layout
    num_processes: int = Field(default=1, ge=1, description="Processes (GPUs) per node.")
    nnodes: int = Field(default=1, ge=1, description="Nodes; >1 needs rdzv_endpoint and a run directory on shared storage.")
    node_rank: int = Field(default=0, ge=0, description="This node's rank (0..nnodes-1); not part of the run's identity.")
    rdzv_endpoint: str | None = Field(
        default=None, description="host:port of node 0 for the c10d rendezvous (multi-node); not part of the run's identity."
    )
    launcher: Literal["auto", "accelerate", "torchrun"] = Field(
        default="auto",
        description="auto: plain python for one process, else accelerate launch (needed for FSDP configs); "
                    "torchrun: torch.distributed.run (DDP; also CPU/gloo).",
    )
    accelerate_config: str | None = Field(default=None, description="configs/accelerate/*.yaml")
    num_threads: int | None = Field(default=None, ge=1, description="torch CPU threads (None = torch default).")
    init_adapter: str | None = Field(
        default=None, description="Start LoRA from this adapter directory (e.g. the promoted one) instead of "
        "zeros; used by rescrape-and-retrain with schedule.continue_from_previous.")
    liger_kernel: bool | Literal["auto"] = Field(
        default="auto", description="Fused RoPE/RMSNorm/SwiGLU/linear-cross-entropy kernels (liger-kernel, CUDA only): "
        "+13 % tokens/s and -18 GiB on Mistral-Small-24B (benchmarks/BENCH_NOTES.md). auto = on with CUDA when installed.")
    # -- the fast path (tasks/train/fastpath.py; measured in benchmarks/BENCH_NOTES.md)
    attention: Literal["auto", "varlen", "sdpa"] = Field(
        default="auto", description="Attention over packed rows. varlen: a variable-length flash kernel "
        "(torch.nn.attention.varlen) over document boundaries read from the position ids, no mask; sdpa: "
        "transformers' SDPA with a per-document 4D mask (which moves SDPA off its flash kernel). Both keep "
        "attention inside documents. auto = varlen on CUDA when torch has it, else sdpa.")
    fast_lora: bool = Field(
        default=True, description="One autograd function per LoRA-wrapped 4-bit linear: saves the layer input "
        "once (shared by q/k/v) instead of float32 and dropped copies per projection, and dequantizes the frozen "
        "weight again in the backward. Same adapter layout; off under FSDP.")
    triton_kernels: bool | Literal["auto"] = Field(
        default="auto", description="Triton kernels in the fast path (tasks/train/kernels.py): one-pass NF4 dequantization "
        "for every frozen 4-bit linear (bit-equal to bitsandbytes') and LoRA dropout drawn and applied in one pass. "
        "auto = on with CUDA when Triton is installed.")
    recompute_layers: int | None = Field(
        default=None, ge=0, description="With gradient_checkpointing: recompute only the first N decoder layers "
        "(the others keep their activations: faster, more memory). None = every layer.")
    activation_offload: bool = Field(
        default=False, description="With gradient_checkpointing: keep the per-layer checkpoint inputs in pinned CPU "
        "memory (asynchronous copies, prefetched one layer ahead in the backward): the low-memory setting. CUDA only.")
    deterministic: bool = Field(
        default=False, description="torch.use_deterministic_algorithms: bitwise-reproducible resume (slower on GPU)."
    )

    @model_validator(mode="after")
    def _early_stopping_keeps_best(self) -> TrainConfig:
        if self.early_stopping.enabled and not self.keep_best:
            raise ValueError("train.early_stopping keeps the adapter with the lowest held-out loss from its "
                             "checkpoint: it needs train.keep_best=true")
        return self

    @model_validator(mode="after")
    def _recompute_switches(self) -> TrainConfig:
        if not self.gradient_checkpointing:
            if self.activation_offload:
                raise ValueError("activation_offload offloads the inputs that gradient checkpointing keeps: "
                                 "it needs gradient_checkpointing=true")
            if self.recompute_layers is not None:
                raise ValueError("recompute_layers selects which layers gradient checkpointing recomputes: "
                                 "it needs gradient_checkpointing=true (or leave it unset)")
        return self


class EvaluateConfig(Section):
    max_rows_per_category: int = Field(default=64, ge=1, description="Held-out packed rows per category.")
    batch_size: int = Field(default=4, ge=1)
    prompt: str = "Give me a simple recipe for a vegetable soup."
    max_new_tokens: int = Field(default=80, ge=1)


class GenerateConfig(Section):
    temperature: float = Field(default=0.0, ge=0, description="0 = greedy.")
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_new_tokens: int = Field(default=200, ge=1)
    seed: int = 0


class TrackingConfig(Section):
    tensorboard: bool = True
    wandb: Literal["auto", "on", "off"] = Field(
        default="auto", description="auto = on when WANDB_MODE or WANDB_API_KEY is set."
    )
    wandb_project: str = "data-to-adapter"


class ScheduleConfig(Section):
    """Scheduled re-scrape-and-retrain (flows/rescrape.py) and the promotion gate (tasks/adapter/promote.py)."""

    cron: str | None = Field(default="0 3 * * 1", description="Cron of rescrape-and-retrain, read in `timezone`; "
                             "None registers the deployment without a schedule.")
    timezone: str = Field(default="UTC", description="Time zone the cron is read in.")
    active: bool = Field(default=True, description="Register the schedule active (False: paused).")
    change_threshold: float = Field(default=0.05, ge=0, le=1, description="Retrain only when more than this "
                                    "fraction of pages is new, changed or gone since the current adapter's corpus.")
    promote_tolerance: float = Field(default=0.01, description="A new adapter is promoted only if its held-out "
                                     "loss is at most this much (nats/token) above the current adapter's in every "
                                     "category, both measured on the same rows; negative = must improve by that much.")
    continue_from_previous: bool = Field(default=False, description="Start LoRA from the current adapter's weights "
                                         "(needs train.init_adapter) instead of from scratch.")
    general_set: str | None = Field(
        default="configs/general_instructions.jsonl",
        description="General instructions with reference answers ({\"prompt\", \"answer\"} per line): base and "
        "candidate are scored by their loss on the answers, so an adapter that lost general ability is refused. "
        "None = no general check.")
    general_tolerance: float = Field(
        default=0.05, description="Most the candidate's loss on the general set may exceed the base's (nats/token).")
    approval: bool = Field(
        default=False, description="Pause the flow after the gate and wait for a person to approve or reject the "
        "candidate (the comparison table is the form's description); off = the gate decides alone.")
    approval_timeout_s: int = Field(default=86_400, ge=1, description="No answer within this long rejects.")


class PlanConfig(Section):
    """What ``d2a plan`` estimates from before a scrape (after one it uses the real counts)."""

    results: str = Field(
        default="benchmarks/results.yaml",
        description="Recorded measurements: training throughput per model, operating point and device; model "
        "shapes; disk per corpus token and per trainable parameter.")
    device: str | None = Field(default=None, description="Device of the measurement to plan with (e.g. H200, CPU); "
                               "None = the first that matches the model and operating point.")
    expected_pages: dict[str, int] = Field(
        default_factory=dict, description="source id -> pages (rows) it is expected to yield before its first "
        "scrape; a source not named is planned at its max_pages (an upper bound).")
    tokens_per_page: dict[str, float] = Field(
        default_factory=dict, description="category -> training tokens per scraped page; unset = measured on this "
        "data root's last mix, else unknown.")
    expected_tokens: dict[str, int] = Field(
        default_factory=dict, description="category -> corpus tokens expected before any scrape (overrides the "
        "page estimate for that category).")
    bytes_per_token: dict[str, float] = Field(
        default_factory=dict, description="stage directory -> bytes on disk per corpus token; unset = measured on "
        "this data root, else the recorded demo figures in plan.results.")



# ------------------------------------------------------------------ operations (Prefect server)
class PoolsConfig(Section):
    """Where the deployments of this config run (``d2a deploy``, flows/deployments.py)."""

    cpu: str = Field(default="d2a-cpu", pattern=r"^[A-Za-z0-9_.-]+$",
                     description="Process work pool for scrape, extract and the data stages (no GPU needed).")
    gpu: str = Field(default="d2a-gpu", pattern=r"^[A-Za-z0-9_.-]+$",
                     description="Process work pool for train, evaluate (+ promotion) and generate.")
    dispatch: Literal["auto", "local", "pools"] = Field(
        default="auto", description="How the whole-DAG flow runs train and evaluate. auto: on the GPU pool "
        "(run_deployment) when the DAG itself runs from a work-pool deployment, else in its own process "
        "(d2a run); local: always in-process; pools: always through the GPU pool's deployments.")
    rdzv_port: int | None = Field(
        default=None, ge=1, le=65535, description="Multi-node training from Prefect: port of the c10d rendezvous "
        "on node 0 when train.rdzv_endpoint is unset (None: a free port chosen by node 0).")


class StagePolicy(Section):
    timeout_s: float | None = Field(default=None, gt=0, description="Per attempt; None = no limit.")
    retries: int = Field(default=0, ge=0, le=20)
    retry_delay_s: float = Field(default=10, ge=0)


def _policy(timeout_s: float | None, retries: int = 0, retry_delay_s: float = 10) -> Any:
    return Field(default_factory=lambda: StagePolicy(timeout_s=timeout_s, retries=retries, retry_delay_s=retry_delay_s))


class TimeoutsConfig(Section):
    """Timeout and retry policy of every stage's Prefect task. Scrape retries transient network
    failures only; train retries preemption and crashes (each retry resumes from its checkpoint) but
    never a divergence stop or a config error; the data stages are deterministic, so a retry would
    fail the same way."""

    scrape: StagePolicy = _policy(6 * 3600, retries=2, retry_delay_s=60)
    extract: StagePolicy = _policy(6 * 3600)
    clean: StagePolicy = _policy(12 * 3600)
    split: StagePolicy = _policy(2 * 3600)
    mix: StagePolicy = _policy(6 * 3600)
    tokenize: StagePolicy = _policy(12 * 3600)
    train: StagePolicy = _policy(30 * 86400, retries=2, retry_delay_s=10)
    evaluate: StagePolicy = _policy(12 * 3600, retries=1, retry_delay_s=30)


class NotificationsConfig(Section):
    """Prefect automations created by ``d2a deploy`` / ``d2a server`` (flows/notify.py)."""

    webhook_block: str | None = Field(
        default=None, pattern=r"^[a-z0-9-]+$",
        description="Name of a Prefect Webhook block (its URL is a secret held by Prefect, never in this file); "
        "None = no notifications.")
    on_states: list[Literal["Failed", "Crashed", "Cancelled", "TimedOut"]] = Field(
        default_factory=lambda: ["Failed", "Crashed", "Cancelled", "TimedOut"],
        description="Flow-run states of this config's deployments that post to the webhook.")
    announce_promotions: bool = Field(default=True, description="Post when an adapter is promoted to current.")


class ServerConfig(Section):
    """What a flow run's parameters may change (flows/guard.py). Everything else, and above all what
    selects code or where it runs, comes only from this file on disk."""

    allowed_overrides: list[str] = Field(
        default_factory=lambda: [
            "train.max_steps", "train.max_tokens", "train.epochs", "train.lr", "train.warmup_steps",
            "train.warmup_tokens", "train.eval_every", "train.eval_every_tokens", "train.save_every",
            "train.save_every_tokens", "train.eval_batches", "train.keep_checkpoints", "train.log_every",
            "evaluate.max_rows_per_category", "evaluate.max_new_tokens", "evaluate.prompt",
            "generate.temperature", "generate.top_p", "generate.max_new_tokens", "generate.seed",
            "schedule.change_threshold", "schedule.promote_tolerance", "mix.total_tokens",
            "data_root",
        ],
        description="section.key overrides a flow run may pass (a 'section.*' entry allows the whole section); "
        "data_root only inside this config's data root. Code-selecting keys are refused even if listed.")


class PipelineConfig(Section):
    run_name: str = Field(default="run", pattern=r"^[A-Za-z0-9_.-]+$")
    data_root: str = Field(default="data/run", description="Artifact root; relative paths are from the repo.")
    seed: int = 1234
    demo_site: DemoSiteConfig = Field(default_factory=DemoSiteConfig)
    scrape: ScrapeConfig
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    mix: MixConfig = Field(default_factory=MixConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    dask: DaskConfig = Field(default_factory=DaskConfig)
    model: ModelConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)
    pools: PoolsConfig = Field(default_factory=PoolsConfig)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    notifications: NotificationsConfig = Field(default_factory=NotificationsConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)

    # -- paths ---------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return resolve_path(self.data_root)

    def section(self, name: str) -> dict[str, Any]:
        return getattr(self, name).model_dump(mode="json")


# ------------------------------------------------------------------------------- loading
def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides; values are parsed as YAML (so 3, 1e-4, true, [a,b])."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        dotted, raw = item.split("=", 1)
        keys = [k for k in dotted.strip().split(".") if k]
        if not keys or not all(re.fullmatch(r"[A-Za-z0-9_-]+", k) for k in keys):
            raise ConfigError(f"override {item!r}: bad key {dotted!r}")
        node = data
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
            node = nxt
        node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def load_config(path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    path = resolve_path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    data = apply_overrides(data, overrides)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, str(path))) from None


def config_from_dict(data: dict[str, Any]) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, "config")) from None


def dump_resolved(cfg: PipelineConfig, path: Path) -> None:
    """Write the resolved config (YAML) beside an output. Configs hold no secrets by design."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False), encoding="utf-8")
