"""A causal language model that learns tasks as instructions and is scored by the answers it generates.

It shares everything but the loss and the scoring with the classifier (:class:`plan.module.AdaptedModule`), so
every method callback and every aggregation rule runs on it unchanged. The data comes as instructions
(:mod:`plan.datamodules.encoding`); the loss is next-token cross-entropy on the response tokens; each task is
scored by greedy generation, by exact match or ROUGE-L as the task's metric says, and the scores fill the same
accuracy matrix as a classifier's accuracies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchmetrics import MeanMetric, Metric

from plan.errors import require
from plan.instructions import response_loss, score_answer
from plan.lora import LoRAConfig
from plan.models import EMBEDDED_SMOLLM, load_causal_lm
from plan.module import AdaptedModule

if TYPE_CHECKING:
    from transformers import GenerationMixin, PreTrainedModel

    class CausalLM(PreTrainedModel, GenerationMixin):
        """What ``load_causal_lm`` returns: a model with ``generate`` and gradient checkpointing."""


PROMPT_SHOWN = 400  # characters of a prompt's end shown beside a generated answer in TensorBoard


class ContinualLM(AdaptedModule):
    """A LoRA-adapted decoder-only language model (any ``AutoModelForCausalLM``: Llama, Qwen2, GPT-2, SmolLM...).

    Args:
        backbone: Hugging Face model name or path, or ``embedded:SmolLM2-135M-Instruct`` (4-bit GGUF weights,
            dequantised; no download).
        backbone_config: build a randomly initialised model from this config instead (``model_type`` plus its
            fields; tests, ablations).
        lora: rank, alpha, dropout and target modules (default: the model type's attention projections, as PEFT
            picks them).
        lr, weight_decay: AdamW settings of the LoRA slots.
        gradient_checkpointing: recompute activations in the backward pass instead of storing them (less memory,
            about a third more compute).
        text_samples: how many (prompt, generated, reference) triples of each task TensorBoard shows per
            evaluation (Text tab).
    """

    default_tokenizer = EMBEDDED_SMOLLM
    generative = True
    peft_task_type = "CAUSAL_LM"  # PeftModel.from_pretrained wraps AutoModelForCausalLM as PeftModelForCausalLM
    backbone: CausalLM

    def __init__(
        self,
        backbone: str = EMBEDDED_SMOLLM,
        backbone_config: dict | None = None,
        lora: LoRAConfig | None = None,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        gradient_checkpointing: bool = False,
        text_samples: int = 3,
    ) -> None:
        require(text_samples >= 0, f"model.text_samples must be >= 0, got {text_samples}")
        super().__init__(load_causal_lm(backbone, backbone_config), lora or LoRAConfig(), lr, weight_decay)
        self.save_hyperparameters()
        if gradient_checkpointing:
            self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.text_samples = text_samples
        self.samples: dict[int, list[tuple[str, str, str]]] = {}

    def task_metric(self, task: int) -> Metric:
        return MeanMetric()

    # -- forward, loss, generation ----------------------------------------------------------------------

    def forward(self, batch: dict[str, Any]) -> Tensor:
        """Next-token logits over the batch's prompt + response tokens."""
        return self.backbone(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits

    def task_loss(self, batch: dict[str, Any]) -> Tensor:
        return response_loss(self(batch), batch["labels"])

    @torch.no_grad()
    def generate_answers(self, batch: dict[str, Any]) -> list[str]:
        """Greedy answers to the batch's left-padded prompts, at most ``max_new_tokens`` tokens each (the task's
        longest reference answer plus a margin), stopped at end-of-sequence."""
        from transformers import GenerationConfig

        tokenizer = self.trainer.datamodule.tokenizer
        config = GenerationConfig(
            max_new_tokens=int(batch["max_new_tokens"]),
            do_sample=False,
            pad_token_id=self.trainer.datamodule.pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        prompts = batch["prompt_ids"]
        output = self.backbone.generate(
            input_ids=prompts, attention_mask=batch["prompt_mask"], generation_config=config
        )
        return tokenizer.batch_decode(output[:, prompts.shape[1] :], skip_special_tokens=True)

    # -- evaluation ---------------------------------------------------------------------------------------

    def _evaluate(self, batch: dict[str, Any], task: int, seen: int) -> None:
        answers = self.generate_answers(batch)
        metric = self.layout.metrics[task] if self.layout.metrics else "exact_match"
        scores = [score_answer(metric, answer, reference) for answer, reference in zip(answers, batch["references"])]
        self.task_metrics[task].update(torch.tensor(scores, dtype=torch.float64, device=self.device))  # type: ignore[operator]
        kept = self.samples.setdefault(task, [])
        if len(kept) < self.text_samples:
            tokenizer = self.trainer.datamodule.tokenizer
            prompts = tokenizer.batch_decode(batch["prompt_ids"], skip_special_tokens=True)
            kept += list(zip(prompts, answers, batch["references"]))[: self.text_samples - len(kept)]

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, list]:
        """The generated answer to each example's instruction, beside the reference answer."""
        return {
            "index": batch["index"].tolist(),
            "label": batch["references"],
            "predicted": self.generate_answers(batch),
        }

    def on_validation_epoch_start(self) -> None:
        self.samples = {}  # not the untrained model's answers, which the forward-transfer baseline produced

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._show_samples("val")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._show_samples("test")

    def _show_samples(self, split: str) -> None:
        """Write each task's kept (prompt, generated, reference) triples to TensorBoard's Text tab, at the step
        of the number of tasks trained, so the tab shows what each task's answers became after every task."""
        samples, self.samples = self.samples, {}
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        for logger in self.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            for task, triples in sorted(samples.items()):
                logger.experiment.add_text(f"{split}_samples/task_{task}", samples_table(triples), self._tasks_seen())


def samples_table(triples: list[tuple[str, str, str]]) -> str:
    """A Markdown table (TensorBoard renders it) of prompts, generated answers and references."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ").strip() or " "

    rows = ["| prompt (end) | generated | reference |", "|---|---|---|"]
    rows += [f"| {cell(p[-PROMPT_SHOWN:])} | {cell(g)} | {cell(r)} |" for p, g, r in triples]
    return "\n".join(rows)
