"""How this process was launched, from the environment alone (no torch import, so the CLI can ask before
loading anything): under torchrun, RANK and WORLD_SIZE > 1 are set for every worker."""

from __future__ import annotations

import os


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_rank() -> int:
    """This process's rank as torchrun set it (valid before the process group exists and after it is gone;
    0 without torchrun)."""
    return int(os.environ["RANK"]) if launched_by_torchrun() else 0
