"""Training recipes: YAML files of known keys, ``key=value`` overrides, the resolved config saved with the run."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tiblocal.errors import InputFileError, TiblocalError
from tiblocal.jsonin import is_finite_number, is_number, is_whole

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class LoraSettings:
    r: int = 64
    alpha: int = 128
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    modules_to_save: tuple[str, ...] = ("embed_tokens", "lm_head")
    fused: bool = True  # tiblocal's LoRA function (finetune/fused_lora.py); false: peft's own forward


@dataclass(frozen=True)
class TrainConfig:
    stage: str  # pretrain | sft
    output_dir: str
    base_model: str = "scratch"  # a Hugging Face folder, or "scratch" with model_config
    model_config: dict = field(default_factory=dict)  # LlamaConfig fields for "scratch" (vocab_size: the base's rows)
    tokenizer: str = "bundled"  # a tokenizer.model, its folder, or "bundled"
    extended: bool = True  # the tokenizer adds pieces to the base: resize and initialise new rows
    train_files: tuple[str, ...] = ()
    train_weights: dict = field(default_factory=dict)  # pretrain: {file: weight}; <1 samples its lines, >1 repeats it
    eval_files: tuple[str, ...] = ()
    # pretrain: {file of train_files: fraction}: that share of the file's lines (chosen by a hash of each line, so a
    # line that occurs twice is on one side) is left out of training and is the evaluation text instead of eval_files:
    # a validation set from the training split, for keep_best, where the dev split is what the model is measured on
    holdout: dict = field(default_factory=dict)
    # sft: {plain-text file: N}: N lines of the file (a seeded sample), each an example whose every token is trained,
    # mixed with the instructions, so that tuning keeps what pretraining learned of running text
    replay: dict = field(default_factory=dict)
    template: str = "alpaca"  # sft: the chat template examples are rendered with
    block_size: int = 1024  # pretrain: packed block length; sft: longest example kept
    group_by_length: bool = True  # sft: batches of examples of similar length (less padding)
    batch_size: int = 4  # examples per optimizer step (per process)
    grad_accum: int = 1  # micro-batches each step's examples are split into (micro-batch: batch_size / grad_accum)
    micro_tokens: int | None = None  # sft: micro-batches of at most this many padded tokens instead of grad_accum parts
    max_steps: int = 100
    lr: float = 2e-4
    embed_lr: float | None = None  # learning rate of embed_tokens / lm_head (default: lr)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    scheduler: str = "cosine"  # cosine | constant
    lora: LoraSettings | None = field(default_factory=LoraSettings)  # null: full-parameter training
    dtype: str = "float32"  # float32 | bfloat16: the weights' dtype
    mixed_precision: str = "no"  # no | bf16: autocast the compute to bf16 (fp32 weights stay the master copy)
    gradient_checkpointing: bool = False
    # dropout on the embedding and on each attention and MLP output before it joins the residual stream (GPT-2's
    # resid_pdrop; Llama's config has only attention dropout): a regulariser for text seen many times over
    hidden_dropout: float = 0.0
    compile: bool = False  # torch.compile each decoder layer (fuses norms, rotary, activations, LoRA dropout)
    eval_every: int = 50
    eval_blocks: int = 32
    # the saved model is the one of the evaluation with the lowest eval loss, not the last step's: a run of many
    # passes over a small corpus overfits before it ends (the second bundled model's first run stopped improving at
    # step 3,000 of 4,066)
    keep_best: bool = False
    save_every: int = 50
    log_every: int = 10
    generation: dict = field(default_factory=dict)  # saved in generation_config.json (e.g. the sampling to suggest)
    tensorboard: bool = False  # also write the metrics as tensorboard events (output_dir/tensorboard)
    seed: int = 1234


_STAGES = ("pretrain", "sft")


def _known(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


class _Loader(yaml.SafeLoader):
    """YAML 1.2's booleans, true and false alone: YAML 1.1 also reads yes, no, on and off as booleans, which made
    `mixed_precision=no` (one of that setting's values) the boolean False. And YAML 1.2's floats: YAML 1.1 (PyYAML)
    needs a dot and a signed exponent, so `lr=1e-4` or `lr: 2e-4`, as every paper writes a learning rate, was the
    string '1e-4' and refused."""


_Loader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


def _yaml(text: str, what: str) -> Any:
    """YAML's safe subset (with YAML 1.2's booleans, above), where every way the text fails to give values is one
    error naming ``what``: bad YAML, nesting deeper than the parser's recursion, a number of more than 4,300 digits
    (Python's limit on converting one)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise InputFileError(f"{what} is not valid YAML ({e})") from None
    except RecursionError:
        raise InputFileError(f"{what} nests lists or mappings too deeply to be read") from None
    except ValueError as e:  # int() refused a number past sys.get_int_max_str_digits()
        raise InputFileError(f"{what} holds a number too long to be read ({e})") from None


def read_yaml(path: Path) -> Any:
    """A YAML file's values; a file that is not UTF-8 or not YAML Python can hold is one InputFileError naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputFileError(f"{path} is not UTF-8 text (byte offset {e.start}); save it as UTF-8") from None
    return _yaml(text, str(path))


def _parse_value(text: str, what: str) -> Any:
    return _yaml(text, what) if text != "" else ""


def load_config(path: Path | str, overrides: list[str] = (), *, stage: str | None = None) -> TrainConfig:
    """Read a recipe (a path, or a name in finetune/configs), apply ``key=value`` overrides, check every key."""
    p = Path(path)
    if not p.is_file() and (CONFIG_DIR / f"{path}.yaml").is_file():
        p = CONFIG_DIR / f"{path}.yaml"
    if not p.is_file():
        raise InputFileError(f"{path}: no such recipe; give a YAML file or one of: {', '.join(sorted(x.stem for x in CONFIG_DIR.glob('*.yaml')))}")
    data = read_yaml(p) or {}
    if not isinstance(data, dict):
        raise InputFileError(f"{p}: expected a mapping of settings")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise TiblocalError(f"override {item!r}: expected key=value, e.g. output_dir=runs/test")
        target = data
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {}) if isinstance(target.get(part), dict) or part not in target else target[part]
            if not isinstance(target, dict):
                raise TiblocalError(f"override {item!r}: {part} is not a group of settings")
        shown = item if len(item) <= 80 else item[:60] + "…"  # a line on the terminal, whatever the value's length
        target[parts[-1]] = _parse_value(value, f"override {shown!r}")
    if stage is not None:
        data.setdefault("stage", stage)
        if data["stage"] != stage:
            raise TiblocalError(f"{p} is a {data['stage']} recipe; run it with `tiblocal {data['stage']}`")
    return build_config(data, str(p))


SEED_MAX = 2**32 - 1  # torch.manual_seed takes 64 bits: 10**20 crashed it, and 10**12 would at the first step

# The recipe's schema beyond the dataclass: each setting's kind and least value ("int", 1: a whole number >= 1).
_SCHEMA: dict[str, tuple[str, float | None]] = {
    "stage": ("str", None), "output_dir": ("str", None), "base_model": ("str", None), "tokenizer": ("str", None),
    "template": ("str", None), "scheduler": ("str", None), "dtype": ("str", None), "mixed_precision": ("str", None),
    "extended": ("bool", None), "group_by_length": ("bool", None), "gradient_checkpointing": ("bool", None),
    "compile": ("bool", None), "tensorboard": ("bool", None), "keep_best": ("bool", None),
    "block_size": ("int", 2), "batch_size": ("int", 1), "grad_accum": ("int", None),  # (its range: a rule below)
    "micro_tokens": ("int?", 2),
    "max_steps": ("int", 1), "warmup_steps": ("int", 0), "eval_every": ("int", 1), "eval_blocks": ("int", 1),
    "save_every": ("int", 1), "log_every": ("int", 1), "seed": ("seed", 0),
    "hidden_dropout": ("fraction", None),
    "lr": ("positive", None), "embed_lr": ("positive?", None), "weight_decay": ("number", 0),
    "train_files": ("paths", None), "eval_files": ("paths", None), "model_config": ("dict", None),
}  # train_weights and generation: checked below, with examples
_LORA_SCHEMA: dict[str, tuple[str, float | None]] = {
    "r": ("int", 1), "alpha": ("positive", None), "dropout": ("fraction", None), "targets": ("names", None),
    "modules_to_save": ("names", None), "fused": ("bool", None),
}


def _kind_problem(key: str, value: Any, kind: str, least: float | None) -> str | None:
    """What is wrong with one recipe value, or None."""
    if kind.endswith("?"):
        if value is None:
            return None
        kind = kind[:-1]
    number = is_finite_number(value)  # finite: an integer of 400 digits is no float either
    if kind == "str":
        ok = isinstance(value, str)
        want = "text"
    elif kind == "bool":
        ok, want = isinstance(value, bool), "true or false"
    elif kind == "int":
        ok = is_whole(value) and (least is None or value >= least)
        want = "a whole number" + (f" of at least {least:g}" if least is not None else "")
    elif kind == "seed":  # each step seeds torch with (seed * 1,000,003 + step) * 64 + rank, within its 64 bits
        ok = is_whole(value) and 0 <= value <= SEED_MAX
        want = f"a whole number from 0 to {SEED_MAX}"
    elif kind == "positive":
        ok, want = number and value > 0, "a number above 0"
    elif kind == "number":
        ok = number and (least is None or value >= least)
        want = "a number" + (f" of at least {least:g}" if least is not None else "")
    elif kind == "fraction":
        ok, want = number and 0 <= value < 1, "a number from 0 to below 1"
    elif kind == "paths":
        ok = isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))
        want = "a file or a list of files"
    elif kind == "names":
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        want = "a list of module names"
    else:  # dict
        ok, want = isinstance(value, dict), "a group of settings"
    return None if ok else f"{key} is {value!r}, expected {want}"


def build_config(data: dict, source: str = "config") -> TrainConfig:
    """The recipe's settings, checked: every problem of type and range is listed at once."""
    problems = [p for k, (kind, least) in _SCHEMA.items()
                if k in data and not (data[k] in (None, "") and k in ("stage", "output_dir"))  # "required", below
                and (p := _kind_problem(k, data[k], kind, least))]
    if isinstance(data.get("lora"), dict):
        problems += [p for k, (kind, least) in _LORA_SCHEMA.items()
                     if k in data["lora"] and (p := _kind_problem(f"lora.{k}", data["lora"][k], kind, least))]
    if problems:
        raise TiblocalError(f"{source}: {len(problems)} setting(s) wrong: " + "; ".join(problems))
    known = _known(TrainConfig)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise TiblocalError(f"{source}: unknown settings {', '.join(unknown)}; known: {', '.join(known)}")
    for key in ("stage", "output_dir"):
        if key not in data or data[key] in (None, ""):
            raise TiblocalError(f"{source}: '{key}' is required (e.g. {key}=...)")
    if data["stage"] not in _STAGES:
        raise TiblocalError(f"{source}: stage {data['stage']!r}; expected one of {', '.join(_STAGES)}")
    values = dict(data)
    lora = values.get("lora", {})
    if lora is not None:
        if not isinstance(lora, dict):
            raise TiblocalError(f"{source}: lora must be a group of settings or null (full-parameter training)")
        bad = sorted(set(lora) - set(_known(LoraSettings)))
        if bad:
            raise TiblocalError(f"{source}: unknown lora settings {', '.join(bad)}; known: {', '.join(_known(LoraSettings))}")
        lora = {k: tuple(v) if isinstance(v, list) else v for k, v in lora.items()}
        values["lora"] = LoraSettings(**lora)
    for key in ("train_files", "eval_files"):
        if isinstance(values.get(key), str):
            values[key] = (values[key],)
        elif key in values:
            values[key] = tuple(values[key] or ())
    cfg = TrainConfig(**values)
    if not 1 <= cfg.grad_accum <= cfg.batch_size:
        raise TiblocalError(
            f"{source}: grad_accum {cfg.grad_accum} with batch_size {cfg.batch_size}; each step's batch_size examples are "
            "split into grad_accum micro-batches, so grad_accum must be from 1 to batch_size (e.g. batch_size=32 grad_accum=8 "
            "for micro-batches of 4)"
        )
    if cfg.micro_tokens is not None:
        if cfg.stage != "sft":
            raise TiblocalError(f"{source}: micro_tokens is for sft recipes (examples of many lengths); pretraining blocks "
                                "are all block_size long, split them with grad_accum")
        if cfg.grad_accum != 1:
            raise TiblocalError(f"{source}: micro_tokens and grad_accum {cfg.grad_accum} both split the step; set one "
                                "(e.g. grad_accum=1)")
        if not is_whole(cfg.micro_tokens) or cfg.micro_tokens < cfg.block_size:
            raise TiblocalError(f"{source}: micro_tokens {cfg.micro_tokens!r}; expected a whole number of tokens of at "
                                f"least block_size ({cfg.block_size}), so the longest example fits")
    if not isinstance(cfg.holdout, dict):
        raise TiblocalError(f"{source}: holdout must map files of train_files to fractions, e.g. {{news.txt.xz: 0.02}}")
    if cfg.holdout and cfg.stage != "pretrain":
        raise TiblocalError(f"{source}: holdout is for pretrain recipes (lines of text); an sft recipe evaluates on "
                            "eval_files")
    if cfg.holdout and cfg.eval_files:
        raise TiblocalError(f"{source}: holdout and eval_files both give the evaluation text; set one (e.g. eval_files=[])")
    for f, share in cfg.holdout.items():
        if f not in cfg.train_files:
            raise TiblocalError(f"{source}: holdout names {f}, which is not in train_files; use the same path")
        if not is_number(share) or not 0 < share <= 0.5:
            raise TiblocalError(f"{source}: holdout[{f}] = {share!r}; expected a fraction above 0 and at most 0.5")
    if not isinstance(cfg.replay, dict):
        raise TiblocalError(f"{source}: replay must map plain-text files to numbers of lines, e.g. {{news.txt.xz: 2000}}")
    if cfg.replay and cfg.stage != "sft":
        raise TiblocalError(f"{source}: replay is for sft recipes (running text mixed with the instructions); a pretrain "
                            "recipe trains on its text already")
    for f, n in cfg.replay.items():
        if not is_whole(n) or n < 1:
            raise TiblocalError(f"{source}: replay[{f}] = {n!r}; expected a whole number of lines, at least 1")
    if cfg.keep_best and not (cfg.eval_files or cfg.holdout):
        raise TiblocalError(f"{source}: keep_best keeps the model of the lowest eval loss, and there are no eval_files; "
                            "give eval_files or a holdout, or set keep_best: false")
    if cfg.scheduler not in ("cosine", "constant"):
        raise TiblocalError(f"{source}: scheduler {cfg.scheduler!r}; expected cosine or constant")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise TiblocalError(f"{source}: dtype {cfg.dtype!r}; expected float32 or bfloat16")
    if cfg.mixed_precision not in ("no", "bf16"):
        raise TiblocalError(f"{source}: mixed_precision {cfg.mixed_precision!r}; expected no or bf16")
    if not isinstance(cfg.generation, dict):
        raise TiblocalError(f"{source}: generation must be a group of generation_config.json settings, e.g. {{do_sample: true, temperature: 0.8}}")
    if not isinstance(cfg.train_weights, dict):
        raise TiblocalError(f"{source}: train_weights must map files of train_files to weights, e.g. {{corpus.txt.xz: 0.5}}")
    for f, w in cfg.train_weights.items():
        if f not in cfg.train_files:
            raise TiblocalError(f"{source}: train_weights names {f}, which is not in train_files; use the same path")
        if not is_number(w) or w <= 0:
            raise TiblocalError(f"{source}: train_weights[{f}] = {w!r}; expected a number above 0")
    return cfg


def to_dict(cfg: TrainConfig) -> dict:
    d = dataclasses.asdict(cfg)
    for k, v in list(d.items()):
        if isinstance(v, tuple):
            d[k] = list(v)
    if d["lora"] is not None:
        d["lora"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["lora"].items()}
    return d


def dump(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
