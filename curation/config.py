"""pipeline.yaml: load, apply --set overrides, validate; all before Ray starts.

    run:                      # optional, how outputs are cut and written
      sources_per_unit: 4     # sources per atomically committed work unit
      shard_target_mb: 256    # a unit's kept clips are split into shard files of about this size
    dedup:                    # optional: near-duplicate removal at the end of the run (curation/dedup/)
      eps: 0.2                # near-duplicates: cosine >= 1 - eps (default per embedding)
    steps:                    # ordered; each step is {stage, name?, args?, ray?}
      - stage: split
        args: {min_duration_s: 2.0}
        ray: {num_cpus: 1}
      - stage: filter
        args: {rules: {motion_score: {min: 2.0}}}

`args` are the stage constructor's keyword arguments, checked against its signature and type
hints, then the constructor itself validates the values. `ray` (actors, num_cpus, num_gpus,
batch_size) is read only by the runners. A step's name defaults to its stage name and must be
unique; overrides address it: `--set split.min_duration_s=3`, `--set split.ray.num_cpus=2`,
`--set filter.rules.motion_score.min=0.5`, `--set run.sources_per_unit=2`, `--set dedup.eps=0.1`
(creates the dedup section when there is none). Values are YAML
scalars and must match the type of the argument. Every error names the offending key.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from curation.schema import NUMERIC_COLUMNS
from stages import SPLITTERS, STAGES
from stages.rules import validate_rules


class ConfigError(ValueError):
    """A bad pipeline config or override; the message names the key."""


@dataclass
class RayOptions:
    # None: the step runs inside the unit tasks; N: a pool of N actors (model loaded once each);
    # "auto": a pool that grows from 1 actor to what the cluster's CPUs (or GPUs) hold while
    # units wait on it; {min: A, max: B}: the same between A and B.
    actors: int | Literal["auto"] | dict[str, int] | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int = 16


@dataclass
class RunOptions:
    sources_per_unit: int = 4
    shard_target_mb: float = 256.0
    store_all_clips: bool = True  # keep every clip's payload in clips/ (refilter can then loosen)
    # Containment (Ray runner). A source gets max(floor, per_video_s * its duration) seconds for
    # split and the steps before the first model step; past that its worker is ended. A source
    # whose worker died or timed out on max_source_attempts attempts becomes one failure row.
    source_timeout_floor_s: float = 300.0
    source_timeout_per_video_s: float = 20.0
    model_timeout_per_row_s: float = 60.0  # a model step's call on an actor: floor + rows * this
    max_source_attempts: int = 2
    # A finished run rewrites its per-unit files into large ones (curation/compact.py); false
    # leaves that to a later `curate compact` (a batch of runs compacted at once).
    compact_at_end: bool = True


# Settings of how a run is executed, not of what it computes: left out of the fingerprint, so a
# run can be resumed with other limits.
EXECUTION_ONLY = ("source_timeout_floor_s", "source_timeout_per_video_s", "model_timeout_per_row_s",
                  "max_source_attempts", "compact_at_end")


@dataclass
class DedupOptions:
    """The `dedup:` section (curation/dedup/): near-duplicate groups over the whole run."""

    # Candidates: clips whose vectors are at cosine >= 1 - eps; null: the embedding's default
    # (0.3 perceptual, 0.1 image_embedding). A candidate pair is a duplicate when the clips'
    # temporal signatures match (stages/signature.py): score >= min_match at a time shift of at
    # most max_shift_s.
    eps: float | None = None
    min_match: float = 0.85
    max_shift_s: float = 2.0
    # image_embedding: the aesthetics stage's CLIP vectors; perceptual: keyframe DCT/colour
    # vectors that need no weights; auto: image_embedding when the run has them, else perceptual.
    embedding: Literal["auto", "image_embedding", "perceptual"] = "auto"
    # The clip kept of a group: passing the other rules first, then the highest value of these
    # columns in turn (missing values last), then the smallest clip_id.
    keep_by: list[str] = field(default_factory=lambda: ["aesthetic_score", "motion_score", "duration_s",
                                                        "height"])
    bucket_size: int = 1000  # k-means buckets of about this many clips; pairs are compared within
    # Memory a dedup pass may hold besides its fixed blocks (about 250 MB), whatever the number of
    # clips: the rest goes to temporary files ($TMPDIR), sorted in partitions of a quarter of it.
    # Lower it if the machine has less; it changes nothing in the results.
    memory_mb: int = 256


def check_dedup(raw: Any) -> DedupOptions | None:
    """The checked `dedup:` section; null (or absent) means no near-duplicate removal."""
    if raw is None:
        return None
    opts = _check_dataclass(DedupOptions, raw, "dedup")
    if opts.eps is not None and not 0.0 < opts.eps < 1.0:
        raise ConfigError(f"dedup.eps: must be strictly between 0 and 1 (cosine >= 1 - eps), got {opts.eps}")
    if not 0.0 < opts.min_match <= 1.0:
        raise ConfigError(f"dedup.min_match: must be in (0, 1] (a temporal match score), got {opts.min_match}")
    if not 0.0 <= opts.max_shift_s <= 30.0:
        raise ConfigError(f"dedup.max_shift_s: must be within 0-30 s, got {opts.max_shift_s}")
    bad = [c for c in opts.keep_by if c not in NUMERIC_COLUMNS]
    if bad:
        raise ConfigError(f"dedup.keep_by: unknown column {bad[0]!r}; allowed: {', '.join(NUMERIC_COLUMNS)}")
    if opts.bucket_size < 2:
        raise ConfigError(f"dedup.bucket_size: must be >= 2, got {opts.bucket_size}")
    if opts.memory_mb < 16:
        raise ConfigError(f"dedup.memory_mb: must be >= 16 (MB held besides fixed blocks), got {opts.memory_mb}")
    return opts


@dataclass
class Step:
    name: str
    stage: str
    args: dict[str, Any]
    ray: RayOptions

    def build(self):
        """A new stage object (cheap: heavy state is loaded by setup())."""
        return STAGES[self.stage](**self.args)


@dataclass
class PipelineConfig:
    steps: list[Step]
    run: RunOptions = field(default_factory=RunOptions)
    dedup: DedupOptions | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {
            "run": dataclasses.asdict(self.run),
            "steps": [{"name": s.name, "stage": s.stage, "args": s.args,
                       "ray": dataclasses.asdict(s.ray)} for s in self.steps],
        }
        if self.dedup is not None:  # absent, not null: configs without it keep their fingerprint
            d["dedup"] = dataclasses.asdict(self.dedup)
        return d

    def fingerprint(self) -> str:
        """Hash of everything that changes results (ray resources excluded)."""
        d = self.to_dict()
        for s in d["steps"]:
            s.pop("ray")
        for key in EXECUTION_ONLY:
            d["run"].pop(key)
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)


# ---- type checking ------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_type(value: Any, tp: Any, key: str) -> Any:
    """Return value (ints widened to float where a float is wanted) or raise ConfigError."""
    if tp is Any or tp is inspect.Parameter.empty:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        errors = []
        for option in args:
            try:
                return check_type(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        options = ", ".join("null" if o is type(None)
                            else " or ".join(map(repr, typing.get_args(o))) if typing.get_origin(o) is typing.Literal
                            else _type_name(o) for o in args)
        raise ConfigError(f"{key}: {value!r} is none of: {options}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; allowed values: {', '.join(map(repr, args))}")
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [check_type(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {check_type(k, kt, key): check_type(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def stage_parameters(stage_cls) -> dict[str, tuple[Any, Any]]:
    """{arg name: (type hint, default)} of a stage constructor."""
    hints = typing.get_type_hints(stage_cls.__init__)
    params = {}
    for name, p in inspect.signature(stage_cls.__init__).parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        params[name] = (hints.get(name, Any), p.default)
    return params


def _check_dataclass(cls, data: Any, key: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown key; allowed: {', '.join(allowed)}")
    values = {k: check_type(v, hints[k], f"{key}.{k}") for k, v in data.items()}
    obj = cls(**values)
    for f in dataclasses.fields(cls):
        v = getattr(obj, f.name)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
            raise ConfigError(f"{key}.{f.name}: must be >= 0, got {v}")
    return obj


def check_actors(actors: Any, key: str) -> None:
    if actors is None or actors == "auto":
        return
    if isinstance(actors, int):
        if actors < 1:
            raise ConfigError(f"{key}: must be >= 1, got {actors}")
        return
    bad = sorted(set(actors) - {"min", "max"})
    if bad or "max" not in actors:
        raise ConfigError(f"{key}: expected {{min: A, max: B}} (min optional), got {actors!r}")
    lo, hi = actors.get("min", 1), actors["max"]
    if not 1 <= lo <= hi:
        raise ConfigError(f"{key}: need 1 <= min <= max, got {actors!r}")


def pool_bounds(actors: int | str | dict[str, int] | None, cluster_cap: int) -> tuple[int, int]:
    """(min, max) actors of a model step's pool; `cluster_cap` is what the cluster holds."""
    if actors is None or actors == "auto":
        return 1, max(1, cluster_cap)
    if isinstance(actors, int):
        return actors, actors
    return actors.get("min", 1), actors["max"]


