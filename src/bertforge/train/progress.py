"""The training progress bar: step, loss, lr, tokens/s and ETA over a 0..1 budget (tqdm)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
    """A bar over the budget share (steps, tokens or wall clock, whichever binds)."""

    def __init__(self, enabled: bool = True, initial: float = 0.0):
        self.bar = None
        if enabled:
            self.bar = tqdm(total=1000, initial=int(initial * 1000), unit="‰", file=sys.stderr,
                            bar_format="{l_bar}{bar}| {postfix}", dynamic_ncols=True, leave=True)
        self.last = int(initial * 1000)

    def update(self, progress: float, *, step: int, loss: float, lr: float, tok_s: float, eta: float | None) -> None:
        if self.bar is None:
            return
        now = int(progress * 1000)
        self.bar.update(max(0, now - self.last))
        self.last = now
        self.bar.set_postfix_str(f"step {step} loss {loss:.4f} lr {lr:.2e} {tok_s:,.0f} tok/s eta {format_seconds(eta)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
