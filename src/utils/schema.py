"""The types of the run's own settings, ``optim`` and ``trainer``: Hydra structured configs.

``conf/train.yaml`` lists ``run_schema`` first in its defaults, so Hydra composes every run (and
``conf/approx.yaml``, which extends it) onto these dataclasses: a value of the wrong type
(``seed=abc``, ``optim.lr=fast``, ``trainer.max_steps=1.5``) is refused while composing, before
anything runs, and ``src.utils.config.refuse_compose_errors`` shows it in one sentence. The YAML
files keep the defaults; the dataclasses give only the types (``MISSING`` where the YAML sets the
value). What a type cannot say (``optim.lr > 0``, two ``betas``) is checked by
``src.preflight.check_run_settings``. A setting of a few allowed values (``optim.schedule``) is a ``str``
whose comment names the tuple that holds them: OmegaConf 2.3 takes no ``Literal``, and an ``Enum`` would
put enum members instead of strings into the config.

The root is open (its ``struct`` flag is off while composing: the groups without a schema, and
``conf/approx.yaml``'s own keys, merge in); Hydra closes it before the command line's overrides
apply, so a misspelt key is still refused. ``optim`` and ``trainer`` are closed: a trainer option
the YAML does not set is added with ``+trainer.<option>=...`` as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, is_dataclass
from typing import Any, List, Optional, Union, get_args, get_origin, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ValidationError


@dataclass
class OptimConfig:
    """``conf/optim/adamw.yaml``: AdamW and its warm-up schedule (``src.modules.optim``)."""

    lr: float = MISSING
    weight_decay: float = MISSING
    betas: List[float] = MISSING
    eps: float = MISSING
    warmup_ratio: float = MISSING
    schedule: str = MISSING  # one of src.modules.optim.SCHEDULES
    power: float = MISSING


@dataclass
class TrainerConfig:
    """``conf/trainer/*.yaml``: the ``lightning.pytorch.Trainer`` options the project sets.

    ``accelerator`` and ``precision`` may be ``auto`` (``src.utils.hardware`` resolves them);
    ``strategy`` is a name or a strategy's config (``trainer=fsdp``). The defaults of the options
    ``conf/trainer/default.yaml`` leaves out are Lightning's.
    """

    _target_: str = "lightning.pytorch.Trainer"
    default_root_dir: str = MISSING
    max_epochs: Optional[int] = MISSING
    max_steps: int = MISSING
    accelerator: str = MISSING
    devices: Any = MISSING  # an int (-1: all), a list of device ids, or a string Lightning parses
    precision: str = MISSING
    strategy: Any = "auto"
    num_nodes: int = 1
    sync_batchnorm: bool = False
    gradient_clip_val: Optional[float] = MISSING
    log_every_n_steps: int = MISSING
    num_sanity_val_steps: int = MISSING
    deterministic: Optional[Union[bool, str]] = MISSING  # true, false or warn
    limit_train_batches: Optional[Union[int, float]] = MISSING
    limit_val_batches: Optional[Union[int, float]] = MISSING
    limit_test_batches: Optional[Union[int, float]] = MISSING
    val_check_interval: Optional[Union[int, float]] = MISSING
    accumulate_grad_batches: int = MISSING


@dataclass
class ApproxMetricsConfig:
    """``approx_metrics`` in ``conf/train.yaml``: the compressed-vs-original metrics at setup."""

    enabled: bool = MISSING
    probe_size: int = MISSING
    probe_seed: int = MISSING
    chunk_size: int = MISSING
    max_memory_gb: float = MISSING


@dataclass
class FinetuneConfig:
    """``conf/finetune/*.yaml``: which weights train after compression (``full``, or ``lora``: ``src.modules.lora``)."""

    name: str = MISSING  # one of src.modules.base.FINETUNES
    rank: Optional[int] = None
    alpha: Optional[float] = None
    dropout: Optional[float] = None
    target_modules: Optional[List[str]] = None
    experts: Optional[bool] = None


@dataclass
class LmEvalConfig:
    """``lm_eval`` in ``conf/train.yaml`` (and ``conf/evaluate.yaml``): lm-evaluation-harness tasks (``src.evaluation``)."""

    enabled: bool = MISSING
    before: bool = MISSING
    tasks: List[str] = MISSING
    seq_lens: List[int] = MISSING
    limit: Any = MISSING  # null, an int (every task) or {task: int}
    batch_size: int = MISSING


@dataclass
class RunConfig:
    """The root of ``conf/train.yaml``: the run's own settings are typed, the other groups are free-form."""

    seed: int = MISSING
    ckpt_path: Optional[str] = MISSING  # null, last, or a checkpoint file
    train: bool = MISSING
    test: bool = MISSING
    approx_metrics: ApproxMetricsConfig = field(default_factory=ApproxMetricsConfig)
    run_name: str = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)
    # checked by the preflight and their own hooks; ffn_mode's shared options are typed, resolved and checked by
    # src.pipeline.settings.CompressionSettings.from_config (a type here would refuse them before its sentences)
    paths: Any = MISSING
    ffn_mode: Any = MISSING
    model: Any = MISSING
    task: Any = MISSING
    distill: Any = MISSING
    logger: Any = MISSING
    callbacks: Any = MISSING


def register() -> None:
    """Store the schema as ``run_schema`` in Hydra's ConfigStore (``conf/train.yaml`` names it first)."""
    root = OmegaConf.structured(RunConfig)
    OmegaConf.set_struct(root, False)  # open while composing; Hydra closes the root before the overrides
    for closed in (root.optim, root.trainer, root.approx_metrics, root.finetune, root.lm_eval):
        OmegaConf.set_struct(closed, True)
    ConfigStore.instance().store(name="run_schema", node=root)


_KINDS = {int: ("an integer", "integers"), float: ("a number", "numbers"), bool: ("true or false", "booleans"), str: ("a string", "strings")}


def _describe(hint: Any, plural: bool = False) -> str | None:
    """What a type hint allows, in words: ``Optional[float]`` -> ``a number or null``."""
    if get_origin(hint) is Union:
        args = [a for a in get_args(hint) if a is not type(None)]
        words = ["a number"] if set(args) == {int, float} else [w for a in args for w in (["true", "false"] if a is bool else [_describe(a)])]
        if len(args) < len(get_args(hint)):
            words.append("null")
        if None in words:
            return None
        return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
    if get_origin(hint) in (list, List):
        return f"a list of {_describe(get_args(hint)[0], plural=True)}"
    return _KINDS[hint][plural] if hint in _KINDS else None


def _hint(full_key: str) -> Any:
    """The type hint of a setting (``optim.betas[1]``) in ``RunConfig``, or None outside the schema."""
    hint: Any = RunConfig
    for part in re.findall(r"[^.\[\]]+", full_key):
        if is_dataclass(hint):
            hint = get_type_hints(hint).get(part)
        elif get_origin(hint) in (list, List) and part.isdigit():
            hint = get_args(hint)[0]
        else:
            return None
    return hint


def refusal(e: BaseException) -> str | None:
    """One sentence for a value Hydra refused while composing against this schema (the setting, its value,
    what its type allows), or None where ``e`` is not such a refusal."""
    cause = e.__cause__ or e.__context__
    if not isinstance(cause, ValidationError) or not cause.full_key:
        return None
    value = getattr(cause, "value", None)
    shown = "null" if value is None else repr(value) if isinstance(value, str) else str(value)
    allowed = _describe(_hint(cause.full_key))
    where = re.match(r"In '([^']+)'", str(e))
    sentence = f"{cause.full_key}={shown}" + (f" (set in {where[1]})" if where else "")
    if allowed is None:  # outside the schema: OmegaConf's own words, first line
        return f"{sentence}: {str(cause.msg).splitlines()[0]}."
    return f"{sentence} must be {allowed}."
