"""The typed schema of `dcam run` and `dcam synth` configs, and of every model backend's `model` node.

Each key is a dataclass field (omegaconf structured configs); `key(...)` adds what the type cannot
say: a range (ge/gt/le), allowed values (choices), a check function, whether the key changes
results (`hashed`: False for throughput and location knobs, which resume may change freely; see
pipeline/config.py) and a one-line doc (`dcam run --help`). Defaults live in conf/*.yaml, not
here: a key the YAML always sets is MISSING in the schema; optional keys default to None.

Model configs differ per backend: MODEL_SCHEMAS maps `model.backend` to its dataclass. A new
backend adds one dataclass (subclass ModelSchema, declare its own keys) and one line in
MODEL_SCHEMAS; a key that no schema declares is refused with the closest valid key.

Evaluation, benchmark and training commands declare their schema beside their code and pass it
to `load_config(command, overrides, schema=...)`; `SCHEMAS` holds the pipeline's own commands.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

from omegaconf import MISSING

FORMATS = ("auto", "parquet", "webdataset", "img2dataset_parquet", "jsonl", "csv", "coco")
DTYPES = ("auto", "bfloat16", "bf16", "float16", "float32", "fp32")
TARGETS_HELP = "content | all | index:<k>"


def key(default: Any = MISSING, *, doc: str = "", hashed: bool = True, ge: float | None = None,
        gt: float | None = None, le: float | None = None, choices: tuple | None = None,
        check: Callable[[Any], str | None] | None = None, factory: Callable | None = None):
    """A schema field: `default` (MISSING = conf/*.yaml always sets it) plus validation metadata.
    `check(value)` returns None when fine, else what is allowed (the error names the key)."""
    meta = dict(doc=doc, hashed=hashed, ge=ge, gt=gt, le=le, choices=choices, check=check)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def check_targets(v: Any) -> str | None:
    ok = v in ("content", "all") or (isinstance(v, str) and re.fullmatch(r"index:-?\d+", v))
    return None if ok else TARGETS_HELP


def check_threads(v: Any) -> str | None:
    ok = v is None or v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)
    return None if ok else "auto, null or an integer >= 1"


def check_fail_under(v: Any) -> str | None:
    """Metric names and numbers of `report.fail_under` (the same names as `dcam report --fail-under`)."""
    if v is None:
        return None
    from dcam.pipeline.report.gate import GATE_METRICS, parse_thresholds

    try:
        parse_thresholds(str(v))
    except ValueError:
        return f"metric=value pairs separated by commas; metrics: {', '.join(GATE_METRICS)}"
    return None


# -- dcam run ------------------------------------------------------------------------------------
@dataclass
class SynthSection:
    n: int = key(ge=1, doc="scenes synthesised when input is null")
    seed: int = key(doc="seed of the synthesised corpus")
    shard_size: int = key(ge=1, doc="scenes per synthesised shard")
    with_response: bool = key(doc="false: the model answers (an audit of its own answers); true: captions given")


@dataclass
class SourceSection:
    prompt_field: Optional[str] = key(doc="input field holding the prompt (auto = the format's default)")
    response_field: Optional[str] = key(doc="field whose text is explained instead of generating; "
                                                    "null = always generate")
    id_field: Optional[str] = key(doc="field holding the sample id")
    image_field: str = key(doc="field holding image bytes (parquet)")
    explain_field: Optional[str] = key(doc="field naming the words to explain (default: explain)")
    default_prompt: str = key(doc="prompt of rows without one")
    coco_images: Optional[str] = key(doc="COCO: folder/prefix of the images")
    coco_captions: Optional[str] = key(doc="COCO: captions JSON (responses)")
    max_member_bytes: int = key(ge=1, doc="webdataset: largest tar member read")
    batch_rows: int = key(ge=1, hashed=False, doc="parquet rows read per batch")


@dataclass
class DecodeSection:
    max_pixels: int = key(ge=1, doc="decompression-bomb guard")
    max_prompt_chars: int = key(ge=1, doc="longer prompts are error rows")
    max_image_bytes: int = key(ge=1, doc="larger image objects are error rows")
    default_prompt: Optional[str] = key(doc="prompt of rows without one (else source.default_prompt)")


@dataclass
class ProbeSection:
    batch_size: int = key(ge=1, hashed=False, doc="samples per ProbeActor call (lower it after a GPU OOM)")
    targets: str = key(check=check_targets, doc=f"which words to explain: {TARGETS_HELP}")
    per_step: bool = key(doc="also a map for every denoising step")
    rows_per_pass: int = key(ge=1, hashed=False, doc="attribution rows per forward/backward (GPU memory)")
    faithfulness_steps: int = key(ge=0, doc="deletion/insertion curve resolution; 0 disables (4.6x faster)")
    faithfulness_sample: float = key(gt=0, le=1, doc="fraction of explained words with deletion/insertion curves "
                                     "(deterministic per id, word, seed); 1 = every word")
    seed: int = key(doc="probe seed (sampling at temperature > 0)")
    threads: Any = key("auto", check=check_threads, hashed=False, doc="torch threads per actor")


@dataclass
class ActorsSection:
    pool_min: int = key(ge=1, doc="ProbeActors started at least")
    pool_max: int = key(ge=1, doc="ProbeActors at most (one model replica each)")
    num_gpus: float = key(ge=0, doc="GPUs per ProbeActor (1 on GPU clusters)")
    num_cpus: float = key(ge=0, doc="CPUs per ProbeActor")


@dataclass
class RaySection:
    address: Optional[str] = key(doc="existing cluster (else RAY_ADDRESS, else a local one)")
    num_cpus: Optional[int] = key(ge=1, doc="local cluster CPUs")
    num_gpus: Optional[int] = key(ge=0, doc="local cluster GPUs")
    object_store_memory: Optional[int] = key(ge=1, doc="local cluster object store bytes")
    progress_bars: bool = key(doc="Ray Data progress bars")
    temp_dir: Optional[str] = key(doc="local cluster session files")


@dataclass
class SinkSection:
    thumbnails: bool = key(doc="store a thumbnail and mask thumbnail per sample")
    thumbnail_size: int = key(ge=0, doc="thumbnail size in pixels")


@dataclass
class ReportSection:
    enabled: bool = key(doc="write the HTML report at the end of the run")
    fail_under: Optional[str] = key(check=check_fail_under,
                                    doc="e.g. obj_iou=0.30,pointing=0.8: exit 2 when missed")
    max_error_rate: float = key(ge=0, le=1, doc="exit 2 when more input rows than this share are errors")
    grounding_threshold: float = key(ge=-1, le=1, doc="a content word with image_reliance below this was "
                                                      "'given without looking' (README)")


@dataclass
class LeaseSection:
    ttl_s: float = key(gt=0, doc="a lease not renewed for this long may be taken over by another driver")
    heartbeat_s: float = key(gt=0, doc="lease renewal period (at most ttl_s / 2)")


@dataclass
class RunConfig:
    input: Optional[str] = key(hashed=False, doc="shards: path, s3://bucket/prefix/, glob; null = synthesise")
    format: str = key(choices=FORMATS, doc="input format")
    output: str = key(hashed=False, doc="run directory (local or s3://); reruns resume here")
    model: Any = key(doc="conf/model/<name>.yaml, e.g. model=diffusion_gemma model.source=...")
    synth: SynthSection = key(factory=SynthSection)
    storage: Dict[str, Any] = key(factory=dict, hashed=False,
                                  doc="endpoint_url, key, secret, region, ... (else AWS_* variables)")
    source: SourceSection = key(factory=SourceSection)
    decode: DecodeSection = key(factory=DecodeSection)
    probe: ProbeSection = key(factory=ProbeSection)
    methods: Dict[str, Any] = key(factory=dict, doc="name -> preset (actors/methods.py) [+ probe/refine overrides]")
    actors: ActorsSection = key(factory=ActorsSection, hashed=False)
    decode_num_cpus: float = key(gt=0, hashed=False, doc="CPUs per read+decode task")
    score_num_cpus: float = key(gt=0, hashed=False, doc="CPUs per refine+score+write task")
    ray: RaySection = key(factory=RaySection, hashed=False)
    sink: SinkSection = key(factory=SinkSection)
    lease: LeaseSection = key(factory=LeaseSection, hashed=False)
    report: ReportSection = key(factory=ReportSection, hashed=False)
    testing: Dict[str, Any] = key(factory=dict, hashed=False, doc="fault injection for tests only")

    @staticmethod
    def cross_check(cfg) -> str | None:
        """Rules between keys (None when fine)."""
        from dcam.actors.schema import TABLE_SCORES
        from dcam.pipeline.report.gate import parse_thresholds
        from dcam.pipeline.report.grounding import GROUNDING_METRICS

        if cfg.lease.heartbeat_s > cfg.lease.ttl_s / 2:
            return f"lease.heartbeat_s = {cfg.lease.heartbeat_s}: must be at most lease.ttl_s / 2 ({cfg.lease.ttl_s / 2})"
        if cfg.actors.pool_max < cfg.actors.pool_min:
            return f"actors.pool_max = {cfg.actors.pool_max}: must be >= actors.pool_min ({cfg.actors.pool_min})"
        run_metrics = (*TABLE_SCORES, *GROUNDING_METRICS, "error_rate")  # what the run's own summary computes
        needs_report = [k for k in parse_thresholds(cfg.report.fail_under) if k not in run_metrics]
        if needs_report and not cfg.report.enabled:
            return (f"report.fail_under uses {needs_report}, which only the report computes: set report.enabled=true "
                    f"or gate on {', '.join(run_metrics)}")
        return None


# -- dcam synth ----------------------------------------------------------------------------------
@dataclass
class SynthConfig:
    output: str = key(doc="where the shards go (any fsspec URL)")
    n: int = key(ge=1)
    seed: int = key()
    shard_size: int = key(ge=1)
    size: int = key(ge=16, doc="image size in pixels")
    min_objects: int = key(ge=1)
    max_objects: int = key(ge=1)
    clutter: bool = key()
    prompt: str = key()
    with_response: bool = key(doc="write the scene captions as `response` (false: the model answers)")
    storage: Dict[str, Any] = key(factory=dict)

    @staticmethod
    def cross_check(cfg) -> str | None:
        if cfg.max_objects < cfg.min_objects:
            return f"max_objects = {cfg.max_objects}: must be >= min_objects ({cfg.min_objects})"
        return None


# -- model backends --------------------------------------------------------------------------------
@dataclass
class ModelSchema:
    """Keys every backend has."""
    name: str = key(doc="the conf/model/<name>.yaml that was selected")
    backend: str = key(doc="which backend class loads the model")
    source: Optional[str] = key(None, doc="checkpoint: local dir, s3:// prefix, or hub id in the local HF cache")
    cache_dir: Optional[str] = key(None, hashed=False, doc="where remote checkpoints are copied")
    storage_options: Dict[str, Any] = key(factory=dict, hashed=False, doc="fsspec options for `source`")
    device: str = key("auto", hashed=False, doc="auto | cpu | cuda[:k]")
    dtype: str = key("auto", choices=DTYPES)
    trust_remote_code: bool = key(False, doc="never needed by the shipped backends")
    model_id: Optional[str] = key(None, doc="label written to every output row")


@dataclass
class TinyModelSchema(ModelSchema):
    gen_steps: Optional[int] = key(None, ge=1)
    block_length: Optional[int] = key(None, ge=1)
    temperature: float = key(0.0, ge=0)


@dataclass
class DiffusionGemmaModelSchema(ModelSchema):
    hf_cache_dir: Optional[str] = key(None, hashed=False)
    attn_implementation: Optional[str] = key(None, hashed=False, doc="kernel choice: same math")
    tokenizer: str = key("auto", choices=("auto", "byte"))
    use_chat_template: bool = key(True)
    max_soft_tokens: Optional[int] = key(None, ge=1)
    eos_id: Optional[int] = key(None, ge=0)
    gen_steps: Optional[int] = key(None, ge=1)
    t_min: Optional[float] = key(None, ge=0)
    t_max: Optional[float] = key(None, ge=0)
    entropy_bound: Optional[float] = key(None, ge=0)
    stability_threshold: Optional[float] = key(None, ge=0)
    confidence_threshold: Optional[float] = key(None, ge=0, le=1)
    response_len: Optional[int] = key(None, ge=1)
    noise_seed: int = key(0)


@dataclass
class LavidaModelSchema(ModelSchema):
    """LaViDa-LLaDA (conf/model/lavida.yaml, actors/models/lavida.py)."""
    hf_cache_dir: Optional[str] = key(None, hashed=False)
    image_view: str = key(choices=("grid", "base"), doc="grid = the anyres grid; base = the squashed base view")
    response_len: int = key(ge=1, doc="canvas length")
    block_length: Optional[int] = key(ge=1)
    step_ratio: float = key(gt=0, doc="steps = response_len / n_blocks * step_ratio")
    schedule: Optional[str] = key(choices=("shift", "linear"))
    shift: float = key(gt=0)
    temperature: float = key(ge=0)


@dataclass
class LladaVModelSchema(ModelSchema):
    """LLaDA-V (conf/model/llada_v.yaml, actors/models/llada_v.py)."""
    hf_cache_dir: Optional[str] = key(None, hashed=False)
    image_view: str = key(choices=("grid", "base"), doc="grid = the anyres grid; base = the base view")
    response_len: int = key(ge=1, doc="canvas length")
    gen_steps: int = key(ge=1)
    block_length: Optional[int] = key(ge=1)
    temperature: float = key(ge=0)


@dataclass
class MmadaModelSchema(ModelSchema):
    """MMaDA (conf/model/mmada.yaml): MAGVIT-v2 codes + LLaDA-8B, mmu_generate's defaults."""
    vq_source: Optional[str] = key(None, doc="MAGVIT-v2 tokenizer checkpoint (showlab/magvitv2): dir, s3://, hub id")
    hf_cache_dir: Optional[str] = key(None, hashed=False)
    resolution: int = key(ge=16, doc="image side in pixels before MAGVIT-v2 (512 -> 32x32 codes)")
    response_len: int = key(ge=1, doc="canvas length (max_new_tokens)")
    gen_steps: int = key(ge=1)
    block_length: Optional[int] = key(ge=1)
    temperature: float = key(ge=0)


# model.backend -> its schema. A new backend: one dataclass above and one line here.
MODEL_SCHEMAS: dict[str, type] = {
    "tiny": TinyModelSchema,
    "diffusion_gemma": DiffusionGemmaModelSchema,
    "lavida": LavidaModelSchema,
    "llada_v": LladaVModelSchema,
    "mmada": MmadaModelSchema,
}

EXTRA_DOCS = {  # keys inside free-form sections
    "storage.endpoint_url": "S3-compatible endpoint (MinIO, Ceph RGW); else AWS_ENDPOINT_URL",
    "methods.diffusion_cam.preset": "a method: preset of actors/methods.py [+ .probe/.refine overrides]",
}


def doc_of(dotted: str, schema: type = None) -> str:
    """The doc of a dotted key of the run schema ('' when undocumented); `model.*` reads ModelSchema."""
    import dataclasses
    import typing

    if dotted in EXTRA_DOCS:
        return EXTRA_DOCS[dotted]
    t: Any = schema or RunConfig
    parts = dotted.split(".")
    for i, p in enumerate(parts):
        f = next((f for f in dataclasses.fields(t) if f.name == p), None)
        if f is None:
            return ""
        if i == len(parts) - 1:
            return f.metadata.get("doc", "")
        t = ModelSchema if p == "model" else typing.get_type_hints(t).get(p)
        if not dataclasses.is_dataclass(t):
            return ""
    return ""


# The pipeline's own commands; other commands pass their schema to load_config.
SCHEMAS: dict[str, type] = {"run": RunConfig, "synth": SynthConfig}
GROUP_FIELDS = {"model": MODEL_SCHEMAS}  # a field whose schema is chosen by its node's `backend`
