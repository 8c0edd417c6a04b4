"""New tasks from k shots: does a task added to a trained TA-LoRA adapter learn, and beat its peers?

For each unseen task (the 4 suite targets and the 2 extra held-out tasks), on k examples per label
from its train split:

- ``base``: the base model zero-shot;
- ``ta-lora``: ``add_tasks([task])`` on the trained adapter (freeze mode: only the new ``u, v, c``
  train), the default neutral start ``new_task_start="base"``: gate scale ``c = 0``, so the new
  task starts exactly at the base model;
- ``ta-lora/shared``: the same with ``new_task_start="shared_prompt"`` (``c = 1``: the new task
  starts at the trained shared prompt: the paper's start, and the only one before gate scales existed);
- ``ta-lora/closest``: started as a copy (``u, v, c``) of the source task whose routing gives the
  shots the lowest loss (``closest_task`` then ``add_tasks(..., init_from=...)``), at the learning
  rate ``ta-lora/shared`` kept (both start on the trained prompt: a change of the start only; its
  own grid when ``ta-lora/shared`` has not run or kept its start);
- ``ta-lora/gradient``: the default start (``c = 0``) with a data-derived ``u``: per layer, the top
  left singular vector of ``B^T dL/dP``, the gradient of the shots' loss with respect to the task
  prompt at the shared prompt (:func:`aligned_u`). With ``v = 0`` the first gradient ``v`` gets is
  then the best rank-1 direction there is for the new task's ``outer(u, v)``, where a random ``u``
  gives ``v`` a random projection of it;
- ``pt``: PEFT prompt tuning (10 virtual tokens, TEXT init) on the base model;
- ``lora``: PEFT LoRA (r=8 on q/v) on the base model.

Every method trains on the same shots in the same order for the same steps and batch size, and
picks its learning rate from a grid of the same size *and* its stopping step (0, every
``--eval-every`` steps, the last) by macro-F1 on the task's validation rows: the same early
stopping for everyone, where step 0 is each method's own start (LoRA's is the base model). Every
point (the start, and each learning rate's steps) is scored on the validation *and* the test rows,
every row's prediction kept: the kept point's test record is the headline (averages and
differences get bootstrap intervals over the rows), and ``--report --rules`` replays other choice
rules and fewer validation rows on the stored records (``benchmarks/choice_rules.py``); the test
rows never choose.

    python benchmarks/new_tasks.py --adapter outputs/main_job/adapter            # all 6 tasks
    python benchmarks/new_tasks.py --adapter A --tasks pubmedqa --methods base ta-lora
    python benchmarks/new_tasks.py --adapter B/.cache/adapters/ta-lora-seed0-<hash>.pt   # a benchmark's adapter

Results go to ``--output-dir/<task>.json`` (every method's grid, scored points and losses,
written as each learning rate finishes: rerunning resumes; two processes on different
``--tasks`` or ``--methods`` can share the folder, ``--threads 1`` each on 2 cores) and the summary table is
printed; ``--report`` only prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import zlib
from pathlib import Path

import choice_rules as CR  # benchmarks/ (the script's folder): which trained point a method keeps
import methods as M  # benchmarks/ (the script's folder): the benchmark's PEFT configs and adapter state
import torch
from peft import PeftModel, get_peft_model
from quality import SYSTEM_PROMPT
from run import update_json_locked
from transformers import TrainerCallback, TrainingArguments

import peft_talora  # noqa: F401  (registers TA-LoRA with PEFT)
from peft_talora.smollm2 import load_model
from peft_talora.suite import EXTRA_TASKS, SOURCE_TASKS, TARGET_TASKS, evaluate_task, format_split, load_task, subsample
from peft_talora.suite.intervals import TaskRuns, bootstrap_interval, paired_difference
from peft_talora.training import build_trainer
from peft_talora.training.collator import MultiTaskDataCollator, k_shot, tokenize_for_causal_lm
from peft_talora.training.transfer import task_losses

METHODS = ("base", "ta-lora", "ta-lora/shared", "ta-lora/closest", "ta-lora/gradient", "pt", "lora")
#: Where ``add_tasks`` starts the new task (``TALoraConfig.new_task_start``) for each TA-LoRA variant.
NEW_TASK_START = {
    "ta-lora": "base",
    "ta-lora/shared": "shared_prompt",
    "ta-lora/closest": "shared_prompt",
    "ta-lora/gradient": "base",
}
#: Tasks whose default split leaves under 100 test rows get a split with more test rows (train, validation, test):
#: consumer_contracts has 396 rows, so 70/10/20 leaves 80 test rows; 40/10/50 leaves 198 and 158 to draw shots from.
SPLIT_FRACTIONS = {"consumer_contracts": (0.4, 0.1, 0.5)}
#: Every point (the start, then every ``--eval-every`` steps of every learning rate) is scored on the validation
#: *and* test rows, so choice rules replay offline (``--rules``). Folders written before this say otherwise.
PROTOCOL = "every point scored on validation and test"
LR_GRIDS = {"ta-lora": (3e-3, 1e-2, 3e-2), "pt": (3e-3, 1e-2, 3e-2), "lora": (3e-4, 1e-3, 3e-3)}


def grid_of(method: str, done: dict) -> tuple[float, ...]:
    """The learning rates ``method`` tries. ``ta-lora/closest`` is a change of ``ta-lora/shared``'s start
    only: it trains at the learning rate that one kept, when it has run and kept a trained point (a
    third of the time); otherwise (not run yet, or it kept its start) at its own grid."""
    if method == "ta-lora/closest" and done.get("ta-lora/shared", {}).get("lr") is not None:
        return (done["ta-lora/shared"]["lr"],)
    return LR_GRIDS[method.split("/")[0]]


# ----------------------------------------------------------------------------- data
class TaskData:
    """A task's shots (k per label, train split), validation rows and test rows, formatted once."""

    def __init__(self, name: str, tokenizer, args):
        splits = load_task(name, **({"split_fractions": SPLIT_FRACTIONS[name]} if name in SPLIT_FRACTIONS else {}))
        self.name, self.tokenizer = name, tokenizer
        self.shots = k_shot(splits["train"], args.shots, seed=args.seed).shuffle(seed=args.seed)
        self.validation = subsample(splits["validation"], args.val_rows, seed=args.seed)
        self.test = subsample(splits["test"], args.test_rows, seed=args.seed)
        self.rows = format_split(
            self.shots, tokenizer, max_text_tokens=args.max_text_tokens, system_prompt=SYSTEM_PROMPT
        )
        self.train_rows = tokenize_for_causal_lm(self.rows, tokenizer, task_column=None)  # no routing
        self.source_losses = None  # mean label loss of the shots under each source task (ta-lora/closest)
        self.aligned_u = None  # the new task's data-derived u (ta-lora/gradient), (L, r)

    def routed_rows(self, model):
        """The shots with ``task_ids`` encoded by ``model``'s own task list (the new task's id, not 0)."""
        return tokenize_for_causal_lm(self.rows, tokenizer=self.tokenizer, task_names=model)


