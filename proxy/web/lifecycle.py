"""What the process is doing, for readiness and the status page: set by ``serve`` when a
signal asks it to stop, and by the app's shutdown."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Lifecycle:
    started: float = field(default_factory=time.time)
    stopping: bool = False
