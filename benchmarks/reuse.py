"""Carry finished runs into a benchmark folder whose plan differs from an earlier one only in its learning-rate grids.

``run.py`` fingerprints every evaluation with the whole grid its learning rate was chosen from, so widening a
grid reruns every evaluation, even where the wider grid chooses what the narrower one chose. There the rerun
trains and scores the very same adapter, at the same learning rate, on the same rows, and gives the same
numbers (rerun for TA-LoRA's seed 0 of the decisive run: the same prediction on every test row, validation
losses equal to 1e-6). This copies such runs from the earlier folder into the new one, under the new plan's
fingerprints and marked ``reused_from``:

- every run whose fingerprint is the same in both plans (the zero-shot runs, the grid runs at the learning
  rates both grids have);

and, once the new grid's choice is known:

- ``METHOD|seedS|unseen_data`` when the multi-task choice (on ``--lr-grid-seeds``) is unchanged;
- the unseen-task grid runs ``METHOD|seedS|TARGET|k=K|lr=LR`` at the learning rates both grids have, when the
  multi-task choice is unchanged (they train from the same adapter);
- ``METHOD|seedS|TARGET|k=K`` when the unseen task's choice is unchanged too.

Every other flag must be the same in both plans (:data:`MAY_DIFFER` lists what may not). It writes under the
results' lock, so it can run beside the shards, which skip what they find done; run it again as the new grids
finish::

    python benchmarks/reuse.py --from benchmarks/decisive $FLAGS --output-dir benchmarks/decisive-wide-grid

The earlier plan is the command recorded in the earlier folder's ``results.json``.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Optional

import run

#: Flags that do not change what a run computes (run control), or that only decide which runs exist.
MAY_DIFFER = {
    "output_dir",
    "methods",
    "seeds",
    "prompt_lr_grid",
    "lora_lr_grid",
    "method_lr_grid",
    "method_target_lr_grid",
    "ablation_lr",
    "shard",
    "threads",
    "skip_quality",
    "skip_speed",
    "speed_repeats",
    "gen_batch_size",
    "gen_new_tokens",
    "task_batch_seq_len",
    "strict",
    "fresh",
}


def _done(runs: dict, plan: dict, key: str) -> Optional[dict]:
    """The record of ``key`` if it is finished under ``plan`` (its fingerprint, no error, not skipped)."""
    record = runs.get(key)
    if record is None or key not in plan or record.get("fingerprint") != plan[key]:
        return None
    return None if "error" in record or "skipped" in record else record


def choice(runs: dict, plan: dict, keys_by_lr: dict) -> tuple[Optional[float], dict]:
    """The learning rate ``run.py`` chooses from the grid runs ``{lr: [run keys]}`` (:func:`run.lowest_loss` of
    their mean validation losses; ``None`` while a run is unfinished or if all diverged) and the losses."""
    losses = {}
    for lr, keys in keys_by_lr.items():
        records = [_done(runs, plan, key) for key in keys]
        if None in records:
            return None, {}
        values = [record.get("validation_loss") for record in records]
        losses[lr] = None if None in values else sum(values) / len(values)
    return run.lowest_loss(losses), losses


def _losses_field(losses: dict) -> dict:
    return {f"{lr:g}": loss for lr, loss in losses.items()}


def check_comparable(old, new) -> None:
    """Raise ``SystemExit`` naming the flags that differ between the plans beyond :data:`MAY_DIFFER`."""
    differ = sorted(k for k in vars(new) if k not in MAY_DIFFER and getattr(old, k, None) != getattr(new, k))
    if differ:
        raise SystemExit(
            "reuse.py: the earlier run's plan differs in more than its learning-rate grids ("
            + ", ".join(f"--{k.replace('_', '-')}" for k in differ)
            + "); its runs computed something else and cannot be carried over."
        )
    if not (old.lr_grid and new.lr_grid):
        raise SystemExit("reuse.py: both runs must use --lr-grid (without it there is no choice to compare).")


def reuse(old, new, old_runs: dict, state: run.State, source: str) -> list[str]:
    """Copy into ``state`` (the new folder's results) the runs of ``old_runs`` that the plan of ``new`` would
    compute again identically; returns their keys."""
    check_comparable(old, new)
    keys = [k for k in new.methods if k in run.M.ALL]
    old_plan, new_plan = run.plan(old, keys), run.plan(new, keys)
    copied = []

    def put(key: str, record: dict, **fields) -> None:
        if not state.done(key, new_plan[key]):
            state.put(key, {**record, **fields, "fingerprint": new_plan[key], "reused_from": source})
            copied.append(key)

    for key, fp in new_plan.items():  # the same fingerprint in both plans: zero-shot runs, grid runs both have
        if old_plan.get(key) == fp and (record := _done(old_runs, old_plan, key)):
            put(key, record)
    for key in keys:
        for seed in new.seeds:
            before, _ = choice(old_runs, old_plan, run.choice_keys(old, key, seed))
            now, losses = choice(state.data["runs"], new_plan, run.choice_keys(new, key, seed))
            if before is None or before != now:
                continue
            assert run.source_fp(old, key, seed, now) == run.source_fp(new, key, seed, now)  # the same adapter
            data_key = f"{key}|seed{seed}|unseen_data"
            if record := _done(old_runs, old_plan, data_key):
                put(data_key, record, lr_grid=_losses_field(losses))
            for target in new.targets:
                for shot in run.shots_for(new, key):
                    if new.target_lr_grid and seed in run.grid_seeds(new):
                        for lr in run.target_lr_grid(new, key):
                            grid_key = run.target_lr_key(key, seed, target, shot, lr)
                            if record := _done(old_runs, old_plan, grid_key):
                                put(grid_key, record)
                    run_key = f"{key}|seed{seed}|{target}|k={shot}"
                    record = _done(old_runs, old_plan, run_key)
                    if record is None:
                        continue
                    if not new.target_lr_grid:
                        put(run_key, record)
                        continue
                    target_now, target_losses = choice(
                        state.data["runs"], new_plan, run.target_choice_keys(new, key, seed, target, shot)
                    )
                    if target_now is not None and target_now == record.get("target_lr"):
                        put(run_key, record, target_lr_grid=_losses_field(target_losses))
    return copied


def main(argv: list[str]) -> None:
    if "--from" not in argv or argv.index("--from") + 1 >= len(argv):
        raise SystemExit("usage: python benchmarks/reuse.py --from EARLIER_FOLDER [run.py flags of the new run]")
    at = argv.index("--from")
    source, rest = argv[at + 1], argv[:at] + argv[at + 2 :]
    earlier = json.loads((Path(source) / "results.json").read_text())
    old = run.parse(shlex.split(earlier["meta"]["command"])[2:])
    new = run.parse(rest)
    Path(new.output_dir).mkdir(parents=True, exist_ok=True)
    state = run.State(Path(new.output_dir))
    copied = reuse(old, new, earlier["runs"], state, source)
    print(f"{len(copied)} runs carried over from {source}" + "".join(f"\n  {key}" for key in copied))


if __name__ == "__main__":
    main(sys.argv[1:])
