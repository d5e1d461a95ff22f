"""The run config: one typed object, the single source of truth for every default.

Keys are flat and named as Axolotl / LLaMA-Factory users already know them (``base_model``, ``lora_r``,
``learning_rate``...), so a config can be read without opening the docs. The model is frozen: a stage receives
a validated config and never changes it; a derived config is a new object (``model_copy(update=...)``).
Each field's description is the documentation: ``docs/config.md`` is generated from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

EMBEDDED_MODEL_ALIAS = "smollm2-135m-instruct"


# --- evaluation: endpoint baselines, LLM judge, release gate (step 4; owned by evaluate/) ---------------------
_LOCAL_SYSTEMS = ("finetuned", "base", "few_shot")


class EndpointBaseline(BaseModel):
    """An OpenAI-compatible chat endpoint answering the same test prompts, as one more baseline column."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., min_length=1, description="Column name in reports and metrics.json, e.g. `gpt-4o-mini`.")
    base_url: str = Field(
        ..., description="API root that has `/chat/completions`, e.g. `https://api.openai.com/v1` or a tuneloop server."
    )
    model: str = Field(..., description="The `model` sent with every request.")
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the API key (the key never goes in the config)."
    )
    few_shot: bool = Field(False, description="Send the few-shot examples as earlier turns, like the `few_shot` baseline.")
    max_tokens: int | None = Field(None, ge=1, description="Answer budget per request; default `max_new_tokens`.")
    concurrency: int = Field(4, ge=1, le=64, description="Requests in flight at once.")
    timeout_s: float = Field(60.0, gt=0.0, description="Seconds before one request is retried (3 attempts in all).")

    @field_validator("name")
    @classmethod
    def _not_a_local_system(cls, value: str) -> str:
        if value in _LOCAL_SYSTEMS:
            raise ValueError(f"{value!r} is the name of a built-in system; choose another name for the endpoint")
        return value


class JudgeConfig(BaseModel):
    """LLM-as-judge: an OpenAI-compatible model grades answers against a rubric; verdicts are cached on disk."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(..., description="API root of the judge, with `/chat/completions` under it.")
    model: str = Field(..., description="Judge model name sent with every request.")
    api_key_env: str | None = Field(None, description="Environment variable holding the judge's API key.")
    rubric: str = Field(
        ..., min_length=1, description="What a good answer is, in plain words; the judge grades against it."
    )
    mode: Literal["pointwise", "pairwise"] = Field(
        "pointwise",
        description=(
            "`pointwise`: each system's answer gets a 1-10 score. `pairwise`: the fine-tune against each "
            "baseline, judged twice with the answers' positions swapped; a win needs both orders to agree."
        ),
    )
    systems: tuple[str, ...] | None = Field(
        None, description="Systems judged (pointwise) or compared with the fine-tune (pairwise); default all."
    )
    max_examples: int | None = Field(
        None, ge=1, description="Judge at most this many test examples (a seeded sample), to bound cost."
    )
    concurrency: int = Field(4, ge=1, le=64, description="Judge requests in flight at once.")
    timeout_s: float = Field(120.0, gt=0.0, description="Seconds before one judge request is retried.")
    cache_dir: Path | None = Field(
        None,
        description=(
            "Where verdicts are cached, keyed by a hash of (model, rubric, prompt, answers); default "
            "`~/.cache/tuneloop/judge`. Relative to the working directory."
        ),
    )


class GateConfig(BaseModel):
    """Release gate: conditions the fine-tune must meet, else ``tuneloop eval`` exits non-zero (3)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_metric: dict[str, float] = Field(
        default_factory=dict,
        description="Floors on the fine-tune's metrics, e.g. `{macro_f1: 0.9}` (any numeric metric of the task).",
    )
    min_gain: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description=(
            "Smallest lead over a baseline, metric by metric, e.g. `{base: {macro_f1: 0.05}}` "
            "(fine-tuned minus baseline, in the metric's own units)."
        ),
    )
    require_significant: bool = Field(
        False,
        description="Every `min_gain` lead must also be significant: its paired bootstrap 95% interval above zero.",
    )
    max_regression_drop: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description=(
            "Largest allowed drop of the regression-check pass rate from base to fine-tune, e.g. `0.02` "
            "(2 points). Needs `regression_check`."
        ),
    )
    max_format_bleed: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Largest allowed share of general prompts the fine-tune answers in the task's format.",
    )


# --- end of step-4 section ------------------------------------------------------------------------------------


