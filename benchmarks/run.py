"""Benchmark TA-LoRA against PEFT's multi-task and single-task methods; regenerate benchmarks/RESULTS.md.

One command trains and evaluates every method on the packaged task suite with SmolLM2-135M, runs
the TA-LoRA ablations, measures speed and memory side by side, and writes ``RESULTS.md``,
``results.json`` and PNG plots into ``--output-dir`` (default: ``benchmarks/``)::

    python benchmarks/run.py                          # default budget (the time estimate is printed first)
    python benchmarks/run.py --seeds 0 1 2            # mean and spread over three seeds
    python benchmarks/run.py --steps 60 --train-per-task 128 --eval-per-task 64   # a longer run
    python benchmarks/run.py --methods ta-lora lora --skip-speed                  # a partial rerun
    python benchmarks/run.py --skip-quality           # speed and memory only
    python benchmarks/run.py --quick --output-dir /tmp/bench   # every code path in a few minutes (tests)
    python benchmarks/run.py --lr-grid --seeds 0 1 2 --threads 1 --shard 0/2 &   # two processes on 2 cores, each
    python benchmarks/run.py --lr-grid --seeds 0 1 2 --threads 1 --shard 1/2 &   # with its share of the units,
    python benchmarks/run.py --lr-grid --seeds 0 1 2 --skip-quality --skip-speed  # then the report

Quality: unseen data (the source tasks' test subsets after multi-task training) and unseen tasks
(target tasks learned from k examples per label, k in ``--shots``, ``full`` = the whole training
split capped at ``--full-cap`` rows). Every method gets the same rows in the same order and the
same number of steps; see ``benchmarks/methods.py`` for the configs and unseen-task protocols. With
``--lr-grid`` every method trains at each learning rate of a grid of the same size and keeps, per seed, the
one with the lowest validation loss; ``--eval-every N`` (on with the grid) stores validation-loss curves.

Resumable: every (method, seed, setting) result is cached in ``results.json`` together with a
fingerprint of the budget that produced it, and trained multi-task adapters are cached under
``<output-dir>/.cache/``; rerunning skips what is done. Changing a budget flag reruns only what
it affects. Code changes are not detected: after changing a method's implementation, rerun with
``--fresh`` (or a new ``--output-dir``). ``--threads`` sets torch's CPU threads (default 1, see the flag);
``--shard I/N`` lets N processes share one ``--output-dir`` (``results.json`` is written under a file lock).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import methods as M  # noqa: E402
import quality as Q  # noqa: E402
import report as R  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

DEFAULTS = dict(
    tasks=["movie_sentiment", "sms_spam", "trec", "boolq"],
    targets=["drug_sentiment"],
    shots=["4", "16", "32", "full"],
    seeds=[0],
    steps=14,
    warmup_steps=3,
    target_steps=4,
    train_per_task=32,
    eval_per_task=16,
    val_per_task=8,
    target_val_rows=40,
    batch_size=8,
    max_text_tokens=48,
    full_cap=256,
    ablation_shots=[],
    speed_repeats=3,
    gen_batch_size=4,
    gen_new_tokens=32,
    task_batch_seq_len=24,
)
QUICK = dict(
    tasks=["sms_spam", "trec"],
    targets=["pubmedqa"],
    shots=["1"],
    seeds=[0],
    steps=2,
    warmup_steps=1,
    target_steps=1,
    train_per_task=4,
    eval_per_task=4,
    val_per_task=2,
    target_val_rows=2,
    batch_size=4,
    full_cap=4,
    ablation_shots=["1"],
    speed_repeats=2,
    gen_batch_size=2,
    gen_new_tokens=4,
    task_batch_seq_len=8,
)


# ----------------------------------------------------------------------------- bookkeeping
_T0 = time.perf_counter()


def log(message: str) -> None:
    """A progress line with the time since start (``[mm:ss]``)."""
    elapsed = int(time.perf_counter() - _T0)
    print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {message}", flush=True)


def fingerprint(**parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def machine() -> dict:
    info = {
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "datasets", "evaluate", "accelerate", "numpy", "matplotlib"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    import peft_talora

    out["peft_talora"] = getattr(peft_talora, "__version__", None)
    return out


class State:
    """``results.json`` in ``out``, shared safely by processes working on the same output folder (``--shard``).

    The runs, the speed results and the shard records are written key by key (:meth:`put`, :meth:`put_speed`):
    under an exclusive ``fcntl.flock`` on ``results.json.lock`` the file is re-read, the one key merged in and
    the file replaced atomically, so two processes never lose each other's results. Everything else (the
    plan, the summaries the report is rendered from) belongs to the process that writes the report
    (:meth:`save`).
    """

    SHARED = ("runs", "speed", "shards")

    def __init__(self, out: Path):
        self.path = out / "results.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.data.setdefault("runs", {})

    def done(self, key: str, fp: str) -> bool:
        run = self.data["runs"].get(key)
        return run is not None and run.get("fingerprint") == fp and "error" not in run

    def put(self, key: str, record: dict, section: str = "runs") -> None:
        """Store one run (or, with ``section="shards"``, one shard's record)."""
        assert section in self.SHARED and section != "speed"
        self._write(lambda disk: disk.setdefault(section, {}).__setitem__(key, record))

    def put_speed(self, value: Optional[dict]) -> None:
        """Store the speed results (``None``: remove them)."""
        self._write(lambda disk: disk.__setitem__("speed", value) if value is not None else disk.pop("speed", None))

    def refresh(self) -> None:
        """Take the shared entries from the file (what other processes have finished since)."""
        self._write(lambda disk: None, write=False)

    def save(self) -> None:
        """Write this process's entries; the shared ones are taken from the file, never overwritten."""
        self._write(lambda disk: disk.update({k: v for k, v in self.data.items() if k not in self.SHARED}))

    def _write(self, change, write: bool = True) -> None:
        def with_runs(disk: dict) -> None:
            disk.setdefault("runs", {})
            change(disk)

        disk = update_json_locked(self.path, with_runs, write)
        for name in self.SHARED:
            if name in disk:
                self.data[name] = disk[name]
            else:
                self.data.pop(name, None)


def update_json_locked(path: Path, change, write: bool = True) -> dict:
    """``change`` the JSON file ``path`` in place, safe between processes; returns the content it saw (and changed).

    Under an exclusive ``fcntl.flock`` on ``<path>.lock`` the file is re-read (``{}`` if absent), ``change(disk)``
    edits it, and (``write``) it is replaced atomically (:func:`compact_json`): processes that share a file each
    merge their keys into what is on disk, so none loses another's.
    """
    import fcntl

    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        disk = json.loads(path.read_text()) if path.exists() else {}
        change(disk)
        if write:
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            tmp.write_text(compact_json(disk))
            os.replace(tmp, path)
    return disk


_NUMBER_LIST = re.compile(r"\[\n\s*(-?[\d.eE+-]+(?:,\n\s*-?[\d.eE+-]+)*)\n\s*\]")


def compact_json(data) -> str:
    """``json.dumps(indent=1)`` with every list of numbers on one line (per-row predictions stay readable).

    Only real newlines are matched, and JSON strings never hold one, so string values are left alone.
    """
    text = json.dumps(data, indent=1, default=float)
    return _NUMBER_LIST.sub(lambda m: "[" + re.sub(r",\n\s*", ", ", m.group(1)) + "]", text)


# ----------------------------------------------------------------------------- the plan
def learning_rate(args, key: str) -> float:
    """``--lr``: a plain value sets every method; ``METHOD=VALUE`` one method (``ta-lora=`` also its ablations,
    except the learning-rate variants, which keep their own unless named exactly)."""
    everyone = exact = family = None
    for entry in args.lr or []:
        if "=" not in entry:
            everyone = float(entry)
            continue
        name, value = entry.split("=", 1)
        if name == key:
            exact = float(value)
        elif name == key.split("/")[0]:
            family = float(value)
    for value in (exact, M.ALL[key].ablation.get("lr"), family, everyone):  # a learning-rate variant keeps its own
        if value is not None:
            return value
    return M.DEFAULT_LR[M.ALL[key].family]


lowest_loss = R.lowest_loss  # the one choice rule of every grid, shared with the report


def is_variant(key: str) -> bool:
    """Whether ``key`` is a TA-LoRA ablation or hyperparameter variant (``ta-lora/...``)."""
    return key in M.ABLATIONS or key in M.HYPERPARAMETERS


def lr_grid(args, key: str) -> list[float]:
    """The learning rates ``key`` trains at: with ``--lr-grid`` its family's grid, or its own of the same size from
    ``--method-lr-grid`` (a learning-rate variant keeps its one value; with ``--ablation-lr`` every other variant
    trains at that one value: an ablation changes one thing, and TA-LoRA's chosen learning rate is held), else
    the one of :func:`learning_rate`."""
    if not args.lr_grid:
        return [learning_rate(args, key)]
    if "lr" in M.ALL[key].ablation:
        return [M.ALL[key].ablation["lr"]]
    if args.ablation_lr is not None and is_variant(key):
        return [args.ablation_lr]
    if key in args.method_lr_grid:
        return list(args.method_lr_grid[key])
    return list(args.prompt_lr_grid if M.ALL[key].family == "prompt" else args.lora_lr_grid)


def target_lr_grid(args, key: str) -> list[float]:
    """``--target-lr-grid``: the learning rates ``key``'s unseen tasks train at: its multi-task grid
    (:func:`lr_grid`), or its own of the same size from ``--method-target-lr-grid`` (a new task may want other
    rates than the multi-task stage: MPT chose the top of 1e-3..1e-1 for every target, PT the bottom for one)."""
    return list(args.method_target_lr_grid.get(key) or lr_grid(args, key))


def choice_seeds(args, seed: int) -> list[int]:
    """The seeds whose validation losses choose ``seed``'s learning rate: ``seed`` itself, or with
    ``--lr-grid-seeds`` those seeds (the mean loss over them; every seed then trains at that one choice)."""
    return list(args.lr_grid_seeds) if args.lr_grid_seeds else [seed]


def choice_keys(args, key: str, seed: int) -> dict:
    """``{lr: [run keys]}``: the multi-task grid runs whose validation losses choose ``seed``'s learning rate."""
    return {lr: [lr_key(key, s, lr) for s in choice_seeds(args, seed)] for lr in lr_grid(args, key)}


def target_choice_keys(args, key: str, seed: int, target: str, shot: str) -> dict:
    """``{lr: [run keys]}``: the ``--target-lr-grid`` runs whose validation losses choose ``target``'s learning
    rate for ``seed``."""
    return {
        lr: [target_lr_key(key, s, target, shot, lr) for s in choice_seeds(args, seed)]
        for lr in target_lr_grid(args, key)
    }


def grid_seeds(args) -> list[int]:
    """The seeds that train the whole learning-rate grid (all of them unless ``--lr-grid-seeds``)."""
    return list(args.lr_grid_seeds) if args.lr_grid_seeds else list(args.seeds)


def validating(args) -> bool:
    """Whether multi-task training computes the validation loss (the learning-rate grid needs it, curves too)."""
    return args.lr_grid or args.eval_every > 0


def model_id(args) -> str:
    return "tiny-random-llama" if args.tiny else "SmolLM2-135M-Instruct"


def source_fp(args, key: str, seed: int, lr: Optional[float] = None) -> str:
    """The multi-task adapter of ``key`` trained with ``seed`` at ``lr`` (default: :func:`learning_rate`)."""
    validation = {"validation": [args.val_per_task, args.eval_every]} if validating(args) else {}
    return fingerprint(
        model=model_id(args),
        key=key,
        seed=seed,
        tasks=args.tasks,
        per_task=args.train_per_task,
        steps=args.steps,
        warmup=args.warmup_steps if M.uses_warmup(key) else 0,
        batch=args.batch_size,
        lr=learning_rate(args, key) if lr is None else lr,
        max_text_tokens=args.max_text_tokens,
        version=2,
        **validation,  # absent without validation: the fingerprints of earlier results stay valid
    )


def lr_key(key: str, seed: int, lr: float) -> str:
    return f"{key}|seed{seed}|lr={lr:g}"


def trained_fp(args, key: str, seed: int) -> str:
    """The multi-task adapter unseen data and tasks use: :func:`source_fp`, or with ``--lr-grid`` the one chosen
    from the grid runs of :func:`choice_seeds`."""
    if not args.lr_grid:
        return source_fp(args, key, seed)
    choice = [source_fp(args, key, s, lr) for s in choice_seeds(args, seed) for lr in lr_grid(args, key)]
    return fingerprint(grid=choice)  # with one choice seed, as before --lr-grid-seeds existed


def target_lr_key(key: str, seed: int, target: str, shot: str, lr: float) -> str:
    return f"{key}|seed{seed}|{target}|k={shot}|lr={lr:g}"


def target_lr_fp(args, key: str, seed: int, target: str, shot: str, lr: float) -> str:
    """``--target-lr-grid``: ``target`` trained from ``key``'s adapter of ``seed`` at ``lr``, scored by its
    validation loss on ``--target-val-rows`` rows of the target's validation split."""
    return fingerprint(
        src=trained_fp(args, key, seed),
        target=target,
        shot=shot,
        steps=args.target_steps,
        batch=args.batch_size,
        cap=args.full_cap if shot == "full" else None,
        lr=lr,
        validation=args.target_val_rows,
    )


def shots_for(args, key: str) -> list[str]:
    return list(args.ablation_shots) if is_variant(key) else list(args.shots)


def plan(args, keys: list[str]) -> dict:
    """Every run of ``keys`` under this budget: ``{run key: fingerprint}``.

    With ``--lr-grid`` every learning rate of a method and seed is a run of its own (``METHOD|seedS|lr=LR``), and
    the evaluations depend on the whole grid (the learning rate is chosen from it)."""
    runs = {}
    for task in [*args.tasks, *args.targets]:
        runs[f"zero-shot|{task}"] = fingerprint(
            model=model_id(args), task=task, eval=args.eval_per_task, max_text_tokens=args.max_text_tokens
        )
    for seed in args.seeds:
        for key in keys:
            src = trained_fp(args, key, seed)
            if args.lr_grid and seed in grid_seeds(args):
                runs.update({lr_key(key, seed, lr): source_fp(args, key, seed, lr) for lr in lr_grid(args, key)})
            runs[f"{key}|seed{seed}|unseen_data"] = fingerprint(src=src, eval=args.eval_per_task)
            for target in args.targets:
                for shot in shots_for(args, key):
                    target_grid = {}  # absent without --target-lr-grid: the fingerprints of earlier results stay valid
                    if args.target_lr_grid:
                        if seed in grid_seeds(args):
                            for lr in target_lr_grid(args, key):
                                runs[target_lr_key(key, seed, target, shot, lr)] = target_lr_fp(
                                    args, key, seed, target, shot, lr
                                )
                        choice = [
                            target_lr_fp(args, key, s, target, shot, lr)
                            for s in choice_seeds(args, seed)
                            for lr in target_lr_grid(args, key)
                        ]
                        target_grid = {"target_grid": fingerprint(grid=choice)}
                    runs[f"{key}|seed{seed}|{target}|k={shot}"] = fingerprint(
                        src=src,
                        target=target,
                        shot=shot,
                        steps=args.target_steps,
                        batch=args.batch_size,
                        cap=args.full_cap if shot == "full" else None,
                        eval=args.eval_per_task,
                        **target_grid,
                    )
    return runs


def units(args, keys: list[str]) -> list[tuple[int, str]]:
    """This process's (seed, method) work units: all of them, or with ``--shard I/N`` the I-th share of the ordered
    list (the same in every process given the same flags). A unit is the method's learning-rate grid (on a grid
    seed), choice and evaluations for the seed. The grid seeds come first: with ``--lr-grid-seeds`` another seed's
    unit needs their grids, and waits only if another shard is still on them. Each unit in turn goes to the share
    with the least work so far, counted in trainings (a grid's size, else one, plus one for the evaluations): with
    equal units that is every N-th from the I-th."""
    first = grid_seeds(args) if args.lr_grid else []
    ordered = [*first, *(seed for seed in args.seeds if seed not in first)]
    index, count = args.shard
    loads, share = [0] * count, []
    for seed in ordered:
        for key in keys:
            trainings = len(lr_grid(args, key)) if args.lr_grid and seed in first else 1
            lightest = loads.index(min(loads))
            loads[lightest] += trainings + 1
            if lightest == index:
                share.append((seed, key))
    return share


def mine(args, keys: list[str], run_key: str) -> bool:
    """Whether ``run_key`` is this process's work (zero-shot runs are shard 0's)."""
    if run_key.startswith("zero-shot|"):
        return args.shard[0] == 0
    key, seed = run_key.split("|")[:2]
    return (int(seed.removeprefix("seed")), key) in units(args, keys)


# ----------------------------------------------------------------------------- time estimate
def calibrate(base, tokenizer, args) -> dict:
    """Seconds of a training step (the faster of two: the first pays one-time costs), a forward, a short generate
    and, per task, a test row of rank classification (one batch each: a task's label words set its passes), on
    this machine, now."""
    rows = Q.source_stream(args.tasks, tokenizer, 2, 0, args.batch_size, args.max_text_tokens)
    data = Q.tokenize_for_causal_lm(rows, tokenizer, task_names=list(args.tasks))
    batch = Q.MultiTaskDataCollator(tokenizer=tokenizer, task_names=list(args.tasks))(
        [data[i] for i in range(len(data))]
    )
    device = next(base.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    model = M.build("ta-lora", base, args.tasks, 0, M.tokenizer_path())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    with torch.no_grad():
        model.eval()
        model(**batch)  # warm-up
        start = time.perf_counter()
        model(**batch)
        forward = time.perf_counter() - start
    model.train()
    steps = []
    for _ in range(2):
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        steps.append(time.perf_counter() - start)
    model.eval()
    prompt = tokenizer(["Hello"] * args.gen_batch_size, return_tensors="pt").to(device)
    start = time.perf_counter()
    with torch.no_grad():
        base.generate(
            **prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    gen_token = (time.perf_counter() - start) / 4
    del model
    tests = {t: Q.test_rows(t, Q.EVAL_BATCH_SIZE) for t in [*args.tasks, *args.targets]}
    evaluated = Q.evaluate(base, tokenizer, tests, lambda name: None, args.max_text_tokens)
    return {
        "train_step_s": min(steps),
        "forward_s": forward,
        "generate_token_s": gen_token,
        "tokens_per_row": float(batch["input_ids"].shape[1]),
        "eval_row_s": {t: r["seconds"] / r["n"] for t, r in evaluated.items()},
    }


def validation_evals(args) -> int:
    """Evaluations of the validation rows in one multi-task training: before the first step, every
    ``--eval-every`` steps and after the last; the last only for a learning-rate grid without curves."""
    if args.eval_every > 0:
        return 1 + args.steps // args.eval_every + (args.steps % args.eval_every != 0)
    return 1 if args.lr_grid else 0


def estimate(args, keys, todo: dict, tokenizer, cal: dict, speed: Optional[bool] = None) -> float:
    """Seconds the work in ``todo`` (and the speed runs, default: unless ``--skip-speed``) should take on one
    process, from the calibration (a shared machine can be 2x off)."""
    overhead = 0.3 if args.tiny else 2.0  # model copy, Trainer set-up, tokenisation per run
    eval_batch = cal["forward_s"] * Q.EVAL_BATCH_SIZE / args.batch_size
    row_s = dict(cal.get("eval_row_s") or {})  # measured per task; else a forward per batch and label pass
    for task in [*args.tasks, *args.targets]:
        if task not in row_s:
            row_s[task] = Q.eval_passes(task, tokenizer) * eval_batch / Q.EVAL_BATCH_SIZE

    def evaluation(tasks) -> float:
        return sum(row_s[t] for t in tasks) * args.eval_per_task

    validation = validation_evals(args) * math.ceil(len(args.tasks) * args.val_per_task / Q.EVAL_BATCH_SIZE)
    training = args.steps * cal["train_step_s"] + overhead + validation * eval_batch
    seconds = 0.0
    trained = set()
    for run in todo:
        if run.startswith("zero-shot|"):
            seconds += evaluation([run.split("|")[1]])
            continue
        key, seed, setting = run.split("|", 2)
        if setting.startswith("lr="):  # one multi-task training of the grid
            seconds += training
            continue
        own_grid = args.lr_grid and int(seed.removeprefix("seed")) in grid_seeds(args)
        if not own_grid and (key, seed) not in trained:
            trained.add((key, seed))
            seconds += training
        target_training = args.target_steps * cal["train_step_s"] + overhead
        if setting == "unseen_data":
            seconds += evaluation(args.tasks)
        elif "|lr=" in setting:  # one target training of --target-lr-grid, scored on the validation rows
            seconds += target_training + math.ceil(args.target_val_rows / Q.EVAL_BATCH_SIZE) * eval_batch
        else:  # on a grid seed with --target-lr-grid the chosen training is the grid's, loaded from the cache
            reuse = args.target_lr_grid and own_grid
            seconds += (0 if reuse else target_training) + evaluation([setting.split("|")[0]])
    if (not args.skip_speed) if speed is None else speed:
        r = args.speed_repeats
        seconds += 3 * ((1 + r) * cal["train_step_s"] + 2 * cal["forward_s"]) + 3 * overhead
        scale = 64 * args.task_batch_seq_len / (args.batch_size * cal["tokens_per_row"])
        seconds += 2 * ((1 + r) * cal["train_step_s"] + 2 * cal["forward_s"]) * scale
        seconds += 3 * (1 + r) * args.gen_new_tokens * cal["generate_token_s"] * max(1.0, args.gen_batch_size / 4)
    return seconds


# ----------------------------------------------------------------------------- quality
class GridPending(Exception):
    """A learning-rate choice needs grid runs that another shard has not finished yet (``keys``)."""

    def __init__(self, keys: list[str]):
        super().__init__(", ".join(keys))
        self.keys = keys


class Quality:
    def __init__(self, args, state: State, base, tokenizer, keys, runs: dict):
        self.args, self.state, self.base, self.tokenizer, self.keys, self.runs = (
            args,
            state,
            base,
            tokenizer,
            keys,
            runs,
        )
        self.tok_path = M.tokenizer_path()
        self.cache = Path(args.output_dir) / ".cache"
        self.tests = {t: Q.test_rows(t, args.eval_per_task) for t in [*args.tasks, *args.targets]}
        self.validation = (
            Q.validation_data(args.tasks, tokenizer, args.val_per_task, args.max_text_tokens)
            if validating(args)
            else None
        )

    def todo(self, key: str) -> bool:
        return not self.state.done(key, self.runs[key])

    def zero_shot(self) -> None:
        for task in [*self.args.tasks, *self.args.targets]:
            key = f"zero-shot|{task}"
            if not self.todo(key):
                continue
            log(f"[zero-shot] base model on {task}")
            result = Q.evaluate(
                self.base, self.tokenizer, {task: self.tests[task]}, lambda name: None, self.args.max_text_tokens
            )
            self.state.put(key, {"fingerprint": self.runs[key], "tasks": result})

    def trained(self, key: str, seed: int, lr: float):
        """The multi-task model of ``key`` and ``seed`` at ``lr``: from the adapter cache, else trained now."""
        args = self.args
        fp = source_fp(args, key, seed, lr)
        path = self.cache / "adapters" / f"{key.replace('/', '_')}-seed{seed}-{fp}.pt"
        model = M.build(key, self.base, args.tasks, seed, self.tok_path)
        if path.exists():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            M.load_state(model, saved["state"])
            log(f"[{key} seed {seed} lr {lr:g}] multi-task adapter loaded from the cache")
            return model, saved["train"], saved["state"]
        rows = Q.source_stream(
            args.tasks, self.tokenizer, args.train_per_task, seed, args.steps * args.batch_size, args.max_text_tokens
        )
        route = M.ALL[key].routes is not None
        common = dict(
            task_list=list(args.tasks),
            route=route,
            batch_size=args.batch_size,
            lr=lr,
            seed=seed,
            folder=self.cache / "trainer",
            fast_lr_ratio=M.fast_lr_ratio(key),
            validation=self.validation,
            eval_every=args.eval_every,
        )
        info = {"lr": lr}
        warm = min(args.warmup_steps, args.steps - 1) if M.uses_warmup(key) else 0
        curves = args.eval_every > 0  # else the validation loss after the last step only
        if M.paper_warmup(key):
            warm = len(args.tasks) * args.warmup_steps
            if warm >= args.steps:
                raise ValueError(
                    f"{key}: the paper's warm-up takes {args.warmup_steps} steps per source task ({warm} in all), "
                    f"leaving none of --steps {args.steps} for multi-task training; give more --steps"
                )
            log(f"[{key} seed {seed} lr {lr:g}] paper warm-up: {args.warmup_steps} steps on each source task alone")
            info["warmup"] = self.paper_warmup(model, rows, common, curves)
        elif warm > 0:
            log(f"[{key} seed {seed} lr {lr:g}] shared warm-up: {warm} steps")
            model.set_training_stage("shared_warmup")
            info["warmup"] = Q.train(
                model,
                rows.select(range(warm * args.batch_size)),
                self.tokenizer,
                steps=warm,
                **{**common, "validation": self.validation if curves else None},
                eval_start=True,
            )
            model.set_training_stage("multi_task")
        steps = args.steps - warm
        log(f"[{key} seed {seed} lr {lr:g}] multi-task training: {steps} steps on {len(args.tasks)} tasks")
        # the paper's warm-up has no curve points of the whole adapter: its multi-task part evaluates at its start
        paper_start = M.paper_warmup(key) and curves
        info["multi_task"] = Q.train(
            model,
            rows.select(range(warm * args.batch_size, len(rows))),
            self.tokenizer,
            steps=steps,
            **common,
            step_offset=warm,
            eval_start=curves and (warm == 0 or paper_start),
        )
        if self.validation is not None:  # one curve over the whole budget, warm-up included
            info["curve"] = [*info.get("warmup", {}).pop("curve", []), *info["multi_task"].pop("curve")]
            info["validation_loss"] = info["curve"][-1][1]
        path.parent.mkdir(parents=True, exist_ok=True)
        state = M.trainable_state(model)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"state": state, "train": info}, tmp)
        os.replace(tmp, path)  # an interruption never leaves half an adapter in the cache
        return model, info, state

    def run_grid(self, key: str, seed: int) -> None:
        """Train ``key`` with ``seed`` at every learning rate of its grid, each a resumable run of its own that
        records the validation loss after the last step (none if the training diverged)."""
        for lr in lr_grid(self.args, key):
            run_key = lr_key(key, seed, lr)
            if not self.todo(run_key):
                continue
            started = time.perf_counter()
            record = {"fingerprint": self.runs[run_key], "lr": lr}
            try:
                model, info, _ = self.trained(key, seed, lr)
                del model
            except FloatingPointError as error:  # TA-LoRA refuses a non-finite penalty: this lr diverged
                info = {"diverged": str(error)}
            loss = info.get("validation_loss")
            finite = loss is not None and math.isfinite(loss)
            train = {k: v for k, v in info.items() if k != "curve"}
            record.update(validation_loss=loss if finite else None, curve=info.get("curve"), train=train)
            if not finite:
                record["diverged"] = info.get("diverged", f"validation loss {loss}")
            record["seconds"] = round(time.perf_counter() - started, 1)
            self.state.put(run_key, record)
            gc.collect()

    def paper_warmup(self, model, rows, common: dict, curves: bool) -> dict:
        """The paper's warm-up: from the same start, the shared prompt and gates (the ``shared_warmup`` stage's
        parameters) train ``--warmup-steps`` steps on each source task's own rows (its first ones in the stream);
        multi-task training starts from their mean. The tasks' steps count against the budget. With curves, the
        validation loss before any training is the curve's first point."""
        args = self.args
        model.set_training_stage("shared_warmup")
        shared = {name: p for name, p in model.named_parameters() if p.requires_grad}
        start = {name: p.detach().clone() for name, p in shared.items()}
        total = {name: torch.zeros_like(p) for name, p in start.items()}
        names = list(rows["task_ids"])
        runs = []
        for i, task in enumerate(args.tasks):
            mine = [row for row, name in enumerate(names) if name == task]
            need = args.warmup_steps * args.batch_size
            if not mine:
                raise ValueError(f"the training stream has no row of {task}")
            picked = [mine[j % len(mine)] for j in range(need)]
            with torch.no_grad():
                for name, p in shared.items():
                    p.copy_(start[name])
            first = curves and i == 0  # the untrained adapter's loss, step 0 of the budget
            run = Q.train(
                model,
                rows.select(picked),
                self.tokenizer,
                steps=args.warmup_steps,
                **{**common, "validation": self.validation if first else None, "eval_every": 0},
                eval_start=first,
            )
            runs.append({"task": task, **run})
            with torch.no_grad():
                for name, p in shared.items():
                    total[name] += p
        with torch.no_grad():
            for name, p in shared.items():
                p.copy_(total[name] / len(args.tasks))
        model.set_training_stage("multi_task")
        curve = runs[0].pop("curve", [])[:1]  # after the first task's steps it is one task's prompt: not kept
        return {"per_task": runs, "steps": len(args.tasks) * args.warmup_steps, **({"curve": curve} if curves else {})}

    def choose_lr(self, key: str, seed: int) -> tuple[float, dict]:
        """``--lr-grid``: the learning rate of ``key`` for ``seed`` and the validation losses it was chosen by
        (``{lr: loss}``, the mean over :func:`choice_seeds`; ``None`` where a seed diverged): the lowest (ties:
        the first in the grid). A grid seed trains its own grid first. Raises :class:`GridPending` while another
        shard is still training a choice seed's grid."""
        if seed in grid_seeds(self.args):
            self.run_grid(key, seed)
        seeds = choice_seeds(self.args, seed)
        losses = self.mean_losses(choice_keys(self.args, key, seed))
        chosen = lowest_loss(losses)
        if chosen is None:
            raise RuntimeError(f"{key} seed {seed}: every learning rate of the grid diverged: {list(losses)}")
        on = "" if seeds == [seed] else f" (mean over seeds {seeds})" if len(seeds) > 1 else f" (on seed {seeds[0]})"
        log(f"[{key} seed {seed}] learning rate {chosen:g} chosen on validation{on}: {fmt_losses(losses)}")
        return chosen, losses

    def method_seed(self, key: str, seed: int) -> None:
        args = self.args
        data_key = f"{key}|seed{seed}|unseen_data"
        target_keys = [(t, s, f"{key}|seed{seed}|{t}|k={s}") for t in args.targets for s in shots_for(args, key)]
        own_grid = args.lr_grid and seed in grid_seeds(args)
        grid_keys = [lr_key(key, seed, lr) for lr in lr_grid(args, key)] if own_grid else []
        target_grids = [k for t, shot, _ in target_keys for k in self.target_grid_keys(key, seed, t, shot)]
        if not any(self.todo(k) for k in [*grid_keys, data_key, *(k for _, _, k in target_keys), *target_grids]):
            return
        started = time.perf_counter()
        chosen = {}
        if args.lr_grid:
            lr, losses = self.choose_lr(key, seed)
            chosen = {"lr": lr, "lr_grid": {f"{x:g}": loss for x, loss in losses.items()}}
            if choice_seeds(args, seed) != [seed]:
                chosen["lr_chosen_on_seeds"] = choice_seeds(args, seed)
        else:
            lr = learning_rate(args, key)
        if not self.todo(data_key) and not any(self.todo(k) for k in [*(k for _, _, k in target_keys), *target_grids]):
            return
        model, info, adapter = self.trained(key, seed, lr)
        if self.todo(data_key):
            log(f"[{key} seed {seed}] unseen data: {len(args.tasks)} source tasks")
            tests = {t: self.tests[t] for t in args.tasks}
            result = Q.evaluate(
                model, self.tokenizer, tests, lambda name: M.eval_task_id(key, name, args.tasks), args.max_text_tokens
            )
            self.state.put(
                data_key,
                {
                    "fingerprint": self.runs[data_key],
                    "tasks": result,
                    "average": Q.average(result),
                    "train": info,
                    **chosen,
                    "seconds": round(time.perf_counter() - started, 1),
                },
            )
        del model
        gc.collect()
        for target, shot, run_key in target_keys:
            grid = self.target_grid_keys(key, seed, target, shot)
            if not self.todo(run_key) and not any(self.todo(k) for k in grid):
                continue
            started = time.perf_counter()
            try:
                pool = Q.target_pool(target, shot, seed, args.full_cap)
            except ValueError as error:  # too few examples of a label for this k
                for skipped in [run_key, *grid]:
                    self.state.put(skipped, {"fingerprint": self.runs[skipped], "skipped": str(error)})
                continue
            target_lr, chosen_target = lr, {}
            if args.target_lr_grid:
                if grid:
                    self.run_target_grid(key, seed, adapter, target, shot, pool)
                target_lr, losses = self.choose_target_lr(key, seed, target, shot)
                chosen_target = {"target_lr": target_lr, "target_lr_grid": {f"{x:g}": v for x, v in losses.items()}}
            if not self.todo(run_key):
                continue
            log(f"[{key} seed {seed}] unseen task {target}, k={shot}")
            tuned, task_list, train_info = self.tuned(key, seed, adapter, target, shot, pool, target_lr)
            trainable = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
            result = Q.evaluate(
                tuned,
                self.tokenizer,
                {target: self.tests[target]},
                lambda name, task_list=task_list: M.eval_task_id(key, name, task_list),
                args.max_text_tokens,
            )
            self.state.put(
                run_key,
                {
                    "fingerprint": self.runs[run_key],
                    "tasks": result,
                    "average": Q.average(result),
                    "train": train_info,
                    "trainable_parameters": trainable,
                    "pool_size": len(pool),
                    **({"lr": lr} if args.lr_grid else {}),
                    **chosen_target,
                    "seconds": round(time.perf_counter() - started, 1),
                },
            )
            del tuned
            gc.collect()

    def target_grid_keys(self, key: str, seed: int, target: str, shot: str) -> list[str]:
        """The ``--target-lr-grid`` runs ``seed`` trains for ``target`` (none on a seed outside the grid seeds)."""
        if not (self.args.target_lr_grid and seed in grid_seeds(self.args)):
            return []
        return [target_lr_key(key, seed, target, shot, lr) for lr in target_lr_grid(self.args, key)]

    def tuned(self, key: str, seed: int, adapter: dict, target: str, shot: str, pool, lr: float, validate=False):
        """``(model, task_list, train info)``: ``key``'s model of ``seed`` trained on ``target``'s ``pool`` at
        ``lr`` (the method's unseen-task protocol, :func:`methods.for_target`). A training of the target grid is
        loaded from its cache instead (the same training: validation leaves the random stream as it was);
        ``validate`` adds the validation loss after the last step on the target's validation rows."""
        args = self.args
        tuned, task_list = M.for_target(
            key, adapter, self.base, args.tasks, target, seed, self.tok_path, self.cache / "scratch"
        )
        validation = None
        if validate:  # the same rows for every method; their task ids index the list this method routes by
            validation = Q.validation_data(
                [target], self.tokenizer, args.target_val_rows, args.max_text_tokens, task_names=task_list
            )
        path = self.target_cache(key, seed, target, shot, lr)
        if path is not None and path.exists() and not validate:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            M.load_state(tuned, saved["state"])
            return tuned, task_list, saved["train"]
        rows = Q.stream(
            Q.format_rows(pool, self.tokenizer, args.max_text_tokens, task=target),
            args.target_steps * args.batch_size,
            seed,
        )
        info = Q.train(
            tuned,
            rows,
            self.tokenizer,
            task_list=task_list,
            route=M.ALL[key].routes is not None,
            steps=args.target_steps,
            batch_size=args.batch_size,
            lr=lr,
            seed=seed,
            folder=self.cache / "trainer",
            fast_lr_ratio=M.fast_lr_ratio(key),
            validation=validation,
        )
        if path is not None and validate:
            info["validation_loss"] = info["curve"][-1][1]
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({"state": M.trainable_state(tuned), "train": info}, tmp)
            os.replace(tmp, path)
        return tuned, task_list, info

    def target_cache(self, key: str, seed: int, target: str, shot: str, lr: float) -> Optional[Path]:
        """Where a ``--target-lr-grid`` training keeps its weights (``None``: not a grid training)."""
        run_key = target_lr_key(key, seed, target, shot, lr)
        if run_key not in self.runs:
            return None
        name = f"{key.replace('/', '_')}-seed{seed}-{target}-k{shot}-lr{lr:g}-{self.runs[run_key]}.pt"
        return self.cache / "targets" / name

    def run_target_grid(self, key: str, seed: int, adapter: dict, target: str, shot: str, pool) -> None:
        """``--target-lr-grid``: train ``target`` at every learning rate of ``key``'s grid, each a resumable run
        that records the validation loss after the last step on the target's validation rows."""
        for lr in target_lr_grid(self.args, key):
            run_key = target_lr_key(key, seed, target, shot, lr)
            if not self.todo(run_key):
                continue
            started = time.perf_counter()
            log(f"[{key} seed {seed} lr {lr:g}] unseen task {target}, k={shot}: learning-rate grid")
            try:
                tuned, _, info = self.tuned(key, seed, adapter, target, shot, pool, lr, validate=True)
                del tuned
            except FloatingPointError as error:
                info = {"diverged": str(error)}
            loss = info.get("validation_loss")
            finite = loss is not None and math.isfinite(loss)
            record = {"fingerprint": self.runs[run_key], "lr": lr, "validation_loss": loss if finite else None}
            record["train"] = {k: v for k, v in info.items() if k != "curve"}
            if not finite:
                record["diverged"] = info.get("diverged", f"validation loss {loss}")
            record["seconds"] = round(time.perf_counter() - started, 1)
            self.state.put(run_key, record)
            gc.collect()

    def mean_losses(self, keys_by_lr: dict) -> dict:
        """``{lr: mean validation loss of its runs}`` (``None`` where one diverged) of ``{lr: [run keys]}``.
        Raises :class:`GridPending` while another shard is still training one of them."""
        losses = {}
        for lr, keys in keys_by_lr.items():
            pending = [k for k in keys if self.todo(k)]
            if pending:
                raise GridPending(pending)
            values = [self.state.data["runs"][k]["validation_loss"] for k in keys]
            losses[lr] = None if None in values else sum(values) / len(values)
        return losses

    def choose_target_lr(self, key: str, seed: int, target: str, shot: str) -> tuple[float, dict]:
        """``--target-lr-grid``: the learning rate ``target`` trains at for ``seed``, the lowest validation loss
        (mean over :func:`choice_seeds`, ties: the first in the grid) and every loss. Raises :class:`GridPending`
        while another shard is still training a choice seed's target grid."""
        losses = self.mean_losses(target_choice_keys(self.args, key, seed, target, shot))
        chosen = lowest_loss(losses)
        if chosen is None:
            raise RuntimeError(f"{key} seed {seed} {target}: every learning rate of the target grid diverged")
        log(
            f"[{key} seed {seed}] {target}, k={shot}: learning rate {chosen:g} chosen on validation: {fmt_losses(losses)}"
        )
        return chosen, losses

    def run(self) -> None:
        """This process's share of the work (everything without ``--shard``)."""
        if self.args.shard[0] == 0:
            self.zero_shot()
        queue, waiting = list(units(self.args, self.keys)), set()
        while queue:
            seed, key = queue.pop(0)
            try:
                self.method_seed(key, seed)
            except GridPending as pending:  # another shard is training a choice seed's grid: its other units first
                if (seed, key) not in waiting:
                    log(f"[{key} seed {seed}] waiting for another shard's runs: {', '.join(pending.keys)}")
                    waiting.add((seed, key))
                if all(unit in waiting for unit in queue):
                    time.sleep(30)
                self.state.refresh()
                queue.append((seed, key))
            except Exception as error:  # noqa: BLE001 - one broken method must not lose the others' hours
                if self.args.strict:
                    raise
                import traceback

                traceback.print_exc()
                self.state.put(
                    f"{key}|seed{seed}|unseen_data",
                    {"fingerprint": self.runs[f"{key}|seed{seed}|unseen_data"], "error": repr(error)},
                )


def fmt_losses(losses: dict) -> str:
    return ", ".join(f"{lr:g}: {'diverged' if v is None else f'{v:.4f}'}" for lr, v in losses.items())


# ----------------------------------------------------------------------------- speed
def run_speed(args, base, tokenizer) -> dict:
    import speed as S

    rows = Q.source_stream(args.tasks, tokenizer, 2, 0, args.batch_size, args.max_text_tokens)
    data = Q.tokenize_for_causal_lm(rows, tokenizer, task_names=list(args.tasks))
    batch = Q.MultiTaskDataCollator(tokenizer=tokenizer, task_names=list(args.tasks))(
        [data[i] for i in range(len(data))]
    )
    task_ids = batch.pop("task_ids")
    r = args.speed_repeats
    out = {"repeats": r, "machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    log(f"[speed] training step: TA-LoRA vs LoRA vs AdaptionPrompt, batch {list(batch['input_ids'].shape)}")
    out["train_step"] = S.training_steps(base, batch, task_ids, len(args.tasks), r)
    gc.collect()
    log(f"[speed] generation: TA-LoRA vs base, batch {args.gen_batch_size}, {args.gen_new_tokens} new tokens")
    out["generation"] = S.generation_speed(base, tokenizer, args.gen_batch_size, args.gen_new_tokens, r)
    gc.collect()
    log(f"[speed] TA-LoRA step, batch of {S.NUM_TASKS_BIG} distinct tasks vs one task")
    out["task_batch"] = S.task_batch(base, tokenizer, args.task_batch_seq_len, r)
    gc.collect()
    return out


# ----------------------------------------------------------------------------- main
def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--quick", action="store_true", help="tiny random model, 2 tasks, 1 target, 1 seed, 1-2 steps (the test suite)")
    add(
        "--output-dir", default=str(HERE), help="where RESULTS.md, results.json and the plots go (default: benchmarks/)"
    )
    add(
        "--methods",
        nargs="+",
        default=[*M.METHODS, *M.ABLATIONS],
        metavar="METHOD",
        help=f"methods and ablations to run (default: all): {', '.join(M.ALL)}",
    )
    add("--tasks", nargs="+", help=f"source tasks (default: {' '.join(DEFAULTS['tasks'])})")
    add("--targets", nargs="*", help=f"unseen target tasks (default: {' '.join(DEFAULTS['targets'])})")
    add("--shots", nargs="*", help="k examples per label for unseen tasks, or 'full' (default: 4 16 32 full)")
    add("--ablation-shots", nargs="*", help="unseen-task shots for the ablations too (default: none)")
    add(
        "--full-cap",
        type=int,
        help=f"rows of a target's training split used as 'full' (default {DEFAULTS['full_cap']}; 0: all)",
    )
    add("--seeds", nargs="+", type=int, help="training seeds (default: 0; e.g. --seeds 0 1 2 for mean and spread)")
    add(
        "--steps",
        type=int,
        help=f"multi-task training steps per method, TA-LoRA's warm-up included (default {DEFAULTS['steps']})",
    )
    add(
        "--warmup-steps",
        type=int,
        help=f"TA-LoRA shared warm-up steps within --steps (default {DEFAULTS['warmup_steps']})",
    )
    add("--target-steps", type=int, help=f"training steps per unseen task and k (default {DEFAULTS['target_steps']})")
    add("--train-per-task", type=int, help=f"training examples per source task (default {DEFAULTS['train_per_task']})")
    add("--eval-per-task", type=int, help=f"test examples per task (default {DEFAULTS['eval_per_task']})")
    add("--batch-size", type=int, help=f"training batch size (default {DEFAULTS['batch_size']})")
    add("--max-text-tokens", type=int, help=f"input text truncation, tokens (default {DEFAULTS['max_text_tokens']})")
    add(
        "--lr",
        nargs="+",
        metavar="LR|METHOD=LR",
        help="learning rate for all methods, or per method (lora=2e-3); "
        "default 1e-2 for prompt methods (TA-LoRA, PT, MPT, AdaptionPrompt), 1e-3 for LoRA, Poly, MTL-LoRA",
    )
    add(
        "--lr-grid",
        action="store_true",
        help="train every method at each learning rate of its family's grid and keep, per method and seed, the one "
        "with the lowest validation loss (the same grid size for every method); unseen data and tasks use that one",
    )
    add(
        "--lr-grid-seeds",
        nargs="+",
        type=int,
        metavar="SEED",
        help="with --lr-grid: only these seeds train the whole grid, and every seed trains at the learning rate "
        "with the lowest mean validation loss over them (default: every seed chooses its own)",
    )
    add(
        "--prompt-lr-grid",
        nargs="+",
        type=float,
        default=[3e-3, 1e-2, 3e-2],
        metavar="LR",
        help="the grid of TA-LoRA (and its ablations), PT, MPT, AdaptionPrompt (default: 3e-3 1e-2 3e-2)",
    )
    add(
        "--lora-lr-grid",
        nargs="+",
        type=float,
        default=[3e-4, 1e-3, 3e-3],
        metavar="LR",
        help="the grid of LoRA, Poly, MTL-LoRA (default: 3e-4 1e-3 3e-3)",
    )
    add(
        "--method-lr-grid",
        nargs="+",
        default=[],
        metavar="METHOD=LR,LR,...",
        help="with --lr-grid: one method's own grid instead of its family's, with as many values (e.g. "
        "pt=3e-3,1e-2,3e-2,1e-1,3e-1 for a method whose choice sat at the family grid's top edge)",
    )
    add(
        "--method-target-lr-grid",
        nargs="+",
        default=[],
        metavar="METHOD=LR,LR,...",
        help="with --target-lr-grid: one method's own grid for its unseen tasks, with as many values (default: "
        "the method's multi-task grid)",
    )
    add(
        "--ablation-lr",
        type=float,
        metavar="LR",
        help="with --lr-grid: the TA-LoRA ablations and variants train at this one learning rate (give TA-LoRA's "
        "chosen one) instead of the whole grid, so each changes one thing and costs one training per seed",
    )
    add(
        "--target-lr-grid",
        action="store_true",
        help="with --lr-grid: also train every unseen task at each learning rate of its method's grid and keep the "
        "one with the lowest validation loss on the task's own validation rows (on --lr-grid-seeds if given); "
        "by default an unseen task trains at the learning rate its method's multi-task adapter was chosen at",
    )
    add(
        "--target-val-rows",
        type=int,
        help=f"validation rows per unseen task for --target-lr-grid (default {DEFAULTS['target_val_rows']})",
    )
    add(
        "--val-per-task",
        type=int,
        help=f"validation rows per source task for the validation loss (default {DEFAULTS['val_per_task']})",
    )
    add(
        "--eval-every",
        type=int,
        help="validation loss every N steps of multi-task training, stored as a curve (default: off, with "
        "--lr-grid every steps/4 steps; 0: off). Each costs about a training step per 12 validation rows",
    )
    add(
        "--shard",
        default="0/1",
        metavar="I/N",
        help="run only the I-th of N shares of the (method, seed) units (zero-shot and speed: shard 0), for N "
        "processes on one --output-dir; then write the report with a run without --shard and with "
        "--skip-quality --skip-speed",
    )
    add(
        "--speed-repeats", type=int, help=f"interleaved repeats per speed variant (default {DEFAULTS['speed_repeats']})"
    )
    add("--gen-batch-size", type=int, help=f"generation batch (default {DEFAULTS['gen_batch_size']})")
    add("--gen-new-tokens", type=int, help=f"generated tokens per call (default {DEFAULTS['gen_new_tokens']})")
    add(
        "--task-batch-seq-len",
        type=int,
        help=f"sequence length of the 64-task batch (default {DEFAULTS['task_batch_seq_len']})",
    )
    add(
        "--skip-quality", action="store_true", help="no training/evaluation (cached quality results are still reported)"
    )
    add("--skip-speed", action="store_true", help="no speed/memory runs (the previous ones are still reported)")
    add(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared 2-core machine one thread "
        "was 3-4x faster than two, whose OpenMP workers wait on each other under contention; try 2 on an idle machine)",
    )
    add("--tiny", action="store_true", help="tiny random model (implied by --quick)")
    add("--strict", action="store_true", help="stop at the first failing method instead of recording the error")
    add("--fresh", action="store_true", help="forget cached results and adapters in --output-dir first")
    args = parser.parse_args(argv)
    preset = {**DEFAULTS, **(QUICK if args.quick else {})}
    for name, value in preset.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    args.tiny = args.tiny or args.quick
    args.shots = [str(s) for s in args.shots]
    args.ablation_shots = [str(s) for s in args.ablation_shots]
    for shot in [*args.shots, *args.ablation_shots]:
        if shot != "full" and not (shot.isdigit() and int(shot) > 0):
            parser.error(f"--shots takes positive ints or 'full', got {shot!r}")
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // 4) if args.lr_grid else 0  # 5 points: enough to tell a flat end
    if args.lr_grid and args.lr:
        parser.error("--lr sets one learning rate, --lr-grid a grid: give --prompt-lr-grid / --lora-lr-grid instead")
    if args.ablation_lr is not None and not (args.lr_grid and args.ablation_lr > 0):
        parser.error("--ablation-lr needs --lr-grid and a positive learning rate (TA-LoRA's chosen one)")
    if args.target_lr_grid and not args.lr_grid:
        parser.error("--target-lr-grid needs --lr-grid (its grids and seeds are the multi-task ones)")
    if args.target_val_rows < 1:
        parser.error("--target-val-rows must be >= 1")
    if args.lr_grid_seeds and not (args.lr_grid and set(args.lr_grid_seeds) <= set(args.seeds)):
        parser.error("--lr-grid-seeds needs --lr-grid and seeds that are among --seeds")
    if len(args.prompt_lr_grid) != len(args.lora_lr_grid):
        parser.error("--prompt-lr-grid and --lora-lr-grid must have the same size (a fair search for every method)")
    args.method_lr_grid = parse_method_lr_grid(parser, args, "--method-lr-grid", args.method_lr_grid)
    args.method_target_lr_grid = parse_method_lr_grid(
        parser, args, "--method-target-lr-grid", args.method_target_lr_grid
    )
    if args.method_target_lr_grid and not args.target_lr_grid:
        parser.error("--method-target-lr-grid needs --target-lr-grid (it replaces one method's unseen-task grid)")
    if args.val_per_task < 1 or args.eval_every < 0:
        parser.error("--val-per-task must be >= 1 and --eval-every >= 0")
    try:
        index, count = (int(part) for part in args.shard.split("/"))
    except ValueError:
        parser.error(f"--shard takes I/N (e.g. 0/2), got {args.shard!r}")
    if not 0 <= index < count:
        parser.error(f"--shard {args.shard}: I must be in 0..N-1")
    args.shard = (index, count)
    if args.fresh and count > 1:
        parser.error("--fresh with --shard: the shards would delete each other's results; start over once without")
    for entry in args.lr or []:
        name, _, value = entry.rpartition("=")
        if name and name not in M.ALL:
            parser.error(f"--lr {entry}: unknown method {name!r}; choose from {', '.join(M.ALL)}")
        try:
            float(value)
        except ValueError:
            parser.error(f"--lr {entry}: {value!r} is not a number")
    if args.steps < 1 or args.target_steps < 1:
        parser.error("--steps and --target-steps must be >= 1")
    return args


def parse_method_lr_grid(parser, args, flag: str, entries: list[str]) -> dict:
    """``FLAG pt=3e-3,1e-2,...``: ``{method: [lr, ...]}``, each grid as long as the family grids (a fair search
    gives every method the same number of tries; only where they lie may differ)."""
    grids = {}
    for entry in entries:
        name, _, values = entry.partition("=")
        if name not in M.ALL:
            parser.error(f"{flag} {entry}: unknown method {name!r}; choose from {', '.join(M.ALL)}")
        if name in grids:
            parser.error(f"{flag}: {name} is given twice; give each method one grid")
        try:
            grid = [float(v) for v in values.split(",")]
        except ValueError:
            parser.error(f"{flag} {entry}: write METHOD=LR,LR,... with numbers (e.g. pt=1e-2,3e-2,1e-1)")
        if len(grid) != len(args.prompt_lr_grid) or min(grid) <= 0 or len(set(grid)) != len(grid):
            parser.error(
                f"{flag} {entry}: give {len(args.prompt_lr_grid)} distinct positive learning rates, as many as "
                "the family grids (a fair search gives every method the same number of tries)"
            )
        grids[name] = grid
    if grids and not args.lr_grid:
        parser.error(f"{flag} needs --lr-grid (it replaces one method's grid)")
    return grids


def quiet() -> None:
    """Progress bars and deprecation chatter off: one line per phase is printed instead."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*label_names.*")
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()


def without_shard(argv: list[str]) -> list[str]:
    """``argv`` less its ``--shard I/N`` (for the report command a shard prints)."""
    out, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--shard="):
            skip = False
            continue
        skip = arg == "--shard"
        if not skip:
            out.append(arg)
    return out


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    quiet()
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    if args.fresh:
        shutil.rmtree(out / ".cache", ignore_errors=True)
        (out / "results.json").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    keys, notes = M.available(args.methods)
    state = State(out)
    runs = plan(args, keys)
    shard = f"{args.shard[0]}/{args.shard[1]}" if args.shard[1] > 1 else None
    speed = not args.skip_speed and args.shard[0] == 0
    todo = {k: fp for k, fp in runs.items() if mine(args, keys, k) and not state.done(k, fp)}
    todo = {} if args.skip_quality else todo

    from peft_talora.smollm2 import load_model
    from peft_talora.suite import load_task

    for task in [*args.tasks, *args.targets]:
        load_task(task)  # built once, then cached on disk
    base, tokenizer = load_model(tiny=args.tiny)
    if torch.cuda.is_available():
        base = base.cuda()

    cal = None
    if todo or speed:
        log("calibrating (one training step, one forward, one short generate) ...")
        cal = calibrate(base, tokenizer, args)
        seconds = estimate(args, keys, todo, tokenizer, cal, speed)
        log(
            f"expected time: about {seconds / 60:.0f} min ({len(todo)} quality runs to do"
            f"{f' in shard {shard}' if shard else ''}, {'with' if speed else 'no'} speed runs; measured now with "
            f"{args.threads} thread(s): training step {cal['train_step_s']:.1f} s, forward {cal['forward_s']:.1f} s at "
            f"batch {args.batch_size}; a shared machine can be 2x off either way)"
        )
        if shard:
            left = {k: fp for k, fp in runs.items() if not state.done(k, fp)}
            log(
                f"  (every shard's work on one process: about {estimate(args, keys, left, tokenizer, cal) / 60:.0f} min)"
            )
        if len(args.seeds) == 1 and not args.quick:
            three = argparse.Namespace(**{**vars(args), "seeds": [0, 1, 2]})
            log(
                f"  (--seeds 0 1 2 from scratch: about {estimate(three, keys, plan(three, keys), tokenizer, cal) / 60:.0f} min)"
            )
    if shard:
        return run_shard(args, argv, shard, state, base, tokenizer, keys, runs, cal, speed, started)

    # The report covers the requested methods plus any other method already finished with this budget,
    # so a partial rerun (--methods lora) does not drop the rest from RESULTS.md.
    everything, _ = M.available(list(M.ALL))
    finished = plan(args, everything)
    shown = [
        k
        for k in everything
        if k in keys
        or all(state.done(f"{k}|seed{s}|unseen_data", finished[f"{k}|seed{s}|unseen_data"]) for s in args.seeds)
    ]
    if cal is not None:
        state.data["calibration"] = cal
    meta = state.data.setdefault("meta", {})
    meta.update(
        command="python benchmarks/run.py " + shlex.join(argv),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        machine=machine(),
        versions=versions(),
        model=model_id(args),
        settings={k: v for k, v in vars(args).items() if k not in ("fresh", "strict")},
    )
    state.data["plan"] = {
        "methods": shown,
        "seeds": args.seeds,
        "tasks": args.tasks,
        "targets": args.targets,
        "shots": args.shots,
        "ablation_shots": args.ablation_shots,
        "lr_grid": {k: lr_grid(args, k) for k in shown} if args.lr_grid else None,
        "lr_grid_seeds": args.lr_grid_seeds,
        "ablation_lr": args.ablation_lr,
        "target_lr_grid": {k: target_lr_grid(args, k) for k in shown} if args.target_lr_grid else False,
        "runs": plan(args, shown),
    }
    state.data["methods"] = {
        k: {
            "label": M.ALL[k].label,
            "family": M.ALL[k].family,
            "routes": M.ALL[k].routes,
            "lr": None if args.lr_grid else learning_rate(args, k),
            "unseen_tasks": M.ALL[k].unseen_tasks,
            "ablation": M.ALL[k].ablation,
        }
        for k in shown
    }
    state.data["notes"] = notes
    state.data["test_sets"] = R.describe_test_sets([*args.tasks, *args.targets], args.eval_per_task)
    log("counting trainable parameters")
    params = state.data.setdefault("parameters", {})
    param_fp = fingerprint(model=model_id(args), tasks=len(args.tasks))
    for key in sorted({k.split("/")[0] for k in shown}):
        if params.get(key, {}).get("fingerprint") != param_fp:
            params[key] = {**M.count_parameters(key, base.config, args.tasks), "fingerprint": param_fp}
    for key in [k for k in params if params[k].get("fingerprint") != param_fp]:
        del params[key]
    if args.skip_speed and (state.data.get("speed") or {}).get("model") not in (None, model_id(args)):
        notes.append(
            "The cached speed results were measured on another model; they are left out (rerun without --skip-speed)."
        )
        state.put_speed(None)
    state.save()

    if not args.skip_quality:
        Quality(args, state, base, tokenizer, keys, runs).run()
    if speed:
        state.put_speed({**run_speed(args, base, tokenizer), "model": model_id(args)})

    state.data["meta"]["elapsed_s"] = round(time.perf_counter() - started, 1)
    state.data["meta"]["machine"] = machine()
    state.refresh()  # what shards running alongside have finished meanwhile
    R.summarize(state.data)
    state.save()
    paths = R.write(state.data, out)
    print(f"wrote {', '.join(str(p) for p in [*paths, state.path])}")
    print(R.targets_text(state.data))
    return state.data


def run_shard(args, argv, shard: str, state: State, base, tokenizer, keys, runs, cal, speed: bool, started) -> dict:
    """``--shard I/N``: this process's units (and shard 0's zero-shot and speed runs), recorded under ``shards``
    in ``results.json``; the report is written afterwards by one run without ``--shard``."""
    record = {
        "command": "python benchmarks/run.py " + shlex.join(argv),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "units": [f"{key}|seed{seed}" for seed, key in units(args, keys)],
        "machine": machine(),
        "calibration": cal,
    }
    state.put(shard, record, section="shards")
    if not args.skip_quality:
        Quality(args, state, base, tokenizer, keys, runs).run()
    if speed:
        state.put_speed({**run_speed(args, base, tokenizer), "model": model_id(args)})
    record.update(
        finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        elapsed_s=round(time.perf_counter() - started, 1),
    )
    state.put(shard, record, section="shards")
    rest = without_shard(argv)
    report = shlex.join([*rest, *(f for f in ("--skip-quality", "--skip-speed") if f not in rest)])
    log(f"shard {shard} done; once every shard is, write the report: python benchmarks/run.py {report}")
    return state.data


if __name__ == "__main__":
    main()
