"""Checkpoints: orbax CheckpointManager holding the train state, the input iterator's state and
the run's metadata, written atomically and asynchronously where possible.

Atomicity: orbax writes step N to `N.orbax-checkpoint-tmp` and renames it to `N` on commit, so a
save killed half-way leaves only the temporary directory, which is never listed as a step (and is
removed when training starts again: `remove_unfinished`). A checkpoint that fails to restore
(truncated or corrupted: caught by orbax's readers or by the checksums saved with it, since not
every damaged byte makes a reader fail) is reported with its step and the next older one is used;
it is replaced when training reaches its step again. Non-finite parameters are never saved. A
failed write raises CheckpointError naming the step; earlier checkpoints stay intact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import zlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

# What orbax appends to the directory of a save that has not been committed yet.
TMP_DIR_SUFFIX = ocp.utils.TMP_DIR_SUFFIX

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


def _words(x):
    """The bits of x as uint32 words (64-bit values give two)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
    bits = x if x.dtype == unsigned else jax.lax.bitcast_convert_type(x, unsigned)
    return jax.lax.bitcast_convert_type(bits, jnp.uint32) if x.dtype.itemsize == 8 else bits.astype(jnp.uint32)


@jax.jit
def _inspect(params, state):
    floats = [x for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.inexact)]
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in floats])) if floats else jnp.bool_(True)
    return finite, jnp.stack([jnp.sum(_words(x), dtype=jnp.uint32) for x in jax.tree.leaves(state)])


def inspect_state(state) -> tuple[bool, list[int]]:
    """(params and EMA all finite, one checksum per leaf of state). A checksum is the sum of the
    leaf's bits as uint32 words modulo 2^32: exact whatever the sharding or reduction order, and
    changed by any flipped bit. ONE program whose result is awaited: on CPU meshes two programs
    with collectives in flight at once can deadlock XLA's in-process collectives."""
    finite, sums = jax.device_get(_inspect((state.params, state.ema_params), state))
    return bool(finite), [int(s) for s in np.asarray(sums)]


def _on_disk(state) -> dict:
    """A train state (or its abstract target) as written: its fields as a dict, without
    `tracked_averages` when it is empty, so that runs without post-hoc EMA keep the layout of the
    checkpoints written before the field existed (orbax matches trees by their keys)."""
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    if not fields.get("tracked_averages", True):
        del fields["tracked_averages"]
    return fields


def _from_disk(restored: dict, target):
    """The train state of `target`'s type from a dict restored by `_on_disk(target)`."""
    return target.replace(**restored)


def _json_checksum(payload) -> int:
    return zlib.crc32(json.dumps(payload, sort_keys=True).encode())