class RunConfig(BaseModel):
    """Everything one fine-tuning run needs, from data to evaluation."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    # --- model -------------------------------------------------------------------------------------------
    base_model: str = Field(
        EMBEDDED_MODEL_ALIAS,
        description=(
            "Model to fine-tune: the embedded alias `smollm2-135m-instruct`, a local Hugging Face directory, "
            "a `.gguf` file, or a hub id (needs network or a populated cache). GGUF files are dequantized once "
            "and cached as safetensors."
        ),
    )

    # --- data --------------------------------------------------------------------------------------------
    task: str = Field(
        "classification",
        description="Task type; decides how rows become conversations and which metrics evaluation reports.",
    )
    train_file: Path = Field(
        ..., description="Training data (JSONL or CSV/TSV). Relative paths resolve against the config file."
    )
    validation_file: Path | None = Field(
        None, description="Validation data: validation loss each epoch. Same formats as `train_file`."
    )
    test_file: Path | None = Field(None, description="Held-out test data used by `tuneloop eval`.")
    text_column: str = Field("text", description="CSV/JSONL column holding the input text (classification).")
    label_column: str = Field("label", description="CSV/JSONL column holding the label (classification).")
    labels: tuple[str, ...] | None = Field(
        None, description="Label set (classification). Default: the sorted distinct labels of `train_file`."
    )
    system_prompt: str | None = Field(
        None,
        description=(
            "System message put before every conversation that has none. Classification default: an "
            "instruction that lists the labels. Stored with the run and reused by predict, chat and serve."
        ),
    )
    max_seq_len: int = Field(512, ge=16, description="Longest rendered example, in tokens, prompt included.")
    truncation: Literal["error", "drop"] = Field(
        "error",
        description=(
            "What to do with an example longer than `max_seq_len`: `error` stops with its file and line, "
            "`drop` skips it and counts it in the data report. Examples are never cut silently."
        ),
    )
    allow_data_leakage: bool = Field(
        False,
        description=(
            "Train even when validation/test rows are exact or near copies of training rows "
            "(`tuneloop data audit` lists them). Off: train stops and names the leaked rows."
        ),
    )

    # --- adapter -----------------------------------------------------------------------------------------
    adapter: str = Field(
        "lora", description="Fine-tuning method, looked up in the adapter registry: `lora`, `dora`, `qlora`, `full`."
    )
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    lora_target_modules: tuple[str, ...] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names that get adapters, or `all-linear` for every linear layer but the output head.",
    )

    # --- training ----------------------------------------------------------------------------------------
    epochs: int = Field(3, ge=1, description="Passes over the training data.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (overrides `epochs` when reached first)."
    )
    learning_rate: float = Field(2e-4, gt=0.0, description="Peak learning rate of AdamW.")
    batch_size: int = Field(8, ge=1, description="Examples per micro-batch (per device).")
    grad_accum: int = Field(
        1,
        ge=1,
        description=(
            "Micro-batches per optimizer step. The loss is normalised by the trained tokens of the whole "
            "accumulated batch, so equal `batch_size * grad_accum` gives the same updates."
        ),
    )
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate decay after warmup.")
    warmup_ratio: float = Field(0.05, ge=0.0, le=1.0, description="Fraction of optimizer steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Compute precision; `auto` picks bf16 where the device supports it, else fp32."
    )
    seed: int = Field(42, description="Seeds data order, adapter init and dropout: same seed, same run.")
    logging_steps: int = Field(5, ge=1, description="Write a `metrics.jsonl` line every N optimizer steps.")
    save_every_steps: int | None = Field(
        None, ge=1, description="Also checkpoint every N optimizer steps (a checkpoint is always written each epoch)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Complete checkpoints kept on disk; older ones are deleted.")

    # --- training methods, early stopping, tracking (step 3; owned by train/ and adapters/) ---------------
    method: Literal["sft", "dpo"] = Field(
        "sft",
        description=(
            "Training recipe: `sft` (supervised, loss on the answers) or `dpo` (direct preference optimisation "
            "on `prompt`/`chosen`/`rejected` rows; the reference model is the frozen base with the adapter "
            "switched off, so no second copy is held in memory)."
        ),
    )
    use_rslora: bool = Field(
        False, description="Rank-stabilised LoRA: scale adapters by alpha/sqrt(r) instead of alpha/r (helps large ranks)."
    )
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = Field(
        "adamw",
        description=(
            "`adamw` (torch), or bitsandbytes' `adamw_8bit` (quarter of the optimizer memory), `paged_adamw` / "
            "`paged_adamw_8bit` (state in paged memory that spills to the host under pressure; GPU only)."
        ),
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        False,
        description=(
            "Recompute each layer's activations in the backward pass: much less memory, ~30% slower. `auto`: "
            "checkpoint only as many layers as needed to fit `memory_budget_gib` (none when everything fits; "
            "every layer on CPU is never needed, so none there)."
        ),
    )
    eval_every_steps: int | None = Field(
        None,
        ge=1,
        description="Also compute validation loss, and checkpoint, every N optimizer steps (always at each epoch end).",
    )
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        description=(
            "Stop after this many validations in a row without the validation loss improving by "
            "`early_stopping_min_delta`. Needs `validation_file`. Off when unset."
        ),
    )
    early_stopping_min_delta: float = Field(
        0.0, ge=0.0, description="Smallest drop in validation loss that counts as an improvement."
    )
    select_best_checkpoint: bool = Field(
        False,
        description=(
            "Save the weights of the validation with the lowest loss as the run's artefact instead of the last "
            "ones; that checkpoint is kept on disk beyond `keep_checkpoints`. Needs `validation_file`."
        ),
    )
    init_adapter: Path | None = Field(
        None,
        description=(
            "Start from a trained run's adapter (its run directory or `adapter/` folder) instead of a fresh one, "
            "e.g. DPO after SFT. Relative to the working directory."
        ),
    )
    dpo_beta: float = Field(
        0.1, gt=0.0, description="DPO temperature: how far the policy may move from the reference (higher: less)."
    )
    report_to: tuple[Literal["tensorboard", "wandb", "mlflow"], ...] | Literal["auto", "none"] = Field(
        "auto",
        description=(
            "Experiment trackers: `auto` (TensorBoard under output_dir/tensorboard when installed), `none`, or a "
            "list of `tensorboard`, `wandb`, `mlflow` (each an optional install)."
        ),
    )
    tracking_project: str = Field("tuneloop", description="W&B project / MLflow experiment name for `report_to`.")

    # --- fast path (step 6; owned by train/fast/) ----------------------------------------------------------
    packing: bool = Field(
        False,
        description=(
            "Padding-free batches: each micro-batch's examples are laid end to end in one row with their own "
            "positions, and attention never crosses from one example into another (varlen attention on CUDA, "
            "a block-diagonal mask elsewhere). Same examples per batch and same loss as padded batches; no "
            "compute is spent on padding. SFT only (DPO batches stay padded)."
        ),
    )
    kernels: Literal["auto", "compile", "fused", "eager"] = Field(
        "auto",
        description=(
            "`compile`: each decoder layer is compiled by torch.compile (fused norm, RoPE, SwiGLU and LoRA "
            "element-wise work, and leaner saved activations), falling back to eager with a warning if compiling "
            "fails; `fused`: uncompiled layers, with each plain LoRA linear computed as three matmuls and each "
            "RMSNorm by torch's fused op; `eager`: the modules exactly as PEFT and transformers build them; "
            "`auto`: `compile` on CUDA, `fused` under `cuda_graphs` and on the CPU."
        ),
    )
    cuda_graphs: bool = Field(
        False,
        description=(
            "Replay each packed training step (forward, loss and backward) as a CUDA graph, one per row length: "
            "rows are padded up to a few length buckets with segments nothing attends to and no loss is taken "
            "on. Removes the per-kernel launch cost that bounds small models (a 135M model spends most of an "
            "eager step launching ~8,000 kernels). Needs `packing`, one CUDA GPU and uncompiled layers; otherwise "
            "the run trains without graphs and says why."
        ),
    )
    memory_budget_gib: float | None = Field(
        None,
        gt=0.0,
        description=(
            "GPU memory the run may use, for `gradient_checkpointing: auto`. Default: the memory free on the "
            "GPU when training starts, less 5%."
        ),
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker_is_a_list(cls, value: object) -> object:
        if isinstance(value, str) and value not in ("auto", "none"):
            return (value,)
        return value

    @model_validator(mode="after")
    def _methods_fit_together(self) -> RunConfig:
        needs_validation = [
            key for key in ("early_stopping_patience", "select_best_checkpoint") if getattr(self, key)
        ]
        if needs_validation and self.validation_file is None:
            raise ValueError(f"{', '.join(needs_validation)} needs validation_file")
        if self.method == "dpo" and self.adapter == "full":
            raise ValueError("method dpo needs an adapter (the reference is the base with the adapter off), not full")
        if self.cuda_graphs and not self.packing:
            raise ValueError("cuda_graphs needs packing: true (graphs replay packed rows of a few fixed lengths)")
        return self
    # --- end of step-3 section -------------------------------------------------------------------------

    # --- evaluation --------------------------------------------------------------------------------------
    eval_batch_size: int = Field(16, ge=1, description="Prompts per generation batch during evaluation.")
    max_new_tokens: int = Field(16, ge=1, description="Generation budget per answer during evaluation.")
    few_shot_k: int = Field(6, ge=0, description="Examples from the training data in the few-shot baseline prompt.")
    baselines: tuple[Literal["base", "few_shot"] | EndpointBaseline, ...] = Field(
        ("base", "few_shot"),
        description=(
            "Baselines evaluated next to the fine-tuned model: `base` (zero-shot), `few_shot`, and any "
            "OpenAI-compatible endpoint as `{name, base_url, model, api_key_env, few_shot, max_tokens, "
            "concurrency, timeout_s}` (see docs/evaluation.md)."
        ),
    )
    # --- evaluation, step 4 (owned by evaluate/): task metrics, confidence, regression, judge, gate ------------
    json_schema: Path | None = Field(
        None,
        description="JSON Schema the answers of a `json` task must validate against. Relative to the config file.",
    )
    bootstrap_samples: int = Field(
        1000,
        ge=0,
        description="Bootstrap resamples for the 95% intervals and the paired significance tests (0: none).",
    )
    regression_check: bool = Field(
        True,
        description=(
            "Score base and fine-tune on tuneloop's general-purpose prompt set, to catch forgetting and the "
            "task's format bleeding into unrelated answers."
        ),
    )
    regression_prompts: Path | None = Field(
        None,
        description="Own regression prompt set (JSONL, docs/evaluation.md); default the set shipped with tuneloop.",
    )
    regression_max_new_tokens: int = Field(32, ge=1, description="Generation budget per regression-check answer.")
    judge: JudgeConfig | None = Field(
        None,
        description=(
            "LLM-as-judge: `{base_url, model, api_key_env, rubric, mode: pointwise|pairwise, systems, "
            "max_examples, concurrency, timeout_s, cache_dir}` (see docs/evaluation.md). Off when unset."
        ),
    )
    gate: GateConfig | None = Field(
        None,
        description=(
            "Release gate for `tuneloop eval`: `{min_metric, min_gain, require_significant, max_regression_drop, "
            "max_format_bleed}` (see docs/evaluation.md); the command exits 3 when it fails. Off when unset."
        ),
    )

    @model_validator(mode="after")
    def _evaluation_fits_together(self) -> RunConfig:
        names = [b.name for b in self.baselines if isinstance(b, EndpointBaseline)]
        if len(set(names)) != len(names):
            raise ValueError("baselines: endpoint names must be distinct")
        if self.gate is not None and self.gate.max_regression_drop is not None and not self.regression_check:
            raise ValueError("gate.max_regression_drop needs regression_check: true")
        if self.gate is not None and self.gate.max_format_bleed is not None and not self.regression_check:
            raise ValueError("gate.max_format_bleed needs regression_check: true")
        return self

    @field_validator("baselines", mode="before")
    @classmethod
    def _known_baselines(cls, value: object) -> object:
        for item in value if isinstance(value, (list, tuple)) else ():
            if isinstance(item, str) and item not in ("base", "few_shot"):
                raise ValueError(f"unknown baseline {item!r}; use base, few_shot or an endpoint mapping {{name, base_url, model}}")
        return value
    # --- end of step-4 evaluation fields ----------------------------------------------------------------------

    # --- output ------------------------------------------------------------------------------------------
    output_dir: Path = Field(
        Path("runs/run"), description="Run directory: config, checkpoints, adapter, metrics, eval. Relative to the working directory."
    )

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _one_module_is_a_list(cls, value: object) -> object:
        if isinstance(value, str) and value != "all-linear":
            return (value,)
        return value

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        from tuneloop.tasks import TASKS

        if value not in TASKS:
            raise ValueError(f"unknown task {value!r}; known: {', '.join(sorted(TASKS))}")
        return value

    @field_validator("adapter")
    @classmethod
    def _known_adapter(cls, value: str) -> str:
        from tuneloop.adapters import ADAPTER_METHODS

        if value not in ADAPTER_METHODS:
            raise ValueError(f"unknown adapter {value!r}; known: {', '.join(sorted(ADAPTER_METHODS))}")
        return value

    @model_validator(mode="after")
    def _labels_are_distinct(self) -> RunConfig:
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be distinct")
        return self

    def resolve_paths(self, base_dir: Path) -> RunConfig:
        """Return a copy whose data paths are absolute, relative ones taken from ``base_dir``."""

        def absolute(path: Path | None) -> Path | None:
            if path is None or path.is_absolute():
                return path
            return (base_dir / path).resolve()

        return self.model_copy(
            update={
                "train_file": absolute(self.train_file),
                "validation_file": absolute(self.validation_file),
                "test_file": absolute(self.test_file),
                "json_schema": absolute(self.json_schema),  # step 4
                "regression_prompts": absolute(self.regression_prompts),  # step 4
            }
        )
