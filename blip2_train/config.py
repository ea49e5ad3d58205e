"""Typed configuration schema.

Every YAML file under ``conf/`` is validated against these dataclasses (registered in Hydra's
ConfigStore as the schema of the primary config), so a misspelt key or a value of the wrong type
fails at composition time. Checks that Hydra cannot make are :func:`validate`'s, which names the
valid values: a group's ``name`` field must be one of the group's YAML files (read from the tree,
never listed in Python), other enumerations are in :data:`VALID`.
"""

from __future__ import annotations

import importlib.resources
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class EncoderConfig:
    """The frozen image encoder (open_clip)."""

    name: str = MISSING  # a preset of conf/encoder/ (its file name)
    model_name: str = MISSING  # open_clip architecture, e.g. EVA01-g-14
    pretrained: str | None = None  # open_clip tag, a local file, or null for random init
    image_size: int = 224
    drop_last_blocks: int = 1  # BLIP-2 takes the output of the second-to-last block
    precision: str = "fp32"  # fp32 | fp16 | bf16 (weights and compute of the frozen ViT)
    freeze: bool = True
    # freeze=false only: recompute each ViT block in backward (activation memory ~ one block)
    gradient_checkpointing: bool = False


@dataclass
class QFormerConfig:
    """Q-Former (BERT with cross-attention) and its heads."""

    bert: str | None = "bert-base-uncased"  # hub id or local dir for init; null = random init
    tokenizer: str | None = None  # hub id / local dir; null = same as bert, or built locally
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    cross_attention_frequency: int = 2
    num_query_tokens: int = 32
    embed_dim: int = 256  # ITC projection size
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    temp_init: float = 0.07
    # LAVIS never clamps the temperature (null). [0.001, 0.5] keeps it in a sane range.
    temp_clamp: list[float] | None = None
    gradient_checkpointing: bool = False
    # fast: our own Q-Former (models/fast_qformer.py; same weights and numerics, cross-attention
    # keys/values computed once per image per step); hf: transformers' Blip2QFormerModel.
    impl: str = "fast"
    # impl=fast, CPU tensors, eager mode: how dropout draws its masks. packed: four 16-bit draws
    # per random 64-bit word and a bool mask kept for backward (keep probability 1 - p to within
    # 2^-16; the dropout ops take 2.3x less time and 4x less memory); torch: torch's bernoulli
    # draws, the masks transformers' module and LAVIS draw for the same seed. GPU: packed = the
    # attention dropout inside SDPA's fused kernel (probabilities never stored), torch = softmax,
    # F.dropout and matmul written out as transformers/LAVIS do; other dropout is torch's either way.
    dropout_masks: str = "packed"


@dataclass
class BridgeConfig:
    """Stage 2's bridge from the image encoder's tokens to the LLM's prompts (models/bridges.py)."""

    name: str = "qformer"  # a file of conf/bridge: qformer | mlp | pool_mlp
    # visual tokens per image: qformer = its queries (conf/bridge/qformer.yaml sets
    # qformer.num_query_tokens from it); pool_mlp = the pooled square; mlp = null (every patch token)
    num_tokens: int | None = 32
    keep_cls: bool = False  # mlp / pool_mlp: also feed the encoder's CLS token (LLaVA-1.5 and DeCo drop it)
    hidden_size: int | None = None  # mlp / pool_mlp: the MLP's hidden width; null = the LLM's width
    # qformer only: > 0 first trains a stage 1 (ITC + ITM + ITG, llm=none) of this many steps on the same
    # encoder, data and Q-Former, at stage1_lr and stage1_seed, cached under ${cache_dir}/stage1_init/ keyed
    # by its config, and starts stage 2 from it (init_from). 0: from scratch, or from init_from as given.
    stage1_steps: int = 0
    stage1_lr: float = 1e-3
    stage1_seed: int = 0


