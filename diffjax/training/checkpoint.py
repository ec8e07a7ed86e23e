"""Checkpoints: orbax CheckpointManager holding the train state, the input iterator's state and
the run's metadata, written atomically (orbax writes to a temporary directory and renames it on
commit; an interrupted save leaves no step behind) and asynchronously where possible.

A checkpoint that fails to restore (truncated, corrupted) is reported with its step and the
next older one is used. Non-finite parameters are never saved.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "Restored", "CheckpointError"]

log = logging.getLogger("diffjax")


class CheckpointError(RuntimeError):
    """No usable checkpoint, or a checkpoint that does not fit this run."""


class Restored:
    """What `Checkpointer.restore` returns."""

    def __init__(self, step: int, state, data_state: dict | None, metadata: dict, skipped: list[int]):
        self.step = step
        self.state = state
        self.data_state = data_state
        self.metadata = metadata
        self.skipped = skipped  # newer steps that could not be restored


@jax.jit
def _finite_flags(leaves):
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def _all_finite(tree) -> bool:
    """Whether every float leaf is finite, as ONE program whose result is awaited: on CPU meshes
    two programs with collectives in flight at once can deadlock XLA's in-process collectives."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    if not leaves:
        return True
    return bool(np.all(jax.device_get(_finite_flags(leaves))))


class Checkpointer:
    """Save and restore (state, input-iterator state, metadata) under `directory`."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    # -- saving -------------------------------------------------------------------------------------
    def save(self, step: int, state, data_state: dict | None, metadata: dict) -> bool:
        """Save at `step` unless that step exists or the parameters are not finite."""
        if step in self.manager.all_steps():
            return False
        if not _all_finite((state.params, state.ema_params)):
            log.error("step %d: parameters are not finite; checkpoint NOT saved", step)
            return False
        items = {
            "state": ocp.args.StandardSave(state),
            "metadata": ocp.args.JsonSave(metadata),
        }
        if data_state is not None:
            items["data"] = ocp.args.JsonSave(data_state)
        return bool(self.manager.save(step, args=ocp.args.Composite(**items)))

    def wait(self) -> None:
        """Block until an asynchronous save has been committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # -- restoring ------------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def read_metadata(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())).metadata

    def restore(self, abstract_state, step: int | None = None) -> Restored | None:
        """Restore the newest restorable checkpoint (or `step`) onto `abstract_state`'s shapes,
        dtypes and shardings. Returns None when there is no checkpoint at all."""
        candidates = [step] if step is not None else self.steps()[::-1]
        if not candidates:
            return None
        skipped = []
        for candidate in candidates:
            try:
                restored = self._restore_step(candidate, abstract_state)
            except Exception as err:  # orbax raises many types for a damaged step
                log.error("checkpoint at step %d cannot be restored (%s: %s); trying an older one",
                          candidate, type(err).__name__, str(err)[:300])
                skipped.append(candidate)
                continue
            restored.skipped = skipped
            return restored
        raise CheckpointError(
            f"no restorable checkpoint in {self.directory}: steps {skipped} all failed (see the log)"
        )

    def _restore_step(self, step: int, abstract_state) -> Restored:
        item_names = set(self.manager.item_metadata(step).keys()) if hasattr(self.manager, "item_metadata") else set()
        items = {
            "state": ocp.args.StandardRestore(abstract_state),
            "metadata": ocp.args.JsonRestore(),
        }
        has_data = "data" in item_names or os.path.isdir(os.path.join(self.directory, str(step), "data"))
        if has_data:
            items["data"] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = out.state
        if not _all_finite((state.params, state.ema_params)):
            raise CheckpointError(f"checkpoint at step {step} holds non-finite parameters")
        return Restored(step, state, out.data if has_data else None, dict(out.metadata), [])