def evaluate(model, tokenizer, rows, task: str, args, route: bool, scores: bool = False) -> dict:
    """The metrics record of ``model`` on ``rows`` (per-row predictions kept); ``scores``: also each row's
    label log-likelihoods ``(rows, labels)``, rounded, which a loss-based choice rule reads."""
    result = evaluate_task(
        model,
        tokenizer,
        rows,
        task=task,
        task_id=task if route else None,
        batch_size=args.eval_batch_size,
        max_text_tokens=args.max_text_tokens,
        system_prompt=SYSTEM_PROMPT,
    )
    record = result.metrics()
    if scores:
        record["scores"] = [[round(float(x), 4) for x in row] for row in result.scores.tolist()]
    return record


def score_point(model, data: TaskData, tokenizer, args, route: bool) -> dict:
    """One point of a run: the validation record (with label scores) and the test record."""
    return {
        "validation": evaluate(model, tokenizer, data.validation, data.name, args, route, scores=True),
        "test": evaluate(model, tokenizer, data.test, data.name, args, route),
    }


# ----------------------------------------------------------------------------- models
def build(method: str, data: TaskData, tokenizer, args):
    """A fresh trainable model of ``method`` for ``data``'s task, and where it starts from (for the record).

    The random initialisations (TA-LoRA's new ``u``, LoRA's ``A``) are seeded here, so every learning
    rate of a method starts from the same weights whatever ran before in the process.
    """
    base, _ = load_model(tiny=args.tiny)
    torch.manual_seed(args.seed)
    family = method.split("/")[0]
    if family == "ta-lora":
        model = PeftModel.from_pretrained(base, args.adapter_folder, is_trainable=True)
        start = None
        if method == "ta-lora/closest":
            if data.source_losses is None:  # the same for every learning rate: measured once
                collator = MultiTaskDataCollator(tokenizer=tokenizer)
                batch = collator(list(data.train_rows))
                data.source_losses = task_losses(model, batch)
            start = min(data.source_losses, key=data.source_losses.get)
        model.peft_config["default"].new_task_start = NEW_TASK_START[method]
        model.add_tasks([data.name], init_from=start)
        info = {"new_task_start": NEW_TASK_START[method], "init_from": start}
        if method == "ta-lora/gradient":
            if data.aligned_u is None:  # the same for every learning rate: measured once
                batch = MultiTaskDataCollator(tokenizer=tokenizer)(list(data.routed_rows(model)))
                data.aligned_u = aligned_u(model, batch)
            with torch.no_grad():
                model.base_model.active_bank.task_u_blocks[-1][:, 0] = data.aligned_u
            info["init_from"] = "aligned u"
        return model, {**info, "source_losses": data.source_losses if start else None}
    # the full benchmark's configs: PT with 10 virtual tokens and a text init, LoRA r=8 on q/v
    config = M.make_config(family, [data.name], base.config.num_hidden_layers, tok_path=M.tokenizer_path())
    return get_peft_model(base, config), {}