@dataclass
class OptimConfig:
    """AdamW + linear warmup + cosine decay, stepped per optimizer step."""

    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_start_lr: float = 1e-6
    warmup_steps: int = 5000
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    # fused: torch's single-kernel AdamW (CPU and CUDA); foreach; for_loop. LAVIS uses torch's
    # default: foreach on CUDA, for_loop on CPU. Same update rule; results differ by rounding.
    implementation: str = "fused"
    # Layer-wise lr decay of a trainable image encoder (encoder.freeze=false): block i of L trains at
    # lr x layer_decay^(L - i), the embeddings at lr x layer_decay^(L + 1) (LAVIS retrieval: 0.95). 1.0 = off.
    layer_decay: float = 1.0


@dataclass
class StageConfig:
    """What is trained: stage 1 (ITC + ITM + ITG) or stage 2 (LM through a frozen LLM)."""

    name: int = 1
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    itg_weight: float = 1.0
    label_smoothing: float = 0.1
    max_text_len: int = 32  # training captions
    max_eval_text_len: int = 35  # retrieval evaluation captions
    # stage 2 only: caption (LM on captions) | vqa (answers to questions; vqa.* settings, docs/vqa.md)
    task: str = "caption"


@dataclass
class SyntheticConfig:
    """Synthetic shards written by data_recipes/synthetic.py on first use."""

    cache_dir: str = "${cache_dir}/synthetic"
    num_train: int = 4000
    num_val: int = 100
    samples_per_shard: int = 500
    image_size: int = 64
    seed: int = 0
    # shapes: one shape per image (data/synthetic.py); scenes: one to three objects, some small, with
    # their count (data/synthetic_scenes.py), scored by attribute / count accuracy and hallucination;
    # qa: 1-4 copies of a shape with questions and annotators' answers (data/synthetic_qa.py)
    kind: str = "shapes"


@dataclass
class DataSourceConfig:
    """One training source of a mix: its shards and its share of the samples (weight / sum of weights)."""

    name: str = MISSING  # names the metric data/source_<name>_samples: letters, digits, _
    shards: str = MISSING  # as data.train_shards: a directory, a brace pattern, several joined by ::
    weight: float = 1.0


@dataclass
class DataConfig:
    """webdataset shards (img2dataset layout) or the embedded synthetic set."""

    name: str = "webdataset"  # a preset of conf/data/
    train_shards: str | None = None  # brace-expanded URL(s) or a directory of .tar files
    # several training sources mixed by weight, instead of train_shards (docs/data.md, "Mixing sources")
    sources: list[DataSourceConfig] = field(default_factory=list)
    val_shards: str | None = None
    batch_size: int = 32  # per device
    global_batch_size: int | None = None  # when set: batch_size = global / (devices x nodes)
    eval_batch_size: int = 64
    num_workers: int = 2
    shuffle_buffer: int = 1000
    resampled: bool = True
    samples_per_epoch: int = 100_000  # with_epoch length (resampled shards have no natural end)
    max_words: int = 50
    max_skipped_fraction: float = 0.1  # stop when more than this fraction of samples is bad
    train_augment: bool = True
    # frozen encoder tokens of the training samples, written by python -m blip2_train.data.feature_cache
    feature_cache: str | None = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class TrainerConfig:
    """Passed (mostly) straight to lightning.Trainer."""

    name: str = "default"  # a preset of conf/trainer/
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp
    precision: str | None = None  # null: bf16-mixed on GPU, 32-true on CPU
    max_steps: int = 1000
    val_check_interval: int | None = None  # steps between validations (null: at the end only)
    log_every_n_steps: int = 10
    gradient_clip_val: float | None = None
    accumulate_grad_batches: int = 1
    # A non-finite loss skips its update; this many in a row stop the run with an error.
    max_nonfinite_steps: int = 10
    compile: bool = False
    # torch.compile's mode when compile is true: reduce-overhead replays the compiled Q-Former as CUDA
    # graphs (one recorded per input shape), for a step bound by kernel launches (docs/benchmarks.md, MFU).
    compile_mode: str = "default"
    deterministic: bool = False
    enable_progress_bar: bool = True