# ---- loading ------------------------------------------------------------------------------

def parse_config(raw: Any, source: str = "pipeline config") -> PipelineConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with 'steps' (and optional 'run', 'dedup')")
    unknown = sorted(set(raw) - {"steps", "run", "dedup"})
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown top-level key; allowed: steps, run, dedup")
    dedup = check_dedup(raw.get("dedup"))
    run = _check_dataclass(RunOptions, raw.get("run"), "run")
    if run.sources_per_unit < 1:
        raise ConfigError("run.sources_per_unit: must be >= 1")
    for name in ("shard_target_mb", "source_timeout_floor_s", "source_timeout_per_video_s",
                 "model_timeout_per_row_s"):
        if not getattr(run, name) > 0:
            raise ConfigError(f"run.{name}: must be > 0, got {getattr(run, name)}")
    if run.max_source_attempts < 1:
        raise ConfigError(f"run.max_source_attempts: must be >= 1, got {run.max_source_attempts}")
    steps_raw = raw.get("steps")
    if not isinstance(steps_raw, list) or not steps_raw:
        raise ConfigError("steps: expected a non-empty list of {stage, args, ray}")
    steps: list[Step] = []
    for i, item in enumerate(steps_raw):
        where = f"steps[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a mapping {{stage, args, ray}}")
        bad = sorted(set(item) - {"stage", "name", "args", "ray"})
        if bad:
            raise ConfigError(f"{where}.{bad[0]}: unknown key; allowed: stage, name, args, ray")
        stage = item.get("stage")
        if stage not in STAGES:
            raise ConfigError(f"{where}.stage: unknown stage {stage!r}; allowed: {', '.join(STAGES)}")
        name = item.get("name", stage)
        if not isinstance(name, str) or not name or "." in name:
            raise ConfigError(f"{where}.name: must be a non-empty string without dots")
        if any(s.name == name for s in steps):
            raise ConfigError(f"{where}.name: step name {name!r} is used twice; give one a 'name'")
        where = f"{name}"
        args = item.get("args") or {}
        if not isinstance(args, dict):
            raise ConfigError(f"{where}.args: expected a mapping")
        params = stage_parameters(STAGES[stage])
        checked = {}
        for key, value in args.items():
            if key not in params:
                raise ConfigError(f"{where}.{key}: unknown argument of stage {stage!r}; "
                                  f"allowed: {', '.join(params)}")
            checked[key] = check_type(value, params[key][0], f"{where}.{key}")
        ray_opts = _check_dataclass(RayOptions, item.get("ray"), f"{where}.ray")
        if ray_opts.batch_size < 1:
            raise ConfigError(f"{where}.ray.batch_size: must be >= 1")
        check_actors(ray_opts.actors, f"{where}.ray.actors")
        step = Step(name=name, stage=stage, args=checked, ray=ray_opts)
        try:
            step.build()  # the constructor validates values (cheap: no models are loaded)
            if stage == "filter":  # which columns exist is the data contract's, not the stage's
                validate_rules(checked.get("rules") or {}, NUMERIC_COLUMNS)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        steps.append(step)
    if steps[0].stage not in SPLITTERS or any(s.stage in SPLITTERS for s in steps[1:]):
        raise ConfigError("steps: the first step must be the only 'split' step")
    return PipelineConfig(steps=steps, run=run, dedup=dedup)


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `key.path=value` to the raw config mapping (validated afterwards)."""
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. split.min_duration_s=3")
    path, _, text = override.partition("=")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {path}: cannot parse value {text!r}: {exc}") from exc
    parts = path.strip().split(".")
    if len(parts) < 2:
        raise ConfigError(f"--set {path}: expected STEP.ARG, run.KEY or dedup.KEY")
    head, rest = parts[0], parts[1:]
    if head in ("run", "dedup"):
        target = raw.setdefault(head, {}) or {}
        raw[head] = target
    else:
        names = [s.get("name", s.get("stage")) for s in raw.get("steps", []) if isinstance(s, dict)]
        if head not in names:
            raise ConfigError(f"--set {path}: unknown step {head!r}; "
                              f"steps: {', '.join(map(str, names))}, run, dedup")
        step = raw["steps"][names.index(head)]
        if rest[0] == "ray":
            target, rest = step.setdefault("ray", {}) or {}, rest[1:]
            step["ray"] = target
        else:
            target = step.setdefault("args", {}) or {}
            step["args"] = target
    if not rest:
        raise ConfigError(f"--set {path}: missing the argument name")
    for part in rest[:-1]:
        nxt = target.get(part)
        if nxt is None:
            nxt = target[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {path}: {part!r} is not a mapping")
        target = nxt
    target[rest[-1]] = value


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    raw = copy.deepcopy(raw)
    for override in overrides or []:
        if not isinstance(raw, dict):
            break
        apply_override(raw, override)
    return parse_config(raw, str(path))