def aligned_u(model, batch, chunk_size: int = 8) -> torch.Tensor:
    """A data-derived ``u`` ``(L, r)`` for the task just added (the last of the adapter, one new task).

    The new task's prompt is ``P = theta0 + s * B @ outer(u, v)``, so with ``v = 0`` its first
    gradient is ``dL/dv = s * (B^T G)^T u`` with ``G = dL/dP``: a random ``u`` makes it a random
    projection of ``M = B^T G`` ``(r, d)``. The best rank-1 step along ``outer(u, v)`` is ``M``'s top
    singular pair; this returns its left vector (unit norm, per layer). ``G`` is measured with the
    task's gate scale opened to 1 at ``v = 0``, where ``P`` is the shared prompt, as the gradient of the
    shots' mean label loss (``batch``: collated rows routed to the new task) with respect to the
    shared prompt; the model (its gate scale, grads and ``requires_grad``) is left as it was.
    """
    bank = model.base_model.active_bank
    gate, prompt = bank.task_gate_blocks[-1], bank.shared_prompt
    saved_gate, saved_requires_grad = gate.detach().clone(), prompt.requires_grad
    modes = [(module, module.training) for module in model.modules()]
    without_grad = [p for p in model.parameters() if p.grad is None]
    model.eval()
    try:
        with torch.no_grad():
            gate.fill_(1.0)
        prompt.requires_grad_(True)
        prompt.grad = None
        rows = batch["input_ids"].shape[0]
        for start in range(0, rows, chunk_size):
            part = {key: value[start : start + chunk_size] for key, value in batch.items()}
            labels = part.pop("labels")
            logits = model(**part).logits[:, :-1]
            targets = labels[:, 1:]
            token_loss = torch.nn.functional.cross_entropy(
                logits.float().transpose(1, 2), targets, ignore_index=-100, reduction="none"
            )
            ((token_loss.sum(1) / (targets != -100).sum(1)).sum() / rows).backward()
        gradient = prompt.grad  # (L, n, d)
        aligned = bank.shared_basis.detach().transpose(1, 2) @ gradient  # (L, r, d)
        left, _, _ = torch.linalg.svd(aligned, full_matrices=False)
        return left[:, :, 0].to(bank.task_u_blocks[-1].dtype)
    finally:
        for parameter in without_grad:  # the new task's own factors got grads too
            parameter.grad = None
        prompt.requires_grad_(saved_requires_grad)
        with torch.no_grad():
            gate.copy_(saved_gate)
        for module, training in modes:
            module.training = training


