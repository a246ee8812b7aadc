"""The training loop the trainers on ``sdjax.train`` share (LoRA, textual inversion, ControlNet).

Given a compiled step, its initial state and frozen tree, and the examples as equally long arrays, it resumes
from ``checkpoint.msgpack`` in the output folder (refusing one written with other settings), runs the
micro-steps with optional accumulation, logs the mean loss to the progress bar and ``loss.jsonl``, checkpoints,
and has the trainer write sample images; what it returns is the trained parameters on the host.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np
from tqdm.auto import tqdm

from sdjax import train

CHECKPOINT_FILE = "checkpoint.msgpack"
LOSS_FILE = "loss.jsonl"

# (trained parameters on the host, optimizer step) -> None: writes the sample images of that step.
SampleFn = Callable[[Any, int], None]


@dataclasses.dataclass(frozen=True)
class LoopPlan:
    label: str  # the progress bar's, e.g. "train-lora"
    steps: int  # optimizer steps
    batch_size: int  # examples per micro-step, over all devices
    accumulate_steps: int  # micro-steps per optimizer step
    seed: int  # the data order
    log_every: int
    checkpoint_every: int
    sample_every: int  # 0: no samples

    @classmethod
    def of(cls, label: str, config) -> "LoopPlan":
        """The plan of a trainer config, which names these fields as the plan does."""
        return cls(label, **{f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if f.name != "label"})


def batch_indices(num: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """The examples of micro-step ``step``: consecutive slices of a fresh permutation per epoch, a pure
    function of (step, seed) so a resumed run sees the same data as an uninterrupted one."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = np.divmod(positions, num)
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        chosen = epochs == epoch
        out[chosen] = np.random.default_rng([seed, int(epoch)]).permutation(num)[offsets[chosen]]
    return out


def append_log(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def progress_bar(desc: str, total: int, initial: int, enabled: bool):
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step")


def run_training(
    step_fn: train.TrainStep,
    state: train.TrainState,
    frozen,
    examples: dict,
    key: jax.Array,
    plan: LoopPlan,
    output: Optional[Path],
    record: dict,
    *,
    progress: bool = True,
    sample: Optional[SampleFn] = None,
):
    """Train ``state`` (unplaced, as ``train.init_state`` gives it) for ``plan.steps`` optimizer steps; micro-step
    ``m`` takes the examples ``batch_indices`` chooses and the key ``fold_in(key, m)``. ``record``: the settings
    a checkpoint must agree with to be resumed. With ``output``: resumes from and writes its checkpoint, logs the
    loss, and calls ``sample`` every ``plan.sample_every`` steps and at the end. Returns the trained parameters
    on the host."""
    checkpoint = output / CHECKPOINT_FILE if output else None
    if checkpoint is not None and checkpoint.exists():
        state, extra = train.restore_checkpoint(checkpoint, state)
        if extra.get("config") and extra["config"] != record:
            raise ValueError(f"{checkpoint} was written by a run with other settings ({extra['config']}); "
                             "use another output folder or delete the checkpoint")
        print(f"resumed from {checkpoint} at step {int(state.step) // plan.accumulate_steps}", flush=True)

    parallel = step_fn.parallel
    state, frozen = parallel.place_params(state), parallel.place_params(frozen)
    num_examples = len(next(iter(examples.values())))
    total_micro = plan.steps * plan.accumulate_steps
    begin = int(parallel.unreplicate(state.step))
    bar = progress_bar(plan.label, plan.steps, begin // plan.accumulate_steps, progress)
    recent: list = []
    started = time.time()
    for micro in range(begin, total_micro):
        chosen = batch_indices(num_examples, plan.batch_size, micro, plan.seed)
        batch = parallel.place_batch({k: v[chosen] for k, v in examples.items()})
        state, metrics = step_fn(state, frozen, batch, jax.random.fold_in(key, micro))
        recent.append(metrics["loss"])
        if (micro + 1) % plan.accumulate_steps:
            continue
        step = (micro + 1) // plan.accumulate_steps
        last = step == plan.steps
        if step % plan.log_every == 0 or last:
            loss = float(np.mean([np.mean(np.asarray(v)) for v in recent]))
            recent = []
            bar.set_postfix(loss=f"{loss:.4f}")
            if output:
                append_log(output / LOSS_FILE, {"step": step, "loss": loss, "seconds": round(time.time() - started, 1)})
        bar.update(1)
        if checkpoint is not None and (step % plan.checkpoint_every == 0 or last):
            train.save_checkpoint(checkpoint, parallel.unreplicate(state), {"config": record})
        if output and sample is not None and plan.sample_every and (step % plan.sample_every == 0 or last):
            sample(jax.device_get(parallel.unreplicate(state.params)), step)
    bar.close()
    return jax.device_get(parallel.unreplicate(state.params))


def write_images(images, folder: Path, step: int) -> list[Path]:
    """Sample images of optimizer step ``step`` as ``folder/step_<step>_<i>.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"step_{step:06d}_{i}.png")
        image.save(paths[-1])
    return paths