@dataclass
class LoggerConfig:
    name: str = "csv"  # a preset of conf/logger/
    project: str = "blip2_train"
    offline: bool = True  # wandb: offline unless WANDB_MODE or an API key says otherwise


@dataclass
class RetrievalConfig:
    k_test: int = 128


@dataclass
class CheckpointConfig:
    every_n_steps: int | None = None
    save_last: bool = True


@dataclass
class LLMConfig:
    """Frozen language model of stage 2 (filled in by the llm group)."""

    name: str = "none"  # a preset of conf/llm/
    kind: str = "none"  # decoder | encoder_decoder
    model: str | None = None  # hub id or local dir
    precision: str = "bf16"
    force_fp16: bool = False
    dropout_in_train: bool = False  # LAVIS leaves the frozen LLM's dropout on (true)
    max_text_len: int = 32
    prompt: str = ""
    # which tokens of prompt + caption are masked: "joined" the prompt's tokens in the joined text; "lavis"
    # (LAVIS's blip2_opt) as many as the prompt has alone, which also masks the caption's first token when
    # the prompt ends in a space ("a photo of "): docs/finetuning.md, "Prompt masking"
    prompt_mask: str = "joined"
    # T5 only: the feed-forward activation, set on the loaded config. flant5: gelu (LAVIS's blip2_t5 and
    # transformers' BLIP-2 conversion); gelu_new is what flan-t5's own config.json says; null keeps it.
    dense_act_fn: str | None = None
    tiny: dict = field(default_factory=dict)  # sizes of a randomly initialised tiny model


@dataclass
class GenerationConfig:
    num_beams: int = 5
    max_new_tokens: int = 30
    min_new_tokens: int = 8
    prompt: str = "a photo of"
    length_penalty: float = 1.0


@dataclass
class VQAConfig:
    """stage.task=vqa: visual question answering (docs/vqa.md)."""

    prompt: str = "Question: {} Short answer:"  # the LLM's text; {} is the question (LAVIS's zero-shot prompt)
    # the question also enters the Q-Former beside the queries (instruction-aware queries, as the paper's
    # VQA fine-tuning and InstructBLIP); false: the LLM prompt alone (zero-shot VQA of a stage-2 model)
    qformer_text_input: bool = True
    max_question_len: int = 35  # Q-Former tokens of the question
    num_beams: int = 5  # answer generation (docs/blip2_numerics.md s.5: beam 5, at most 10 tokens)
    max_new_tokens: int = 10
    min_new_tokens: int = 1
    length_penalty: float = -1.0  # < 0 favours the shorter beams: VQA answers are a word or two