class ScorePoints(TrainerCallback):
    """Every ``every`` steps and at the last: the model's validation and test records (:func:`score_point`).

    Every point is scored on the test rows too, so any choice rule can be replayed on the stored records
    (``--rules``) without retraining; which point a method *keeps* is decided on validation alone.
    """

    def __init__(self, model, score, every: int):
        self.model, self.score, self.every = model, score, every
        self.points: dict[int, dict] = {}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.points[state.global_step] = self.score(self.model)


def start_point(method: str, data: TaskData, tokenizer, args) -> dict:
    """Step 0 of ``method``: its start, the same for every learning rate (the build is seeded), scored once."""
    model, _ = build(method, data, tokenizer, args)
    return score_point(model, data, tokenizer, args, method.startswith("ta-lora"))


def train_one(method: str, lr: float, data: TaskData, tokenizer, args, folder: Path) -> dict:
    """Train ``method`` at ``lr``; returns its record: init, losses and the scored points after step 0."""
    model, info = build(method, data, tokenizer, args)
    route = method.startswith("ta-lora")
    train = data.routed_rows(model) if route else data.train_rows
    points = ScorePoints(model, lambda m: score_point(m, data, tokenizer, args, route), args.eval_every)
    training_args = TrainingArguments(
        output_dir=str(folder),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=lr,
        warmup_steps=max(1, args.steps // 10),
        logging_steps=1,
        save_strategy="no",
        seed=args.seed,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = build_trainer(
        model,
        training_args,
        train_dataset=train,
        processing_class=tokenizer,
        data_collator=None if route else MultiTaskDataCollator(tokenizer=tokenizer),
        callbacks=[points],
    )
    started = time.time()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    record = {
        **info,
        "lr": lr,
        "seconds": time.time() - started,
        "train_loss": losses,
        "points": {str(step): point for step, point in sorted(points.points.items())},
    }
    return record


# ----------------------------------------------------------------------------- the study
def adapter_folder(path: str, scratch: Path, tiny: bool) -> str:
    """``path`` when it is a PEFT adapter folder. A TA-LoRA state saved by ``benchmarks/run.py``
    (``<output-dir>/.cache/adapters/<method>-seed*.pt``, trained on the 8 source tasks) is rebuilt on
    the base model with its method's config and saved as one, once (a folder per state path, moved
    into place whole, so processes sharing ``--scratch`` never read a half-written one)."""
    if not path.endswith(".pt"):
        return path
    stem = Path(path).stem
    folder = scratch / f"adapter_{stem}_{zlib.crc32(str(Path(path).resolve()).encode()):08x}"
    if (folder / "adapter_config.json").exists():
        return str(folder)
    key = next((k for k in M.ALL if stem.startswith(k.replace("/", "_") + "-seed")), None)
    if key is None or not M.ALL[key].is_talora:
        raise SystemExit(f"{path} is not a TA-LoRA state of benchmarks/run.py (<method>-seed<N>-<hash>.pt).")
    base, _ = load_model(tiny=tiny)
    model = M.build(key, base, list(SOURCE_TASKS), seed=0, tok_path=M.tokenizer_path())
    state = torch.load(path, weights_only=True)["state"]
    expected = {name: tuple(p.shape) for name, p in M.trainable_state(model).items()}
    if {name: tuple(v.shape) for name, v in state.items()} != expected:
        raise SystemExit(
            f"{path} does not fit {key} on the {len(SOURCE_TASKS)} source tasks ({', '.join(SOURCE_TASKS)}): "
            "pass a state from a benchmarks/run.py run on those tasks, or a PEFT adapter folder."
        )
    M.load_state(model, state)
    partial = scratch / f".{folder.name}.{os.getpid()}"
    model.save_pretrained(str(partial))
    try:
        os.rename(partial, folder)
    except OSError:  # another process got there first: its folder is the same conversion
        shutil.rmtree(partial, ignore_errors=True)
    return str(folder)


def run(args) -> dict:
    out = Path(args.output_dir)
    results = load_results(out)

    def save(name: str):
        """One file per task; this process's methods are merged into it (``run.update_json_locked``), so
        processes on other tasks or other ``--methods`` of the same task can share the folder."""
        mine = {"settings": settings(args), **{m: results[name][m] for m in args.methods if m in results[name]}}
        out.mkdir(parents=True, exist_ok=True)
        update_json_locked(out / f"{name}.json", lambda record: record.update(mine))

    _, tokenizer = load_model(tiny=args.tiny)
    if args.tiny:  # an untrained adapter on the tiny model stands in for a trained one
        args.adapter = str(Path(args.scratch) / "tiny_adapter")
        tiny_base, _ = load_model(tiny=True)
        config = M.make_config("ta-lora", list(SOURCE_TASKS), tiny_base.config.num_hidden_layers)
        get_peft_model(tiny_base, config).save_pretrained(args.adapter)
    args.adapter_folder = adapter_folder(args.adapter, Path(args.scratch), args.tiny)
    for name in args.tasks:
        data = TaskData(name, tokenizer, args)
        task = results.setdefault(name, {})
        if task.pop("settings", settings(args)) != settings(args):
            raise SystemExit(f"{out / name}.json was made with other settings; pass another --output-dir or delete it.")
        for method in args.methods:
            if method in task and "test" in task[method]:
                continue
            print(f"\n== {name} / {method}", flush=True)
            if method == "base":
                base, _ = load_model(tiny=args.tiny)
                point = score_point(base, data, tokenizer, args, route=False)
                task[method] = {"validation": {"0": point["validation"]}, "test": point["test"]}
                save(name)
                continue
            entry = task.setdefault(method, {"grid": {}})
            if "start" not in entry:
                entry["start"] = start_point(method, data, tokenizer, args)
                save(name)
            folder = Path(args.scratch) / name / method.replace("/", "_")
            grid = grid_of(method, task)
            entry["lrs"] = [str(lr) for lr in grid]  # the choice is among these (a resumed record may hold others)
            for lr in grid:
                if str(lr) not in entry["grid"]:  # each learning rate is a resumable unit
                    entry["grid"][str(lr)] = train_one(method, lr, data, tokenizer, args, folder)
                    save(name)
                record = entry["grid"][str(lr)]
                curve = {0: entry["start"]["validation"]["macro_f1"]}
                curve.update({int(s): p["validation"]["macro_f1"] for s, p in record["points"].items()})
                print(f"  lr {lr:g}: validation macro-F1 by step {curve}, {record['seconds']:.0f} s", flush=True)
            chosen = keep(entry)
            print(f"  chose {chosen.label}: test macro-F1 {100 * entry['test']['macro_f1']:.1f}", flush=True)
            save(name)
    return results


# ----------------------------------------------------------------------------- report
def settings(args) -> dict:
    """What a task's results depend on (a rerun with other values must not mix with them)."""
    keys = ("adapter", "shots", "steps", "eval_every", "batch_size", "val_rows", "test_rows", "max_text_tokens", "seed")
    return {**{k: getattr(args, k) for k in keys}, "protocol": PROTOCOL}


def load_results(folder: Path) -> dict:
    """Every ``<task>.json`` of ``folder``. A method whose every point is stored gets its kept point derived
    again (:func:`keep`), so the report follows the rule's current code, not the copy the run had."""
    results = {f.stem: json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))} if folder.is_dir() else {}
    for task in results.values():
        for entry in task.values():
            if isinstance(entry, dict) and "start" in entry and "test" in entry:
                keep(entry)
    return results


