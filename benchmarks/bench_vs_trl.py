"""lit_dpo against TRL's DPOTrainer on the same run: same model, data, batches, optimizer and threads.

    PYTHONPATH=$PWD python benchmarks/bench_vs_trl.py --epochs 3 --repeats 2 --out bench_out
    PYTHONPATH=$PWD python benchmarks/bench_vs_trl.py --quick          # CI smoke test, tiny random model

Runs alternate TRL, lit_dpo, TRL, lit_dpo, ... (`--repeats` rounds), each in its own process
(`contenders.py`), and the table reports medians. What is timed, for every contender: from just
before training (model loading and tokenization excluded) to the end of each epoch, with any
reference-log-prob precompute included. See benchmarks/README.md for the fairness rules.

Exits 1 when the step-1 losses of lit_dpo and TRL differ by more than 1e-4, or the first
`--compare-steps` losses by more than `--curve-tol`: fast but different is a bug.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench_report import render_markdown, render_table, summarize  # noqa: E402

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
STEP1_TOLERANCE = 1e-4
# lit_dpo keys the script sets for both contenders: overriding them on one side only would compare different runs.
SHARED_KEYS = {
    "data.batch_size": "--batch-size", "data.seed": "--seed", "seed_everything": "--seed",
    "data.train_path": "--num-pairs", "data.val_path": "--num-pairs", "trainer.max_epochs": "--epochs",
    "model.learning_rate": "--learning-rate", "model.beta": "--beta", "model.model_name_or_path": "--quick",
    "model.gradient_checkpointing": "--gradient-checkpointing", "model.loss_type": "none: sigmoid only",
    "model.lora_r": "none: r=16", "model.lora_alpha": "none: alpha=32", "model.lora_dropout": "none: 0",
    "model.dtype": "none: float32", "trainer.precision": "none: 32-true",
    "trainer.accumulate_grad_batches": "none: 1", "model.warmup_steps": "none: 0",
}  # fmt: skip
VAL_PAIRS = 2  # lit_dpo wants a validation set; one tiny batch, never run (limit_val_batches=0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, help="epochs per run (3; --quick 1); the 1-epoch figure comes from the same runs")
    p.add_argument("--num-pairs", type=int, help="training pairs (64; --quick 8)")
    p.add_argument("--repeats", type=int, help="rounds of TRL, lit_dpo (, TRL precompute) (2; --quick 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every run")
    p.add_argument("--batch-size", type=int, default=2, help="pairs per optimizer step (no accumulation)")
    p.add_argument("--history-len", type=int, help="synthetic viewing history (7; with 7 candidates ~225 prompt tokens; --quick 2)")
    p.add_argument("--num-candidates", type=int, help="synthetic candidates per prompt (7; --quick 2)")
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=42, help="seed_everything / TRL seed and lit_dpo's data.seed")
    p.add_argument("--gradient-checkpointing", action="store_true", help="turn it on for both (off by default)")
    p.add_argument("--trl-precompute", action="store_true", help="add TRL with precompute_ref_log_probs=True")
    p.add_argument("--lit-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="lit_dpo config override, e.g. data.prefix_sharing=false (repeatable)")  # fmt: skip
    p.add_argument("--compare-steps", type=int, default=8, help="steps of the loss curves compared")
    p.add_argument("--curve-tol", type=float, default=1e-3, help="max |loss difference| allowed over those steps")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="results.json, results.md and run dirs")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny random model, 8 pairs, 1 epoch, 1 repeat")
    args = p.parse_args(argv)
    defaults = {"epochs": 3, "num_pairs": 64, "repeats": 2, "history_len": 7, "num_candidates": 7}
    if args.quick:  # smaller everything, short prompts: a smoke test of the script, not a timing
        defaults = {"epochs": 1, "num_pairs": 8, "repeats": 1, "history_len": 2, "num_candidates": 2}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("epochs", "num_pairs", "repeats", "threads", "batch_size", "compare_steps"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    for item in args.lit_arg:
        if "=" not in item or not item.split("=", 1)[0]:
            p.error(f"--lit-arg expects KEY=VALUE (e.g. data.prefix_sharing=false), got {item!r}")
        if item.split("=", 1)[0] in SHARED_KEYS:
            p.error(f"--lit-arg {item}: this setting is shared with TRL; use the script's own option "
                    f"({SHARED_KEYS[item.split('=', 1)[0]]}) so both sides change")  # fmt: skip
    return args


def prepare_model(args: argparse.Namespace, work: Path) -> str:
    """The model both sides load: the embedded SmolLM2 as an HF directory, or a tiny random Llama (--quick)."""
    if not args.quick:
        from lit_dpo.models.sources import resolve_model_path

        return resolve_model_path(EMBEDDED_MODEL)
    from tests.conftest import build_tiny_llama, build_tiny_tokenizer  # the test suite's no-download model

    path = work / "tiny-llama"
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(path)
    build_tiny_llama(len(tokenizer)).save_pretrained(path)
    return str(path)


def prepare_data(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """The project's synthetic pairs as JSONL: `num_pairs` for training, then VAL_PAIRS for validation."""
    from lit_dpo.data.synthetic import generate_pairs
    from lit_dpo.files import write_jsonl

    records = generate_pairs(args.num_pairs + VAL_PAIRS, seed=0, history_len=args.history_len,
                             num_candidates=args.num_candidates)  # fmt: skip
    train = write_jsonl(records[: args.num_pairs], work / "train.jsonl")
    val = write_jsonl(records[args.num_pairs :], work / "val.jsonl")
    return train, val


