"""The guide's "Problem: OOM (out of memory)" remedies, with this run's values filled in.

MemoryGuard quotes them when memory runs short or an out-of-memory error ends a step: smaller batch,
less accumulation, shorter sequences, a smaller (or 4-bit) model, without ever suggesting an
effective batch below the guide's floor of 4.
"""

from __future__ import annotations

from typing import Any

import lightning as L

OOM_RULE = "Problem: OOM (out of memory)"
MIN_EFFECTIVE_BATCH = 4  # guide: "Don't go below effective batch size 4 for DPO."


def current_values(trainer: L.Trainer, pl_module: L.LightningModule | None) -> dict[str, Any]:
    """The settings the OOM remedies quote (None where this run's modules do not have them)."""
    data, hp = trainer.datamodule, getattr(pl_module, "hparams", {})
    return {"batch_size": getattr(data, "batch_size", None), "max_length": getattr(data, "max_length", None),
            "max_prompt_length": getattr(data, "max_prompt_length", None),
            "accumulate": trainer.accumulate_grad_batches, "world": trainer.world_size,
            "model": hp.get("model_name_or_path"), "quantization": hp.get("quantization"),
            "gradient_checkpointing": hp.get("gradient_checkpointing")}


def remedies(c: dict[str, Any]) -> list[tuple[str, str]]:
    """The guide's OOM remedies, each as (guide's words, concrete change with current values)."""
    batch, accumulate, world = c.get("batch_size"), c.get("accumulate") or 1, c.get("world") or 1
    out = []
    if batch:
        effective = batch * accumulate * world
        if batch > 1:
            keep = -(-effective // (batch // 2 * world))  # ceil: the effective batch stays as it is
            change = (f"data.batch_size: {batch // 2} (was {batch}); trainer.accumulate_grad_batches: {keep} "
                      f"(was {accumulate}) keeps the effective batch at {batch // 2 * keep * world}")
        else:
            change = "data.batch_size is already 1"
        out.append(("Reduce per_device_train_batch_size", change))
        floor = "(guide: \"Don't go below effective batch size 4 for DPO\")"
        if accumulate // 2 * batch * world >= MIN_EFFECTIVE_BATCH:
            change = (f"trainer.accumulate_grad_batches: {accumulate // 2} (was {accumulate}): effective batch "
                      f"{accumulate // 2 * batch * world}; here each micro-batch frees its activations, so this "
                      "shortens steps more than it saves memory")
        elif effective >= MIN_EFFECTIVE_BATCH:
            change = f"keep trainer.accumulate_grad_batches: {accumulate}: halving it takes the effective batch below 4 {floor}"
        else:  # accumulation costs no activation memory, so raising it to the floor is free
            change = (f"no: the effective batch {effective} is already below 4 {floor}; trainer.accumulate_grad_batches: "
                      f"{-(-MIN_EFFECTIVE_BATCH // (batch * world))} (was {accumulate}) reaches 4 at no memory cost")
        out.append(("Reduce gradient_accumulation_steps", change))
    if c.get("max_length"):
        length, prompt = c["max_length"], c.get("max_prompt_length")
        change = f"data.max_length: {length // 2} (was {length})"
        if prompt and prompt >= length // 2:
            change += f"; data.max_prompt_length: {length // 4} (was {prompt})"
        out.append(("Reduce max_seq_length", change))
    model = [f"model.model_name_or_path: a smaller model than {c['model']}"] if c.get("model") else []
    if c.get("quantization") is None and c.get("model"):
        model.append("model.quantization: nf4 (was null)")
    if c.get("gradient_checkpointing") is False:
        model.append("model.gradient_checkpointing: true (was false)")
    out.append(("Use smaller model or different GPU", "; ".join(model) or "a GPU with more memory"))
    return out


def render_remedies(c: dict[str, Any]) -> str:
    """The remedies as the guide prints them: the problem, then one branch per remedy."""
    lines = remedies(c)
    return f"{OOM_RULE}\n" + "\n".join(f"{'└─' if i == len(lines) - 1 else '├─'} {rule}: {change}"
                                       for i, (rule, change) in enumerate(lines))


def first_remedy(c: dict[str, Any], change_only: bool = False) -> str:
    """The one change to try first: a smaller batch, then activation recomputation, 4-bit, shorter pairs."""
    if (c.get("batch_size") or 1) > 1:
        return remedies(c)[0][1]
    if c.get("gradient_checkpointing") is False:
        return "model.gradient_checkpointing: true (was false)"
    if c.get("quantization") is None and c.get("model"):
        return "model.quantization: nf4 (was null)"
    if c.get("max_length"):
        return next(change for rule, change in remedies(c) if rule == "Reduce max_seq_length")
    return "" if change_only else "a smaller model or a GPU with more memory"