class Checkpointer:
    """Save and restore (state, input-iterator state, metadata) under `directory`.

    remove_unfinished: delete the temporary directories of saves that were interrupted (only a
    trainer should do this: a reader could race a running trainer's save).
    """

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, remove_unfinished: bool = False):
        self.directory = os.path.abspath(directory)
        if remove_unfinished and jax.process_index() == 0 and os.path.isdir(self.directory):
            unfinished = sorted(n for n in os.listdir(self.directory) if TMP_DIR_SUFFIX in n)
            if unfinished:
                log.warning("removing unfinished checkpoint writes (an interrupted save): %s", unfinished)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=remove_unfinished,
        )
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "metadata": ocp.JsonCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(self.directory, item_handlers=handlers, options=options)
        self.damaged: set[int] = set()  # steps that failed to restore: rewritten when reached again

    # -- saving -------------------------------------------------------------------------------------
    def save(self, step: int, state, data_state: dict | None, metadata: dict) -> bool:
        """Save at `step` unless that step exists or the parameters are not finite."""
        if step in self.damaged:
            with self._write_errors(f"(deleting) the damaged checkpoint at step {step}"):
                self.manager.delete(step)
            self.damaged.discard(step)
        elif step in self.manager.all_steps():
            return False
        finite, checksums = inspect_state(state)
        if not finite:
            log.error("step %d: parameters are not finite; checkpoint NOT saved", step)
            return False
        metadata = {**metadata, "checksums": checksums}
        items = {"state": ocp.args.StandardSave(_on_disk(state))}
        if data_state is not None:
            items["data"] = ocp.args.JsonSave(data_state)
            metadata["data_checksum"] = _json_checksum(data_state)
        items["metadata"] = ocp.args.JsonSave(metadata)
        with self._write_errors(f"the checkpoint at step {step}"):
            return bool(self.manager.save(step, args=ocp.args.Composite(**items)))

    def wait(self) -> None:
        """Block until an asynchronous save has been committed."""
        with self._write_errors("an asynchronous checkpoint"):
            self.manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.manager.close()

    @contextlib.contextmanager
    def _write_errors(self, what: str):
        """Turn a failed write (full disk, unwritable or vanished directory) into CheckpointError."""
        try:
            yield
        except Exception as err:  # orbax and tensorstore raise many types for I/O errors
            raise CheckpointError(
                f"writing {what} to {self.directory} failed ({type(err).__name__}: {str(err)[:300]}); "
                f"the earlier checkpoints are intact. Check free disk space and permissions."
            ) from err

    # -- restoring ------------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def read_metadata(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())).metadata

    def restore(
        self, abstract_state, step: int | None = None, check_metadata: Callable[[int, dict], None] | None = None
    ) -> Restored | None:
        """Restore the newest restorable checkpoint (or `step`) onto `abstract_state`'s shapes,
        dtypes and shardings. Returns None when there is no checkpoint at all.

        check_metadata(step, metadata) may raise to refuse a readable checkpoint (e.g. one written
        by an incompatible config): that error propagates instead of falling back."""
        candidates = [step] if step is not None else self.steps()[::-1]
        if not candidates:
            return None
        skipped = []
        for candidate in candidates:
            try:
                metadata = dict(self.read_metadata(candidate))
            except Exception as err:  # orbax raises many types for a damaged step
                self._report_damaged(candidate, err, skipped)
                continue
            if check_metadata is not None:
                check_metadata(candidate, metadata)
            try:
                restored = self._restore_step(candidate, abstract_state, metadata)
            except Exception as err:
                self._report_damaged(candidate, err, skipped)
                continue
            restored.skipped = skipped
            return restored
        raise CheckpointError(f"no restorable checkpoint in {self.directory}: steps {skipped} all failed (see the log)")

    def _report_damaged(self, step: int, err: Exception, skipped: list[int]) -> None:
        log.error(
            "checkpoint at step %d cannot be restored (%s: %s); trying an older one",
            step,
            type(err).__name__,
            str(err)[:300],
        )
        skipped.append(step)
        self.damaged.add(step)

    def _restore_step(self, step: int, abstract_state, metadata: dict) -> Restored:
        has_data = (epath.Path(self.directory) / str(step) / "data").exists()
        items = {"state": ocp.args.StandardRestore(_on_disk(abstract_state))}
        if has_data:
            items["data"] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        data_state = out.data if has_data else None
        state = _from_disk(out.state, abstract_state)
        finite, checksums = inspect_state(state)
        if not finite:
            raise CheckpointError(f"checkpoint at step {step} holds non-finite parameters")
        saved = metadata.get("checksums")
        if saved is not None and saved != checksums:
            bad = sum(a != b for a, b in zip(saved, checksums)) + abs(len(saved) - len(checksums))
            raise CheckpointError(
                f"checkpoint at step {step}: {bad} array(s) read back differ from their saved checksums"
            )
        expected = metadata.get("data_checksum")
        if has_data and expected is not None and expected != _json_checksum(data_state):
            raise CheckpointError(f"checkpoint at step {step}: the data-iterator state differs from its saved checksum")
        return Restored(step, state, data_state, metadata, [])