def token_stats(model_dir: str, train_path: Path) -> dict:
    """Mean prompt/answer lengths, and whether TRL's tokenization gives lit_dpo's ids for every pair.

    TRL tokenizes `prompt + answer + EOS` as one string and splits where it diverges from the prompt;
    lit_dpo tokenizes prompt and answer apart and appends EOS. They agree unless tokens merge across
    the boundary, which would make the comparison unfair, so it is checked rather than assumed.
    """
    from contenders import chat_prompt
    from lit_dpo.data.tokenize import encode_completions, encode_prompts
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in train_path.read_text().splitlines()]
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in rows], chat=True)
    answers = {key: encode_completions(tokenizer, [r[key] for r in rows]) for key in ("chosen", "rejected")}
    mismatched = 0
    for i, row in enumerate(rows):
        text_prompt = chat_prompt(tokenizer, row["prompt"])
        for key in ("chosen", "rejected"):
            joined = tokenizer(text_prompt + row[key] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
            mismatched += joined != prompts[i] + answers[key][i]
    lengths = [len(a) for key in answers for a in answers[key]]
    return {
        "prompt_tokens_mean": statistics.mean(len(p) for p in prompts),
        "answer_tokens_mean": statistics.mean(lengths),
        "answer_tokens_min": min(lengths),
        "answer_tokens_max": max(lengths),
        "tokenization_mismatches": mismatched,
    }


def lit_data_overrides(lit_args: list[str]) -> dict:
    """`data.*` overrides from --lit-arg, as PreferenceDataModule keyword arguments."""
    overrides = {}
    for item in lit_args:
        key, value = item.split("=", 1)
        if key.startswith("data."):
            overrides[key.removeprefix("data.")] = yaml.safe_load(value)
    return overrides


def batch_order(args: argparse.Namespace, model_dir: str, train: Path, val: Path, work: Path) -> Path:
    """The batches lit_dpo's data module yields in each epoch, written for TRL to replay.

    Asked of the data module itself (its train loader's batch sampler, epoch by epoch), so whatever
    ordering lit_dpo uses (seeded shuffle, length grouping, a `--lit-arg data.*` override) TRL sees the
    same batches.
    """
    from lit_dpo.data import PreferenceDataModule

    kwargs = {"train_path": str(train), "val_path": str(val), "tokenizer_name_or_path": model_dir,
              "batch_size": args.batch_size, "seed": args.seed, **lit_data_overrides(args.lit_arg)}  # fmt: skip
    data = PreferenceDataModule(**kwargs)
    data.setup("fit")
    if len(data.train_dataset) != args.num_pairs:
        raise SystemExit(f"lit_dpo kept {len(data.train_dataset)} of {args.num_pairs} pairs; the runs would differ")
    sampler = data.train_dataloader().batch_sampler
    order = []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        order.append([list(batch) for batch in sampler])
    path = work / "batch_order.json"
    path.write_text(json.dumps(order))
    return path


def run_contender(contender: str, repeat: int, base_spec: dict, args: argparse.Namespace) -> dict:
    """One run in a fresh process with its own caches, so nothing computed by an earlier run is reused."""
    run_dir = args.out / "runs" / f"{repeat:02d}-{contender}"
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {**base_spec, "contender": contender, "run_dir": str(run_dir), "result_path": str(run_dir / "result.json")}
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(BENCH_DIR), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "HF_DATASETS_CACHE": str(run_dir / "hf_datasets"),
        "LIT_DPO_CACHE": str(run_dir / "lit_dpo_cache"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TQDM_DISABLE": "1",
    }
    started = time.time()
    with open(run_dir / "log.txt", "w") as log:
        proc = subprocess.run([sys.executable, str(BENCH_DIR / "contenders.py"), str(spec_path)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, cwd=run_dir)  # fmt: skip
    if proc.returncode != 0:
        tail = (run_dir / "log.txt").read_text().splitlines()[-25:]
        raise SystemExit(f"{contender} run {repeat} failed (exit {proc.returncode}); end of {run_dir}/log.txt:\n"
                         + "\n".join(tail))  # fmt: skip
    result = json.loads((run_dir / "result.json").read_text())
    result.update(repeat=repeat, process_seconds=time.time() - started)
    print(f"  {contender:15s} run {repeat}: {timed_seconds(result, args.epochs):7.1f} s timed, "
          f"peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)  # fmt: skip
    return result


def timed_seconds(result: dict, epochs: int) -> float:
    """Seconds from the start of the timed part to the end of epoch `epochs`, precompute included."""
    return result["epoch_ends"][epochs - 1] - result["start"] + (result["precompute_seconds"] or 0.0)


def machine_info(threads: int) -> dict:
    import torch
    import transformers
    import trl

    import lit_dpo

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "lit_dpo": getattr(lit_dpo, "__version__", "dev"),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf_datasets")  # the order pre-pass tokenizes here, not in ~/.cache
    sys.path.insert(0, str(BENCH_DIR))

    model_dir = prepare_model(args, work)
    train, val = prepare_data(args, work)
    stats = token_stats(model_dir, train)
    order_path = batch_order(args, model_dir, train, val, work)
    print(f"data: {args.num_pairs} pairs, prompt {stats['prompt_tokens_mean']:.0f} tokens (mean), answers "
          f"{stats['answer_tokens_min']}-{stats['answer_tokens_max']} tokens; tokenization mismatches TRL vs "
          f"lit_dpo: {stats['tokenization_mismatches']}", flush=True)  # fmt: skip

    base_spec = {"model_dir": model_dir, "train_path": str(train), "val_path": str(val), "order_path": str(order_path),
                 "epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                 "beta": args.beta, "lora_r": 16, "lora_alpha": 32, "max_length": 1024, "seed": args.seed,
                 "data_seed": args.seed, "threads": args.threads, "gradient_checkpointing": args.gradient_checkpointing,
                 "lit_args": args.lit_arg}  # fmt: skip
    contenders = ["trl", "lit_dpo"] + (["trl_precompute"] if args.trl_precompute else [])
    runs = [run_contender(c, r, base_spec, args) for r in range(args.repeats) for c in contenders]

    summary = summarize(runs, contenders, args.epochs, args.num_pairs, args.compare_steps)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results = {"settings": settings, "machine": machine_info(args.threads), "data": stats, "summary": summary,
               "runs": runs}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(render_markdown(results))
    print(render_table(results))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")

    problems = check_agreement(summary, args.curve_tol)
    if stats["tokenization_mismatches"]:
        problems.append(f"{stats['tokenization_mismatches']} answers tokenize differently in TRL and lit_dpo")
    for problem in problems:
        print(f"MISMATCH: {problem}", file=sys.stderr)
    return 1 if problems else 0


def check_agreement(summary: dict, curve_tol: float) -> list[str]:
    """Step-1 loss within STEP1_TOLERANCE of TRL's and the first steps within `curve_tol`, per contender."""
    problems = []
    for name, row in summary["contenders"].items():
        if name == "trl":
            continue
        if row["step1_loss_diff"] is None or row["step1_loss_diff"] > STEP1_TOLERANCE:
            problems.append(f"{name}: step-1 loss differs from TRL's by {row['step1_loss_diff']} (> {STEP1_TOLERANCE})")
        if row["max_loss_diff"] is None or row["max_loss_diff"] > curve_tol:
            problems.append(f"{name}: loss curve differs from TRL's by up to {row['max_loss_diff']} (> {curve_tol})")
    return problems


if __name__ == "__main__":
    sys.exit(main())
