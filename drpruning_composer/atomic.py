"""Write a folder all at once: readers see the old folder or the complete new one, never a half-written one."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out` to fill; on success it becomes `out`, on any error it is removed.

    An existing `out` is replaced only with `overwrite`, and is moved aside before the rename (not deleted first),
    so a crash never leaves neither folder.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f'{out} already exists (pass overwrite to replace it)')
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.tmp-', dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f'.{out.name}.old-{uuid.uuid4().hex[:8]}')
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
