"""One benchmark run in its own process: `python benchmarks/contenders.py SPEC.json`.

`bench_vs_trl.py` writes the spec (contender, model directory, data files, the batch order, settings)
and reads back `spec["result_path"]`: the step recorder's marks and losses, the reference precompute
time, and this process's peak RSS. A fresh process per run makes peak RSS the run's own and keeps
one contender's caches and allocator state away from the other.

Contenders:
    trl / trl_precompute: TRL's `DPOTrainer` (the second with `precompute_ref_log_probs=True`), fed
        the batches in exactly the order lit_dpo's data module produces (see `OrderedDPOTrainer`).
    lit_dpo: `LitDPOCLI(args=["fit", "--config", ...])` the way a user runs it, plus the recorder
        callback and any `--lit-arg` overrides.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch
import yaml


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class FixedOrderBatchSampler(torch.utils.data.Sampler):
    """Yields the batches of `order[epoch]`; the trainer calls `set_epoch` before each epoch.

    Args:
        order: Per epoch, the list of batches (lists of dataset indices).
    """

    def __init__(self, order: list[list[list[int]]]) -> None:
        self.order = order
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.order[self.epoch])

    def __iter__(self):
        yield from self.order[self.epoch]


def run_trl(spec: dict) -> dict:
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from step_recorders import TrlStepRecorder, reinit_lora
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    order = json.loads(Path(spec["order_path"]).read_text())

    class OrderedDPOTrainer(DPOTrainer):
        """DPOTrainer with lit_dpo's batch order and a timed reference precompute."""

        precompute_seconds = 0.0

        def get_train_dataloader(self):
            dataset = self._remove_unused_columns(self.train_dataset, description="Training")
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=FixedOrderBatchSampler(order), collate_fn=self.data_collator, num_workers=0
            )
            return self.accelerator.prepare(loader)

        def _precompute_ref_logps(self, *args, **kwargs):
            started = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*args, **kwargs)
            finally:
                OrderedDPOTrainer.precompute_seconds += time.perf_counter() - started

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    lora = LoraConfig(
        r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
        target_modules="all-linear", task_type="CAUSAL_LM",
    )  # fmt: skip
    model = get_peft_model(model, lora)
    reinit_lora(model)

    # Standard (string) format with the chat template already applied to the prompt: TRL then tokenizes
    # prompt + answer + EOS, the same ids lit_dpo builds (bench_vs_trl.py checks this for every pair).
    rows = [json.loads(line) for line in Path(spec["train_path"]).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list(
        [{"prompt": chat_prompt(tokenizer, r["prompt"]), "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    )
    args = DPOConfig(
        output_dir=str(Path(spec["run_dir"]) / "trl_out"),
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        num_train_epochs=spec["epochs"],
        learning_rate=spec["learning_rate"],
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=spec["beta"],
        loss_type=["sigmoid"],
        max_length=spec["max_length"],
        precompute_ref_log_probs=spec["contender"] == "trl_precompute",
        gradient_checkpointing=spec["gradient_checkpointing"],
        bf16=False,  # TRL turns bf16 on by default; the benchmark compares fp32 with fp32
        fp16=False,
        use_cpu=True,
        seed=spec["seed"],
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    recorder = TrlStepRecorder()
    trainer = OrderedDPOTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[recorder]
    )
    trainer.train()
    return {**recorder.record, "precompute_seconds": OrderedDPOTrainer.precompute_seconds}


def chat_prompt(tokenizer, prompt: str) -> str:
    """The prompt as one user turn plus the assistant header, as lit_dpo's `use_chat_template` builds it."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)


def lit_config(spec: dict) -> dict:
    """The lit_dpo config a user would write for this run (checkpoints and validation out of the timed part)."""
    run_dir = Path(spec["run_dir"])
    return {
        "seed_everything": spec["seed"],
        "trainer": {
            "max_epochs": spec["epochs"],
            "accumulate_grad_batches": 1,
            "gradient_clip_val": 1.0,  # = TRL's max_grad_norm
            "accelerator": "cpu",
            "devices": 1,
            "precision": "32-true",
            "log_every_n_steps": 1,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 0,  # no validation in the timed part (TRL runs none either)
            "enable_progress_bar": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(run_dir / "tb_logs"), "name": "bench"},
            },
            "callbacks": [{"class_path": "step_recorders.LightningStepRecorder"}],
        },
        "model": {
            "model_name_or_path": spec["model_dir"],
            "loss_type": "sigmoid",
            "beta": spec["beta"],
            "learning_rate": spec["learning_rate"],
            "warmup_steps": 0,
            "weight_decay": 0.0,
            "finetuning": "lora",
            "lora_r": spec["lora_r"],
            "lora_alpha": spec["lora_alpha"],
            "lora_dropout": 0.0,
            "lora_target_modules": "all-linear",
            "dtype": "float32",
            "gradient_checkpointing": spec["gradient_checkpointing"],
        },
        "data": {
            "train_path": spec["train_path"],
            "val_path": spec["val_path"],
            "batch_size": spec["batch_size"],
            "max_length": spec["max_length"],
            "use_chat_template": True,
            "seed": spec["data_seed"],
        },
        # TRL saves nothing during the run (save_strategy="no"); lit_dpo's periodic checkpoints are off too.
        "checkpoint": {"every_n_train_steps": 0, "every_n_epochs": 0, "save_last": False, "save_on_exception": False},
        # No validation runs, so the plateau watcher follows the training loss; best.ckpt off (TRL saves nothing).
        # min_epochs past the end: a plateau stop would end lit_dpo's run before TRL's.
        "plateau": {"monitor": "train/loss_epoch", "save_best": False, "min_epochs": spec["epochs"] + 1},
        # A learning-rate cut by the oscillation watcher would make the curves incomparable; warn only.
        "oscillation": {"action": "warn"},
    }


def run_lit(spec: dict) -> dict:
    from lit_dpo.cli import LitDPOCLI

    config_path = Path(spec["run_dir"]) / "lit_dpo.yaml"
    config_path.write_text(yaml.safe_dump(lit_config(spec), sort_keys=False))
    overrides = [f"--{arg}" for arg in spec["lit_args"]]
    sys.argv = sys.argv[:1]  # the CLI gets its arguments from `args` only
    cli = LitDPOCLI(args=["fit", "--config", str(config_path), *overrides])
    recorders = [c for c in cli.trainer.callbacks if type(c).__name__ == "LightningStepRecorder"]
    return {**recorders[0].record, "precompute_seconds": None}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    torch.set_num_threads(spec["threads"])
    runner = run_lit if spec["contender"] == "lit_dpo" else run_trl
    result = runner(spec)
    if len(result["epoch_ends"]) != spec["epochs"]:
        raise RuntimeError(f"{spec['contender']} stopped after {len(result['epoch_ends'])} of {spec['epochs']} epochs")
    result.update(contender=spec["contender"], peak_rss_bytes=peak_rss_bytes(), torch_threads=torch.get_num_threads())
    Path(spec["result_path"]).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
