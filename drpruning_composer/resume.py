"""Make a restarted run resume from its newest complete checkpoint.

Composer writes a checkpoint in place (`open(name, 'wb')`) and then moves the `latest-rank0.pt` symlink by removing
and re-creating it. A run killed in between leaves a partial or unlinked checkpoint newer than `latest`, or no
`latest` at all. On restart, Composer's checkpoint saver then refuses to run ("may conflict with a future
checkpoint"), or autoresume starts again from batch 0. `prepare_resume` repairs the folder before training:
`latest-rank0.pt` points at the newest complete checkpoint, and newer or incomplete ones are moved to
`interrupted/`. Complete means, for a monolithic `.pt`, a readable zip directory (torch.save writes it last) and,
for a sharded checkpoint folder, its `.metadata` file (written last by torch.distributed.checkpoint).
"""

from __future__ import annotations

import logging
import os
import re
import uuid
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

LATEST = 'latest-rank0.pt'  # llm-foundry's name for monolithic checkpoints; 'latest-sharded-rank0' for sharded ones
INTERRUPTED = 'interrupted'
DEFAULT_SAVE_FILENAME = 'ep{epoch}-ba{batch}-rank{rank}.pt'
# Checkpoints saved under llm-foundry's default `save_filename`: `ep{epoch}-ba{batch}-rank{rank}.pt` files, or
# `ep{epoch}-ba{batch}` folders of a sharded checkpoint.
_CHECKPOINT = re.compile(r'^ep(?P<epoch>\d+)-ba(?P<batch>\d+)(?:-rank(?P<rank>\d+)\.pt)?$')


def checkpoint_batch(name: str) -> int | None:
    """The batch count in a default Composer checkpoint name, or None for any other name."""
    match = _CHECKPOINT.match(name)
    return None if match is None else int(match['batch'])


def is_complete(path: Path) -> bool:
    """Whether a checkpoint file or sharded checkpoint folder was written to the end."""
    if path.is_dir():
        return (path / '.metadata').is_file()
    return zipfile.is_zipfile(path)


def _rank0_checkpoints(folder: Path) -> dict[int, Path]:
    """batch -> the rank-0 checkpoint (file or sharded folder) saved at that batch."""
    found = {}
    for entry in folder.iterdir():
        match = _CHECKPOINT.match(entry.name)
        if match and (entry.is_dir() or match['rank'] == '0'):
            found[int(match['batch'])] = entry
    return found


def _move_aside(entry: Path, folder: Path) -> None:
    target_dir = folder / INTERRUPTED
    target_dir.mkdir(exist_ok=True)
    target = target_dir / entry.name
    if target.exists():
        target = target_dir / f'{entry.name}.{uuid.uuid4().hex[:8]}'
    try:
        os.rename(entry, target)
    except FileNotFoundError:  # another node's process moved it first (shared filesystem)
        return
    log.warning('resume: moved the unfinished checkpoint %s to %s', entry, target)


def _point_latest(latest: Path, checkpoint: Path | None) -> None:
    if latest.exists() and not latest.is_symlink():
        log.warning('resume: %s is a file, not a symlink; left as it is', latest)
        return
    if checkpoint is None:
        latest.unlink(missing_ok=True)
        return
    if latest.is_symlink() and os.readlink(latest) == checkpoint.name:
        return
    tmp = latest.with_name(f'.{latest.name}.{uuid.uuid4().hex[:8]}')
    os.symlink(checkpoint.name, tmp)
    os.replace(tmp, latest)  # atomic: `latest` always names a complete checkpoint
    log.warning('resume: %s now points at %s, the newest complete checkpoint', latest, checkpoint.name)


def prepare_resume(save_folder: str | os.PathLike, latest_name: str = LATEST) -> Path | None:
    """Point `latest_name` at the newest complete checkpoint and move newer or incomplete ones aside.

    Only checkpoints with llm-foundry's default names are considered; a folder without any is left untouched.
    Returns the checkpoint a restart will resume from (None: none, the run starts at batch 0). Safe to call from
    several processes at once: every step is idempotent and the symlink is replaced atomically.
    """
    folder = Path(save_folder)
    checkpoints = _rank0_checkpoints(folder) if folder.is_dir() else {}
    if not checkpoints:
        return None
    complete = [batch for batch, path in checkpoints.items() if is_complete(path)]
    resume_batch = max(complete, default=None)
    for entry in sorted(folder.iterdir()):
        batch = checkpoint_batch(entry.name)
        if batch is not None and (resume_batch is None or batch > resume_batch):
            _move_aside(entry, folder)
    resume_from = None if resume_batch is None else checkpoints[resume_batch]
    _point_latest(folder / latest_name, resume_from)
    return resume_from
