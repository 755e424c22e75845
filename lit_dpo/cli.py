"""`python -m lit_dpo {fit,validate,test,predict}`: LightningCLI with lit_dpo's defaults.

What this adds to plain LightningCLI, through its public hooks only (`add_arguments_to_parser`,
`before_instantiate_classes`, `instantiate_trainer`, `before_<subcommand>`):
- defaults a user of the guide expects: TensorBoard logs in `tb_logs/`, periodic + last checkpoints
  holding only trainable weights, the guide's watchers (plateau, oscillation, divergence, memory), a
  run summary and a diagnosis (`diagnosis.md`) at the end of fit, the ranking metrics;
- `--ckpt_path last` finds the newest `last.ckpt` of this run name and continues in that same run
  directory, so the TensorBoard curves of a resumed run stay one curve; validate/test/predict of a run's
  checkpoint log into that run's directory;
- the tokenizer follows `model.model_name_or_path` (stated once, linked to the data module), and the
  data module is connected with what the model decides: the batch layout its attention takes and its
  reference log-probs (`PreferenceDataModule.connect`);
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
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_dpo.callbacks import Diagnosis, DivergenceGuard, MemoryGuard, OscillationDetector, PlateauEarlyStopping, RunSummary
from lit_dpo.data import PreferenceDataModule
from lit_dpo.errors import ConfigError
from lit_dpo.forward import takes_custom_mask
from lit_dpo.module import DPOModule
from lit_dpo.rec.callback import RankingEvaluation
from lit_dpo.reference_cache import ReferenceLogps

# The callbacks this CLI adds, each configurable under its own key (`--plateau.patience 2`).
CALLBACKS = {
    "checkpoint": ModelCheckpoint,
    # the guide's watchers, on for every run
    "plateau": PlateauEarlyStopping,
    "oscillation": OscillationDetector,
    "divergence": DivergenceGuard,
    "memory": MemoryGuard,  # before diagnosis: its OOM finding must exist first
    "summary": RunSummary,
    "diagnosis": Diagnosis,
    "ranking": RankingEvaluation,  # HR@1/NDCG in val; results.json in test
}


class LitDPOCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True) -> None:
        self._run_dir_existed = True  # until a subcommand says otherwise: nothing of ours to clean up
        try:
            super().__init__(
                DPOModule,
                PreferenceDataModule,
                # resumed runs write config.yaml again into their own (existing) run directory
                save_config_kwargs={"overwrite": True},
                parser_kwargs={"default_env": False, "prog": "lit_dpo",
                               "description": "lit_dpo: preference fine-tuning with PyTorch Lightning"},
                args=args,
                run=run,
            )
        except BaseException:
            self._discard_failed_run_dir()
            raise

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.model_name_or_path", "data.tokenizer_name_or_path")
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")
        for key, callback in CALLBACKS.items():  # instantiated here, handed to the trainer in instantiate_trainer
            parser.add_class_arguments(callback, key, fail_untyped=False, sub_configs=True)
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

    def before_instantiate_classes(self) -> None:
        # validate/test/predict into an existing run directory must not replace the config of its fit
        if self.subcommand and self.subcommand != "fit":
            self.save_config_kwargs["config_filename"] = f"config_{self.subcommand}.yaml"

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        # This CLI's callbacks follow the user's `trainer.callbacks`; one the user lists replaces the default
        # of the same class (two instances of a stateful watcher could not share one checkpoint).
        config = self._subcommand_config(self.config_init)
        listed = config["trainer"].get("callbacks") or []
        listed = listed if isinstance(listed, list) else [listed]
        defaults = [config[key] for key in CALLBACKS if type(config[key]) not in {type(c) for c in listed}]
        return super().instantiate_trainer(**{"callbacks": [*listed, *defaults], **kwargs})

    # ------------------------------------------------------------------ before each subcommand
    def before_fit(self) -> None:
        self._prepare_run("fit")

    def before_validate(self) -> None:
        self._prepare_run("validate")

    def before_test(self) -> None:
        self._prepare_run("test")

    def before_predict(self) -> None:
        self._prepare_run("predict")

    def _prepare_run(self, subcommand: str) -> None:
        self._resolve_last_checkpoint(subcommand)
        if subcommand != "fit":
            self._log_beside_checkpoint(subcommand)
        self._run_dir_existed = self._run_dir().exists()
        self._connect_data()
        # Validate and tokenize the data now: a bad file fails before a run directory exists.
        self.datamodule.setup("fit" if subcommand in ("fit", "validate") else subcommand)

    def _connect_data(self) -> None:
        """Tell the data module the layout the model's attention takes and how to get reference log-probs."""
        if not isinstance(self.datamodule, PreferenceDataModule):
            return
        hp = self.model.hparams
        custom_mask = takes_custom_mask(hp.attn_implementation)
        if self.datamodule.prefix_sharing and not custom_mask:
            rank_zero_warn(
                f"attn_implementation '{hp.attn_implementation}' cannot take the shared-prompt layout's custom 4D "
                "mask; scoring with the plain layout instead (set data.prefix_sharing: false, or "
                "model.attn_implementation: sdpa, to silence this)"
            )
        reference = ReferenceLogps(self.model) if hp.precompute_reference else None
        self.datamodule.connect(custom_attention_mask=custom_mask, reference_logps=reference)

    # ------------------------------------------------------------------ run directory handling
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
        self._log_into(logger.save_dir, logger.name, int(last.parent.parent.name.removeprefix("version_")))
        config["ckpt_path"] = str(last)
        rank_zero_info(f"Resuming from {last}")

    def _log_beside_checkpoint(self, subcommand: str) -> None:
        """validate/test/predict of a run's checkpoint log into that run's directory (results.json lands
        beside its training curves), not into a new version_N."""
        ckpt_path = self.config_init[subcommand].get("ckpt_path")
        if not ckpt_path or not isinstance(self.trainer.logger, TensorBoardLogger):
            return
        ckpt = Path(ckpt_path).expanduser().resolve()
        run_dir = ckpt.parent.parent
        if ckpt.parent.name != "checkpoints" or not run_dir.name.startswith("version_"):
            return  # a checkpoint from elsewhere: a new run directory, as usual
        self._log_into(str(run_dir.parent.parent), run_dir.parent.name, int(run_dir.name.removeprefix("version_")))

    def _log_into(self, save_dir: str, name: str, version: int) -> None:
        """Replace the TensorBoard logger by one writing into `save_dir/name/version_<version>`, built from the
        configured logger's own arguments (nothing has been logged yet)."""
        logger = self.trainer.logger
        configured = self._subcommand_config(self.config).get("trainer.logger")
        if isinstance(configured, list):  # several loggers: the first is trainer.logger
            configured = configured[0] if configured else None
        init_args = getattr(configured, "init_args", None)
        init_args = init_args.as_dict() if hasattr(init_args, "as_dict") else {}
        replacement = type(logger)(**{**init_args, "save_dir": save_dir, "name": name, "version": version})
        self.trainer.loggers = [replacement if other is logger else other for other in self.trainer.loggers]

    def _subcommand_config(self, config):
        return config[self.subcommand] if self.subcommand else config

    def _discard_failed_run_dir(self) -> None:
        trainer = getattr(self, "trainer", None)
        if self._run_dir_existed or trainer is None:
            return
        run_dir = self._run_dir()
        if not run_dir.exists() or any(run_dir.rglob("*.ckpt")):
            return  # a resumable run, or someone else's directory: keep it
        shutil.rmtree(run_dir, ignore_errors=True)
