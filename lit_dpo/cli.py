"""`python -m lit_dpo {fit,validate,test,predict}`: LightningCLI with lit_dpo's defaults.

What this adds to plain LightningCLI:
- defaults a user of the guide expects: TensorBoard logs in `tb_logs/`, periodic + last checkpoints
  holding only trainable weights, the guide's watchers (plateau, oscillation, divergence, memory), a
  run summary and a diagnosis (`diagnosis.md`) at the end of fit;
- `--ckpt_path last` finds the newest `last.ckpt` of this run name and continues in that same run
  directory, so the TensorBoard curves of a resumed run stay one curve;
- the tokenizer follows `model.model_name_or_path` (stated once, linked to the data module);
- bad input fails before training with one line naming the key or file; a run directory created by
  a run that failed before its first checkpoint is removed, so nothing half-written looks valid.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from lit_dpo.callbacks import (
    Diagnosis,
    DivergenceGuard,
    MemoryGuard,
    OscillationDetector,
    PlateauEarlyStopping,
    RankingEvaluation,
    RunSummary,
)
from lit_dpo.data import PreferenceDataModule
from lit_dpo.errors import ConfigError
from lit_dpo.module import DPOModule


class LitDPOCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True) -> None:
        super().__init__(
            DPOModule,
            PreferenceDataModule,
            # resumed runs write config.yaml again into their own (existing) run directory
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"default_env": False},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.model_name_or_path", "data.tokenizer_name_or_path")
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # The guide's watchers, on for every run, each configurable under its own key (`--plateau.patience 2`).
        parser.add_lightning_class_args(PlateauEarlyStopping, "plateau")
        parser.add_lightning_class_args(OscillationDetector, "oscillation")
        parser.add_lightning_class_args(DivergenceGuard, "divergence")
        parser.add_lightning_class_args(MemoryGuard, "memory")  # before diagnosis: its OOM finding must exist first
        parser.add_lightning_class_args(RunSummary, "summary")
        parser.add_lightning_class_args(Diagnosis, "diagnosis")
        parser.add_lightning_class_args(RankingEvaluation, "ranking")  # HR@1/NDCG in val; results.json in test
        parser.set_defaults(
            {
                "checkpoint.filename": "step{step:06d}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.every_n_train_steps": 10,
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.save_on_exception": True,
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "tb_logs", "name": "lit_dpo"},
                },
                # the data module's batch sampler shards itself across processes and resumes mid-epoch
                "trainer.use_distributed_sampler": False,
            }
        )

    def _instantiate_trainer(self, config: dict, callbacks: list) -> L.Trainer:
        # A callback the user lists in trainer.callbacks replaces this CLI's default of the same class
        # (two instances of a stateful watcher could not share one checkpoint).
        listed = {type(c) for c in (config.get("callbacks") or [])}
        return super()._instantiate_trainer(config, [c for c in callbacks if type(c) not in listed])

    def before_instantiate_classes(self) -> None:
        # validate/test/predict into an existing run directory must not replace the config of its fit
        if self.subcommand and self.subcommand != "fit":
            self.save_config_kwargs["config_filename"] = f"config_{self.subcommand}.yaml"

    # ------------------------------------------------------------------ run directory handling
    def _run_subcommand(self, subcommand: str) -> None:
        self._resolve_last_checkpoint(subcommand)
        if subcommand != "fit":
            self._log_beside_checkpoint(subcommand)
        self._run_dir_existed = self._run_dir().exists()
        if subcommand in ("fit", "validate", "test", "predict"):
            # Validate and tokenize the data now: a bad file fails before a run directory exists.
            self.datamodule.setup("fit" if subcommand in ("fit", "validate") else subcommand)
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            self._discard_failed_run_dir()
            raise

    def _run_dir(self) -> Path:
        logger = self.trainer.logger
        if isinstance(logger, TensorBoardLogger):
            return Path(logger.root_dir) / f"version_{logger.version}"
        return Path(self.trainer.default_root_dir)

    def _resolve_last_checkpoint(self, subcommand: str) -> None:
        config = self.config_init[subcommand]
        if config.get("ckpt_path") != "last":
            return
        logger = self.trainer.logger
        if not isinstance(logger, TensorBoardLogger):
            return  # Lightning's own "last" lookup applies
        candidates = sorted(Path(logger.root_dir).glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise ConfigError(
                f"--ckpt_path last: no last.ckpt under {logger.root_dir}/version_*/checkpoints; "
                "run without --ckpt_path first, or pass the path of a .ckpt file"
            )
        last = candidates[-1]
        logger._version = int(last.parent.parent.name.removeprefix("version_"))  # continue in the same run dir
        config["ckpt_path"] = str(last)
        rank_zero_info(f"Resuming from {last}")

    def _log_beside_checkpoint(self, subcommand: str) -> None:
        """validate/test/predict of a run's checkpoint log into that run's directory (results.json lands
        beside its training curves), not into a new version_N."""
        ckpt_path = self.config_init[subcommand].get("ckpt_path")
        logger = self.trainer.logger
        if not ckpt_path or not isinstance(logger, TensorBoardLogger):
            return
        ckpt = Path(ckpt_path).expanduser().resolve()
        run_dir = ckpt.parent.parent
        if ckpt.parent.name != "checkpoints" or not run_dir.name.startswith("version_"):
            return  # a checkpoint from elsewhere: a new run directory, as usual
        logger._root_dir, logger._name = str(run_dir.parent.parent), run_dir.parent.name  # save_dir, name
        logger._version = int(run_dir.name.removeprefix("version_"))

    def _discard_failed_run_dir(self) -> None:
        run_dir = self._run_dir()
        if self._run_dir_existed or not run_dir.exists() or any(run_dir.rglob("*.ckpt")):
            return  # a resumable run, or someone else's directory: keep it
        shutil.rmtree(run_dir, ignore_errors=True)


def main(args=None) -> None:
    LitDPOCLI(args=args)
