"""What a run of each task kind is made of: its split loader, DataModule and LightningModule.

A run's kind is its task's ``kind`` (classification or generation), or seq2seq on an encoder-decoder model
(``src.models.build.task_kind``): the preflight puts it in the task it hands the builders, and a checkpoint
records it (``hyper_parameters["task"]["kind"]``).
"""

from __future__ import annotations

from typing import Any


def task_classes(kind: str) -> tuple[Any, Any, Any]:
    """(split loader, DataModule class, LightningModule class) for a task kind."""
    if kind == "classification":
        from src.data.classification import ClassificationDataModule, load_classification_splits
        from src.modules.classifier import ClassificationModule

        return load_classification_splits, ClassificationDataModule, ClassificationModule
    if kind == "generation":
        from src.data.generation import GenerationDataModule, load_generation_splits
        from src.modules.causal_lm import CausalLMModule

        return load_generation_splits, GenerationDataModule, CausalLMModule
    if kind == "seq2seq":  # an encoder-decoder model on any task, text-to-text
        from src.data.seq2seq import Seq2SeqDataModule, load_seq2seq_splits
        from src.modules.seq2seq import Seq2SeqModule

        return load_seq2seq_splits, Seq2SeqDataModule, Seq2SeqModule
    raise ValueError(f"unknown task kind {kind!r}")