def keep(entry: dict) -> CR.Point:
    """Record in ``entry`` the point the ``f1`` rule keeps on all the validation rows: its lr, step and test record."""
    chosen = CR.choose(CR.points(entry), "f1")
    entry.update(lr=chosen.lr, step=chosen.step, validation_macro_f1=chosen.validation["macro_f1"], test=chosen.test)
    return chosen


def runs(record: dict) -> TaskRuns:
    return TaskRuns.from_records([record])


def report(results: dict, tasks, methods) -> str:
    tasks = [t for t in tasks if t in results]
    lines = [
        "Test macro-F1 [95% bootstrap interval over the test rows] / accuracy, points; (lr, step) chosen on validation",
        "",
        "| task | rows | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for name in tasks:
        cells = []
        for method in methods:
            entry = results[name].get(method)
            if not entry or "test" not in entry:
                cells.append("-")
                continue
            test = entry["test"]
            low, high = test["macro_f1_interval"]
            cell = f"{100 * test['macro_f1']:.1f} [{100 * low:.0f}, {100 * high:.0f}] / {100 * test['accuracy']:.1f}"
            if "step" in entry:
                cell += f" ({CR.point_label(entry['lr'], entry['step'])})"
            cells.append(cell)
        n = next((results[name][m]["test"]["n"] for m in methods if "test" in results[name].get(m, {})), "-")
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    ours = "ta-lora" if "ta-lora" in methods else next((m for m in methods if m.startswith("ta-lora")), None)
    peers = [m for m in methods if not m.startswith("ta-lora")]
    if ours and peers:
        lines += [
            "",
            f"Target: {ours} above {', '.join(peers)} on every task (test macro-F1). Where a new task starts "
            f"(step 0; {ours}: new_task_start={NEW_TASK_START[ours]!r}) against the base model, on the validation rows:",
            "",
            "| task | target met | below | base (validation) | start (validation) | best (validation) |",
            "|---|---|---|---|---|---|",
        ]
        for name in tasks:
            entries = results[name]
            if not all("test" in entries.get(m, {}) for m in (ours, *peers)):
                continue
            score = {m: entries[m]["test"]["macro_f1"] for m in (ours, *peers)}
            below = [m for m in peers if score[ours] <= score[m]]
            start = CR.start_f1(entries[ours])
            base_val = entries["base"]["validation"]["0"]["macro_f1"] if "base" in entries else float("nan")
            lines.append(
                f"| {name} | {'yes' if not below else 'no'} | {', '.join(below) or '-'} | {100 * base_val:.1f} | "
                f"{100 * start:.1f} | {100 * entries[ours]['validation_macro_f1']:.1f} |"
            )
    done = [t for t in tasks if all("test" in results[t].get(m, {}) for m in methods)]
    if done:
        lines += ["", f"Average over {len(done)} tasks ({', '.join(done)}), macro-F1 [95% interval]:"]
        lines += averages([results[t] for t in done], methods)
    return "\n".join(lines)


def averages(records: list[dict], methods) -> list[str]:
    """Each method's mean test macro-F1 over ``records`` (one task's results each) and the paired differences
    of the TA-LoRA variants against the peers (and of ``ta-lora`` against the other starts), with intervals."""
    lines = []
    for method in methods:
        interval = bootstrap_interval([runs(r[method]["test"]) for r in records], "macro_f1")
        lines.append(f"- {method}: {interval.format()}")
    variants = [m for m in methods if m.startswith("ta-lora")]
    for ours in variants:
        others = [m for m in methods if not m.startswith("ta-lora")]
        if ours == "ta-lora":  # the default start against the other starts
            others += [m for m in variants if m != ours]
        for other in others:
            diff = paired_difference(
                [runs(r[ours]["test"]) for r in records], [runs(r[other]["test"]) for r in records], "macro_f1"
            )
            lines.append(f"- {ours} - {other} (paired): {diff.format(signed=True)}")
    return lines


def pooled_report(folders, tasks, methods) -> str:
    """Averages over every (task, seed) pair of ``folders`` (one seed each) whose ``methods`` all finished.

    Seeds draw different shots and test rows, so each pair is its own entry; the intervals resample the
    test rows of every pair.
    """
    pairs = []
    for folder in folders:
        for name, record in load_results(Path(folder)).items():
            if name in tasks and all("test" in record.get(m, {}) for m in methods):
                pairs.append((f"{name} (seed {record['settings']['seed']})", record))
    if not pairs:
        return "No (task, seed) pair has every method finished."
    header = f"Pooled over {len(pairs)} (task, seed) pairs ({', '.join(p for p, _ in pairs)}), macro-F1 [95% interval]:"
    return "\n".join([header, *averages([r for _, r in pairs], methods)])


def versus_report(results: dict, other: dict, other_name: str, tasks, methods) -> str:
    """Each of ``methods`` here minus the same method in ``other`` (another folder's results: another adapter
    on the same shots and rows), per task and averaged over the tasks both finished, paired over the test rows.

    Refused for a task whose two records differ in anything but the adapter: their rows would not pair.
    """
    lines = []
    for method in methods:
        pairs = []
        for name in tasks:
            here, there = results.get(name, {}), other.get(name, {})
            if "test" not in here.get(method, {}) or "test" not in there.get(method, {}):
                continue
            differing = sorted(
                key
                for key in {*here["settings"], *there["settings"]} - {"adapter"}
                if here["settings"].get(key) != there["settings"].get(key)
            )
            if differing:
                raise SystemExit(
                    f"{name}: {other_name} was made with other settings ({', '.join(differing)}), so its rows do not "
                    "pair with these; compare folders that differ in --adapter only."
                )
            pairs.append((name, here[method], there[method]))
        if not pairs:
            lines.append(f"{method}: no task finished in both folders.")
            continue
        lines += [
            f"{method} here minus {method} in {other_name}: test macro-F1, paired [95% interval]; (lr, step) kept",
            "",
            "| task | here | there | difference |",
            "|---|---|---|---|",
        ]
        for name, a, b in pairs:
            diff = paired_difference([runs(a["test"])], [runs(b["test"])], "macro_f1")
            cells = [
                f"{100 * e['test']['macro_f1']:.1f}"
                + (f" ({CR.point_label(e['lr'], e['step'])})" if "step" in e else "")
                for e in (a, b)
            ]
            lines.append(f"| {name} | {cells[0]} | {cells[1]} | {diff.format(signed=True)} |")
        mean = paired_difference([runs(a["test"]) for _, a, _ in pairs], [runs(b["test"]) for _, _, b in pairs])
        lines += ["", f"Average over {len(pairs)} tasks: {mean.format(signed=True)}", ""]
    return "\n".join(lines).rstrip()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--adapter",
        default="outputs/main_job/adapter",
        help="a trained TA-LoRA adapter folder, or benchmarks/run.py's saved ta-lora-seed*.pt state",
    )
    parser.add_argument("--tasks", nargs="+", default=[*TARGET_TASKS, *EXTRA_TASKS])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--val-rows", type=int, default=48)
    parser.add_argument("--test-rows", type=int, default=200)
    parser.add_argument("--max-text-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--output-dir", default="benchmarks/new_tasks", help="one <task>.json per task")
    parser.add_argument("--scratch", default="outputs/new_tasks_scratch")
    parser.add_argument("--report", action="store_true", help="print the table of --output-dir and stop")
    parser.add_argument(
        "--pool",
        nargs="+",
        default=None,
        metavar="DIR",
        help="with --report: also average over these output dirs' seeds",
    )
    parser.add_argument(
        "--rules",
        action="store_true",
        help="with --report: replay the choice rules (benchmarks/choice_rules.py) on --output-dir's records",
    )
    parser.add_argument(
        "--versus",
        default=None,
        metavar="DIR",
        help="with --report: each method minus the same method in DIR (another --adapter, same shots and rows)",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny random model and an untrained adapter (smoke test)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.report:
        results = load_results(Path(args.output_dir))
        if not any(task in results for task in args.tasks):
            raise SystemExit(
                f"No results for {', '.join(args.tasks)} in {args.output_dir}: run the benchmark there first "
                "(without --report), or point --output-dir at the folder that holds them."
            )
    else:
        results = run(args)
    text = report(results, args.tasks, args.methods)
    if args.report and args.pool:
        text += "\n\n" + pooled_report(args.pool, args.tasks, args.methods)
    if args.report and args.versus:
        text += "\n\n" + versus_report(results, load_results(Path(args.versus)), args.versus, args.tasks, args.methods)
    if args.report and args.rules:
        trained = [m for m in args.methods if m != "base"]
        text += "\n\n" + CR.rules_report({t: results[t] for t in args.tasks if t in results}, trained)
    print("\n" + text)
    if results:
        command = "python benchmarks/new_tasks.py " + " ".join(sys.argv[1:])
        header = f"# New tasks from k shots\n\nWritten by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n\n"
        (Path(args.output_dir) / "RESULTS.md").write_text(header + text + "\n")


if __name__ == "__main__":
    main()
