"""RankingEvaluation: the recommendation metrics of `lit_dpo.rec.scoring` inside `fit` and `test`.

The thesis question is about ranking adherence, which the DPO loss does not show directly: a run can
win preference pairs and still rank the true next movie low among 20 candidates. So whenever the
evaluation data carries `candidates` and `target` (MovieLens from `prepare`, the synthetic default):

- after each validation during `fit`, the candidate-likelihood ranking of up to `val_max_prompts`
  validation prompts (no generation: cheap) is logged as `val/hit@1`, `val/ndcg@5`, `val/mrr`;
- at the end of `test`, the full protocol on the test split (likelihood ranking summed and
  length-normalised, greedy generation with ValidRatio, random and most-popular baselines) is logged
  to TensorBoard under `test/` and written with the pair metrics (preference accuracy, margins) as
  `results.json` + `results.md` beside the run's logs, where `python -m lit_dpo report` reads them.

Prompts are the tokenized ones the pair metrics use (same chat template, same truncation).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from typing_extensions import override

from lit_dpo.callbacks.diagnosis import rank_zero_log_dir
from lit_dpo.rec.results import write_results
from lit_dpo.rec.scoring import evaluate_ranking, ranking_records

VAL_METRICS = ("hit@1", "ndcg@5_sum", "mrr_sum")
# test-loop metrics copied into results.json: the guide's "80-85% accuracy" is preference accuracy
PAIR_METRICS = {
    "test/loss": "pair_loss",
    "test/rewards/accuracies": "preference_accuracy",
    "test/rewards/margins": "reward_margin",
}


class RankingEvaluation(L.Callback):
    """Candidate ranking metrics in validation (cheap) and test (full, written to results.json).

    Args:
        on_validation: Log likelihood-ranking metrics after every validation during fit.
        val_max_prompts: Validation prompts ranked each time (the first N, same ones every time).
        test_max_prompts: Test prompts evaluated; None evaluates all.
        generate: In test, also decode greedily and report ValidRatio and HR@1 of the answers.
        max_new_tokens: Length cap of the greedy answers.
    """

    def __init__(
        self,
        on_validation: bool = True,
        val_max_prompts: int = 64,
        test_max_prompts: int | None = None,
        generate: bool = True,
        max_new_tokens: int = 32,
    ) -> None:
        self.on_validation = on_validation
        self.val_max_prompts = val_max_prompts
        self.test_max_prompts = test_max_prompts
        self.generate = generate
        self.max_new_tokens = max_new_tokens
        self._test_results: dict | None = None

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.on_validation or trainer.sanity_checking or self.val_max_prompts < 1:
            return
        records = _records(trainer, "val", self.val_max_prompts)
        if not records:
            return
        results = _evaluate(trainer, pl_module, records, generate=False)
        for name in VAL_METRICS:
            pl_module.log(f"val/{name.removesuffix('_sum')}", results["metrics"][name], sync_dist=True)

    @override
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._test_results = None
        records = _records(trainer, "test", self.test_max_prompts)
        if not records:
            rank_zero_info("Test data has no `candidates`/`target` columns: ranking metrics skipped.")
            return
        datamodule = trainer.datamodule
        train_targets = datamodule.column_values("train", "target") if hasattr(datamodule, "column_values") else None
        results = _evaluate(
            trainer, pl_module, records, generate=self.generate, max_new_tokens=self.max_new_tokens, train_targets=train_targets
        )
        for name, value in results["metrics"].items():
            pl_module.log(f"test/{name}", value, sync_dist=True)
        self._test_results = results

    @override
    @rank_zero_only
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = rank_zero_log_dir(trainer)  # not trainer.log_dir: a collective, and only process 0 is here
        if self._test_results is None or not log_dir:
            return
        results = self._test_results
        for logged, name in PAIR_METRICS.items():
            if logged in trainer.callback_metrics:
                results["metrics"][name] = float(trainer.callback_metrics[logged])
        run_dir = Path(log_dir)
        hp = pl_module.hparams
        path = write_results(
            results,
            run_dir,
            run=f"{run_dir.parent.name}/{run_dir.name}",
            loss_type=hp.get("loss_type"),
            beta=hp.get("beta"),
            learning_rate=hp.get("learning_rate"),
            epochs=trainer.max_epochs if getattr(pl_module, "checkpoint_epochs", None) is None else pl_module.checkpoint_epochs,
        )
        m = results["metrics"]
        lines = [f"Ranking on {len(results['per_prompt']['prompt_ids'])} test prompts ({results['headline']}):"]
        lines.append(f"  HR@1 {m['hit@1']:.3f}  NDCG@5 {m['ndcg@5_sum']:.3f}  MRR {m['mrr_sum']:.3f}  (random HR@1 {m['random_hr@1']:.3f})")
        if "valid_ratio" in m:
            lines.append(f"  generation: ValidRatio {m['valid_ratio']:.3f}  HR@1 {m['hr@1_all']:.3f} of all, {m['hr@1_valid']:.3f} of valid")
        lines.append(f"  written to {path} and {path.with_name('results.md')}")
        print("\n".join(lines), flush=True)


def _records(trainer: L.Trainer, split: str, limit: int | None) -> list[dict]:
    """The split's recommendation records (none without a data module holding `<split>_dataset`)."""
    records = ranking_records(getattr(trainer.datamodule, f"{split}_dataset", None))
    return records[:limit] if limit is not None else records


def _evaluate(trainer: L.Trainer, pl_module: L.LightningModule, records: list[dict], **kwargs) -> dict:
    """Evaluate this process's share of the records, then gather the per-prompt lists from every process."""
    rank, world = trainer.global_rank, trainer.world_size
    tokenizer = trainer.datamodule.tokenizer
    mine = records[rank::world] if world > 1 else records
    results = evaluate_ranking(pl_module, tokenizer, mine, use_chat_template=False, **kwargs)
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        results = _gather(results, trainer, pl_module, records, kwargs)
    return results


def _gather(local: dict, trainer, pl_module, records, kwargs) -> dict:
    # Means over unequal shards are not the mean over all prompts: gather per-prompt values and
    # recompute on the full list (each process holds every record, so the aggregate is identical).
    gathered: list = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, local["per_prompt"])
    per_prompt: dict[str, list] = {}
    for key in local["per_prompt"]:
        per_prompt[key] = [v for part in gathered for v in part[key]]
    metrics = dict(local["metrics"])
    for key, values in per_prompt.items():
        if key != "prompt_ids" and key in metrics and values:
            metrics[key] = sum(values) / len(values)
    return {**local, "metrics": metrics, "per_prompt": per_prompt}
