"""ModelCheckpoint: save a trainer every few steps, keeping the last few checkpoints."""
from __future__ import annotations

import os
import re

from ...errors import check_int
from .agreement import context_world
from .format import FILE_NAME, is_checkpoint, value_error
from .safe_save import remove_tree
from .save import save_checkpoint


class ModelCheckpoint:
    """Save a trainer every ``every`` steps to ``directory/{prefix}_{step}``, keeping the
    last ``keep`` checkpoints (MindSpore's ``ModelCheckpoint`` with ``keep_checkpoint_max``).
    Call it after each step on every rank: ``ckpt_cb(train, extra={...})``."""

    def __init__(self, directory, prefix: str = "ckpt", every: int = 1, keep: int = 5):
        every, keep = (check_int("ModelCheckpoint", arg, value, 1) for arg, value in (("every", every), ("keep", keep)))
        if not isinstance(prefix, str) or not FILE_NAME.match(prefix):
            raise value_error("ModelCheckpoint", "prefix", "a plain file name", repr(prefix))
        self.directory, self.prefix, self.every, self.keep = os.fspath(directory), prefix, every, keep

    def saved(self) -> list[tuple[int, str]]:
        """(step, path) of the complete checkpoints in the directory, oldest first."""
        found = []
        for entry in os.listdir(self.directory) if os.path.isdir(self.directory) else ():
            m = re.fullmatch(re.escape(self.prefix) + r"_(\d+)", entry)
            if m and is_checkpoint(os.path.join(self.directory, entry)):
                found.append((int(m.group(1)), os.path.join(self.directory, entry)))
        return sorted(found)

    def latest(self) -> str | None:
        """The newest complete checkpoint, to resume from (None if there is none)."""
        saved = self.saved()
        return saved[-1][1] if saved else None

    def __call__(self, trainer, extra: dict | None = None, world=None) -> str | None:
        world = world if world is not None else context_world("ModelCheckpoint")
        step = trainer.optimizer.step_count
        if step % self.every:
            return None
        if world.rank == 0:
            os.makedirs(self.directory, exist_ok=True)
        world.barrier()
        path = save_checkpoint(trainer, os.path.join(self.directory, f"{self.prefix}_{step}"),
                               extra=extra, world=world)
        if world.rank == 0:   # the new one is complete: drop the oldest beyond keep
            for _, old in self.saved()[:-self.keep]:
                remove_tree(old)
        return path
