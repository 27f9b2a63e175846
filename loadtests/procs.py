"""Starting this repository's own modules as worker processes, spoken to over stdin/stdout."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parent.parent


async def spawn_module(module: str, *args: str) -> asyncio.subprocess.Process:
    """``python -m module args`` from the repository root, importable whatever the caller's
    working directory, with pipes on stdin and stdout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )  # fmt: skip