@dataclass
class Blip2Config:
    """The primary config: ``conf/config.yaml`` composes onto this."""

    stage: StageConfig = field(default_factory=StageConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    vqa: VQAConfig = field(default_factory=VQAConfig)
    run_dir: str = "runs/${now:%Y-%m-%d_%H-%M-%S}"
    init_from: str | None = None
    # A frozen pretrained encoder keeps encoder.pretrained's weights under init_from (the report lists the
    # source's encoder.* as skipped); true loads the source's vision tower, e.g. a fine-tuned ViT.
    init_from_encoder: bool = False
    seed: int = 42
    cache_dir: str = "${oc.env:BLIP2_CACHE,.cache}"  # synthetic shards, tiny tokenizers
    experiment_name: str = "default"
    requires_init_from: bool = False  # recipes that continue a stage-1 run set it


def conf_dir() -> Path:
    """The Hydra config tree: ``$BLIP2_CONF_DIR`` when set, else the package's own ``blip2_train/conf``
    (in a wheel the shipped copy; in a checkout a symlink to the repository's ``conf/``)."""
    override = os.environ.get("BLIP2_CONF_DIR")
    if override:
        return Path(override)
    packaged = Path(str(importlib.resources.files("blip2_train") / "conf"))
    if packaged.is_dir():
        return packaged.resolve()
    return Path(__file__).resolve().parent.parent / "conf"  # a checkout made without symlinks


#: The config tree this process composes from (fixed at import; see :func:`conf_dir`).
CONF_DIR = conf_dir()

#: Config groups whose presets carry a ``name`` field: the valid names are the group's YAML files, so
#: adding a preset is adding a file (see :func:`group_choices`).
NAMED_GROUPS = ("stage", "encoder", "data", "trainer", "logger", "llm")


def group_choices(group: str, conf: str | os.PathLike | None = None) -> tuple[str, ...]:
    """The presets of config group ``group``: the YAML file names under ``<conf tree>/<group>/``, sorted."""
    directory = Path(conf if conf is not None else conf_dir()) / group
    return tuple(sorted(path.stem for path in directory.glob("*.yaml")))


#: Fields whose values are a fixed enumeration in code, not a config group.
VALID = {
    "encoder.precision": ("fp32", "fp16", "bf16"),
    "stage.task": ("caption", "vqa"),
    "data.synthetic.kind": ("shapes", "scenes", "qa"),
    "trainer.strategy": ("auto", "ddp", "fsdp"),
    "llm.precision": ("fp32", "fp16", "bf16"),
    "llm.prompt_mask": ("joined", "lavis"),
    "qformer.impl": ("fast", "hf"),
    "qformer.dropout_masks": ("packed", "torch"),
    "optim.implementation": ("fused", "foreach", "for_loop"),
    "trainer.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
}
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the compile modes that replay CUDA graphs
DENSE_ACT_FNS = ("gelu", "gelu_new")  # llm.dense_act_fn: erf GELU (LAVIS's flan-t5), tanh GELU (flan-t5's config)


def normalize_overrides(args: list[str]) -> list[str]:
    """``stage=1`` -> ``stage='1'``: Hydra parses a bare 1 as an int, which a group choice cannot be."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") == "stage" and value and all(v.strip().isdigit() for v in value.split(",")):
            value = ",".join(f"'{v.strip()}'" for v in value.split(","))
        out.append(f"{key}{sep}{value}" if sep else arg)
    # The Q-Former bridge's visual tokens are its queries (conf/bridge/qformer.yaml: bridge.num_tokens sets
    # qformer.num_query_tokens); a command line that sets the query count alone keeps meaning what it did.
    keys = {arg.partition("=")[0].lstrip("+~"): arg.partition("=")[2] for arg in out if "=" in arg}
    if "qformer.num_query_tokens" in keys and "bridge.num_tokens" not in keys and keys.get("bridge", "qformer") == "qformer":
        out.append(f"bridge.num_tokens={keys['qformer.num_query_tokens']}")
    return out


def register_configs() -> None:
    """Register the schema so that conf/config.yaml is type-checked on composition."""
    cs = ConfigStore.instance()
    cs.store(name="blip2_schema", node=Blip2Config)


def validate(cfg) -> None:
    """Check choices Hydra cannot check by type; raise ValueError naming the valid ones."""
    from omegaconf import OmegaConf

    if cfg.requires_init_from and not cfg.init_from:
        raise ValueError(f"experiment {cfg.experiment_name} starts from an earlier run (its header names "
                         f"which stage): add init_from=runs/<that run>/checkpoints/last.ckpt")
    conf = conf_dir()
    for group in NAMED_GROUPS:
        value = OmegaConf.select(cfg, f"{group}.name")
        valid = group_choices(group, conf)
        if str(value) not in valid:
            raise ValueError(f"{group}.name={value!r} is not a preset of {conf / group}; choose one of: "
                             f"{', '.join(valid)} (or add {group}/{value}.yaml to the config tree)")
    for key, valid in VALID.items():
        value = OmegaConf.select(cfg, key)
        if value not in valid:
            raise ValueError(
                f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, valid))}"
            )
    if cfg.trainer.compile_mode != "default" and not cfg.trainer.compile:
        raise ValueError(f"trainer.compile_mode={cfg.trainer.compile_mode} applies to a compiled Q-Former: "
                         f"add trainer.compile=true")
    validate_task(cfg)
    if cfg.optim.layer_decay != 1.0 and cfg.encoder.freeze:
        raise ValueError(f"optim.layer_decay={cfg.optim.layer_decay} scales the learning rates of a trainable "
                         f"image encoder: add encoder.freeze=false, or set optim.layer_decay=1.0")
    if not cfg.encoder.freeze and cfg.data.get("feature_cache"):
        raise ValueError(f"data.feature_cache={cfg.data.feature_cache} holds a frozen encoder's tokens, but "
                         f"encoder.freeze=false trains the encoder on the images: drop data.feature_cache")
    if cfg.init_from_encoder and not cfg.init_from:
        raise ValueError("init_from_encoder=true needs init_from (the checkpoint or directory whose vision "
                         "tower to load)")
    if cfg.init_from_encoder and cfg.data.feature_cache:
        raise ValueError(f"init_from_encoder=true replaces the encoder's weights, but data.feature_cache="
                         f"{cfg.data.feature_cache} holds tokens of encoder.pretrained's: drop data.feature_cache")
    act = cfg.llm.get("dense_act_fn")
    if act is not None and act not in DENSE_ACT_FNS:
        raise ValueError(f"llm.dense_act_fn={act!r} is not valid; choose one of: {', '.join(DENSE_ACT_FNS)} "
                         f"(or null: the checkpoint's own)")
    if act is not None and cfg.llm.kind != "encoder_decoder":
        raise ValueError(f"llm.dense_act_fn={act} sets a T5 feed-forward activation (encoder-decoder LLMs); "
                         f"llm={cfg.llm.name} is {cfg.llm.kind}: remove it")
    if cfg.stage.name == 2 and cfg.llm.name == "none":
        llms = [f"llm={name}" for name in group_choices("llm", conf) if name != "none"]
        raise ValueError(f"stage=2 needs an LLM: add one of {', '.join(llms)}")
    sources = cfg.data.get("sources") or []
    if cfg.data.name == "webdataset" and not cfg.data.train_shards and not sources and cfg.trainer.max_steps > 0:
        raise ValueError(
            "data=webdataset needs data.train_shards (a directory of .tar shards or a brace URL such "
            "as 'data.train_shards=\"dir/{00000..00007}.tar\"') or data.sources; or use data=synthetic"
        )
    validate_sources(sources, cfg.data.train_shards)
    validate_bridge(cfg)
    if cfg.qformer.num_query_tokens < 1:
        raise ValueError(f"qformer.num_query_tokens must be >= 1, got {cfg.qformer.num_query_tokens}")
    if cfg.llm.kind == "encoder_decoder" and cfg.llm.precision == "fp16" and not cfg.llm.force_fp16:
        raise ValueError(
            "T5 overflows in fp16: use llm.precision=bf16 (default) or fp32, or set llm.force_fp16=true"
        )


def validate_task(cfg) -> None:
    """stage.task=vqa: stage 2, question-answer data, a prompt with a slot for the question."""
    from omegaconf import OmegaConf

    # read with defaults: configs stored in checkpoints written before VQA existed lack these keys
    task = OmegaConf.select(cfg, "stage.task", default="caption")
    synthetic_kind = OmegaConf.select(cfg, "data.synthetic.kind", default="shapes")
    if task not in VALID["stage.task"]:
        raise ValueError(f"stage.task={task!r} is not valid; choose one of: {', '.join(VALID['stage.task'])}")
    if task != "vqa":
        if cfg.data.name == "synthetic" and synthetic_kind == "qa":
            raise ValueError("data.synthetic.kind=qa holds questions, not captions: add stage.task=vqa "
                             "(or use data=synthetic for captions)")
        return
    if cfg.stage.name != 2:
        raise ValueError(f"stage.task=vqa needs stage=2 (an LLM answers), got stage={cfg.stage.name}")
    if cfg.data.name == "synthetic" and synthetic_kind != "qa":
        raise ValueError("stage.task=vqa needs question-answer data: use data=synthetic_qa (or "
                         "data.synthetic.kind=qa), or data=webdataset with VQA shards (docs/vqa.md)")
    prompt = OmegaConf.select(cfg, "vqa.prompt", default=VQAConfig.prompt)
    if "{}" not in prompt:
        raise ValueError(f"vqa.prompt={prompt!r} has no {{}} for the question, e.g. "
                         f"'Question: {{}} Short answer:'")
    if cfg.data.get("feature_cache"):
        raise ValueError(f"data.feature_cache={cfg.data.feature_cache} serves caption samples only: its lookup "
                         "reads {key}.txt captions, not the {key}.json question and answers VQA trains on; unset "
                         "data.feature_cache for stage.task=vqa (the frozen encoder then runs on the images)")


def bridge_names() -> list[str]:
    """The bridges there are: the ``bridge.name`` values of the files of conf/bridge (a new bridge is a module
    and a YAML file; a file such as qformer_stage1.yaml is another recipe of a bridge, not another bridge)."""
    from omegaconf import OmegaConf

    names = set()
    for path in (CONF_DIR / "bridge").glob("*.yaml"):
        names.add(str(OmegaConf.select(OmegaConf.load(path), "bridge.name", default=path.stem)))
    return sorted(names)


def validate_bridge(cfg) -> None:
    """bridge.name is a file of conf/bridge; the Q-Former bridge's token count is its query count."""
    from omegaconf import OmegaConf

    name = OmegaConf.select(cfg, "bridge.name", default="qformer")
    valid = bridge_names()
    if name not in valid:
        raise ValueError(f"bridge={name!r} is not valid; choose one of: {', '.join(valid)}")
    count = OmegaConf.select(cfg, "bridge.num_tokens", default=None)
    if cfg.stage.name == 2 and name == "qformer" and count is not None and count != cfg.qformer.num_query_tokens:
        raise ValueError(f"bridge=qformer with bridge.num_tokens={count} but qformer.num_query_tokens="
                         f"{cfg.qformer.num_query_tokens}: the Q-Former bridge's visual tokens are its queries; "
                         f"set bridge.num_tokens={cfg.qformer.num_query_tokens} (it sets qformer.num_query_tokens)")
    if count is not None and count < 1:
        raise ValueError(f"bridge.num_tokens must be >= 1 or null, got {count}")
    steps = OmegaConf.select(cfg, "bridge.stage1_steps", default=0) or 0
    if steps < 0:
        raise ValueError(f"bridge.stage1_steps must be >= 0 (0: no stage-1 pre-training), got {steps}")
    if steps and (cfg.stage.name != 2 or name != "qformer"):
        raise ValueError(f"bridge.stage1_steps={steps} pre-trains a Q-Former for stage 2: it needs stage=2 and "
                         f"bridge=qformer (got stage={cfg.stage.name}, bridge={name}); set bridge.stage1_steps=0")
    if steps and cfg.init_from:
        raise ValueError(f"bridge.stage1_steps={steps} makes its own init_from (a cached stage-1 run), but "
                         f"init_from={cfg.init_from} is given too: drop one of them")
    if steps and (cfg.trainer.strategy != "auto" or str(cfg.trainer.devices) not in ("1", "auto")
                  or cfg.trainer.num_nodes != 1):
        raise ValueError(f"bridge.stage1_steps={steps} trains its stage 1 in this process, on one device: with "
                         f"trainer.strategy={cfg.trainer.strategy}, devices={cfg.trainer.devices}, num_nodes="
                         f"{cfg.trainer.num_nodes}, run stage 1 on its own and pass init_from=<its last.ckpt> "
                         f"with bridge.stage1_steps=0")


def validate_sources(sources, train_shards) -> None:
    """data.sources: unique metric-safe names, positive weights, and not together with train_shards."""
    import re

    if not sources:
        return
    if train_shards:
        raise ValueError(f"set data.train_shards or data.sources, not both (train_shards={train_shards!r}, "
                         f"sources={[s.name for s in sources]}); add a source for those shards instead")
    names = [s.name for s in sources]
    for source in sources:
        if not re.fullmatch(r"[A-Za-z0-9_]+", str(source.name)):
            raise ValueError(f"data.sources name {source.name!r} must be letters, digits and _ "
                             f"(it names the metric data/source_<name>_samples)")
        if not source.weight > 0:
            raise ValueError(f"data.sources {source.name}: weight must be > 0, got {source.weight}")
        if not source.shards:
            raise ValueError(f"data.sources {source.name}: shards is empty")
    if len(set(names)) != len(names):
        raise ValueError(f"data.sources names must be unique, got {names}")


class OverrideError(ValueError):
    """A ``key=value`` override that the schema refuses (unknown key or wrong type)."""


def _check_override_key(cfg, key: str, command_keys: tuple[str, ...]) -> None:
    """Walk ``key`` down the config; an unknown part fails naming the keys valid at that level."""
    import difflib

    from omegaconf import DictConfig

    node, path = cfg, []
    for part in key.split("."):
        if not isinstance(node, DictConfig):  # a list or a value: the merge checks the rest
            return
        if part not in node:
            where = ".".join(path) or "the top level"
            names = [str(k) for k in node]
            own = list(command_keys) if not path else []
            valid = sorted(names) + [f"{k} (this command's own)" for k in own]
            close = difflib.get_close_matches(part, names + own, n=1)
            hint = f" Did you mean {'.'.join(path + close)}?" if close else ""
            raise OverrideError(f"{key}: {part!r} is not a key of {where}.{hint} Valid keys there: "
                                f"{', '.join(valid)}")
        node, path = node[part], path + [part]


def config_with_overrides(stored: dict, overrides: list[str] = (), command_keys: tuple[str, ...] = ()):
    """A stored (resolved) training config, typed by the schema, with ``key=value`` overrides applied
    and validated as ``train`` validates: what ``evaluate`` / ``export`` / ``generate`` run with.

    An unknown key fails naming the valid keys at that level (and ``command_keys``, the command's own
    arguments); a value of the wrong type fails naming the key. Keys of the stored config that the
    schema no longer has (an older checkpoint) are kept as they are."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cfg = OmegaConf.structured(Blip2Config)
    OmegaConf.set_struct(cfg, False)
    cfg = OmegaConf.merge(cfg, stored)
    OmegaConf.set_struct(cfg, True)
    overrides = list(overrides)
    for arg in overrides:
        key, sep, _ = arg.partition("=")
        if not sep or not key:
            raise OverrideError(f"overrides are key=value pairs, got {arg!r}")
        _check_override_key(cfg, key, command_keys)
    for arg in overrides:  # one at a time, so that an error names its override
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([arg]))
        except OmegaConfBaseException as err:
            raise OverrideError(f"{arg}: {str(err).splitlines()[0]}") from err
    validate(cfg)
    return cfg


def question_to_qformer(cfg) -> bool:
    """stage.task=vqa with vqa.qformer_text_input: the Q-Former reads the question beside its queries."""
    vqa = cfg.get("vqa") or {}
    return cfg.stage.get("task", "caption") == "vqa" and bool(vqa.get("qformer_text_input", True))
