"""Hydra glue shared by the entry points: the config resolvers and schema, the method registry, and
``run_app`` (a refused value in one sentence).

Imported by every entry point before Hydra composes (it registers the resolvers and the schema).
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import hydra._internal.utils as hydra_internal
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

from src.utils import schema

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# ${tag:k,${ffn_mode.mid_dim}} -> "-k384", or "" when the value is null (default width).
OmegaConf.register_new_resolver("tag", lambda prefix, value: "" if value is None else f"-{prefix}{value}", replace=True)
# conf/train.yaml's run_schema: the types of the run's settings, optim and trainer.
schema.register()


# the signals that stop a job: a scheduler's or timeout's SIGTERM, Ctrl-C (src.callbacks.guards.GracefulStop's, for training)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A stop signal, raised where the job is (a BaseException, as KeyboardInterrupt: no ``except Exception`` swallows it)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def refusing(job: Callable[[DictConfig], object], cfg: DictConfig, interrupted: str | None = None) -> None:
    """Run an entry point's job; a ConfigError (a refusal) is logged as its one sentence and ends the process with exit code 2.

    With ``interrupted`` (what a stop leaves, e.g. "the export to <out> stopped: nothing was written there"), SIGTERM and SIGINT raise
    ``Interrupted`` inside the job, so that its cleanup runs (``atomic_dir`` removes its temporary folder), and end the
    process with one line, ``SIGTERM received: <interrupted>.``, and exit code 128 + the signal's number, as ``src.train``
    does; a second signal meanwhile is ignored, so that the cleanup finishes.
    """
    from src.utils.errors import ConfigError

    def stop(signum: int, frame: object) -> None:
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS} if interrupted else {}
    try:
        job(cfg)
    except ConfigError as e:
        logging.getLogger(job.__module__).error("%s", e)
        sys.exit(2)
    except Interrupted as e:
        logging.getLogger(job.__module__).error("%s received: %s.", e, interrupted)
        sys.exit(128 + e.signum)  # as the shell reports a process ended by the signal: a scheduler sees a failure
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_app(main: Callable[[], object]) -> None:
    """Run a ``@hydra.main`` app, where a value of the wrong type for ``src.utils.schema`` (``seed=abc``),
    refused while Hydra composes, ends the process with one sentence on stderr and exit code 2, as the
    preflight's refusals do, instead of Hydra's multi-line report (exit code 1). Nothing has started
    then: there is no run folder and no ``results.json``. Other errors are Hydra's to report.

    Hydra composes inside its ``run_and_report`` (hydra-core is pinned: pyproject.toml), which this
    wraps for the call.
    """
    report = hydra_internal.run_and_report

    def run_and_report(func: Callable[[], object]) -> object:
        def composed() -> object:
            try:
                return func()
            except ConfigCompositionException as e:
                sentence = schema.refusal(e)
                if sentence is None:
                    raise
                sys.stderr.write(sentence + "\n")
                sys.exit(2)

        return report(composed)

    hydra_internal.run_and_report = run_and_report
    try:
        main()
    finally:
        hydra_internal.run_and_report = report


def ffn_modes() -> list[str]:
    """Every compression method: the options of the ``ffn_mode`` config group, the one registry.

    Asks the running Hydra app's config loader (so ``--config-dir`` and ``hydra.searchpath`` add
    methods), or the project's ``conf/`` outside an app. Files starting with ``_`` are shared parts.
    """
    if GlobalHydra.instance().is_initialized():
        loader, kwargs = GlobalHydra.instance().config_loader(), {}
        if HydraConfig.initialized():  # the app's own search path, hydra.searchpath overrides included
            hc = HydraConfig.get()
            kwargs = {"config_name": hc.job.config_name, "overrides": [*hc.overrides.hydra, *hc.overrides.task]}
        options = loader.get_group_options("ffn_mode", **kwargs)
    else:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            options = GlobalHydra.instance().config_loader().get_group_options("ffn_mode")
    return sorted(o for o in options if not o.startswith("_"))
