"""Training progress: step, loss, held-out accuracy, lr, tokens/s and time left over a 0..1 budget.

On a terminal it is a tqdm bar; elsewhere (a log file, CI, a notebook's captured stderr) it prints one
plain line every `line_seconds`, so a long run never goes quiet.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
    """A bar (or timed lines) over the budget share (steps, tokens or wall clock, whichever binds)."""

    def __init__(self, enabled: bool = True, initial: float = 0.0, *, stream=None, line_seconds: float = 10.0):
        self.stream = stream or sys.stderr
        self.bar = None
        self.lines = enabled and not getattr(self.stream, "isatty", lambda: False)()
        if enabled and not self.lines:
            self.bar = tqdm(total=1000, initial=int(initial * 1000), unit="‰", file=self.stream,
                            bar_format="{l_bar}{bar}| {postfix}", dynamic_ncols=True, leave=True)
        self.last = int(initial * 1000)
        self.line_seconds, self.last_line = line_seconds, time.monotonic()
        self.eval_text = ""

    def set_eval(self, metrics: dict) -> None:
        """Show the latest held-out accuracy beside the training numbers."""
        if "eval_accuracy" in metrics:
            self.eval_text = f" held-out acc {metrics['eval_accuracy']:.1%}"

    def update(self, progress: float, *, step: int, loss: float, lr: float, tok_s: float, eta: float | None,
               force: bool = False) -> None:
        text = (f"step {step:,} loss {loss:.3f}{self.eval_text} lr {lr:.1e} {tok_s:,.0f} tok/s "
                f"left {format_seconds(eta)}")
        if self.lines:
            now = time.monotonic()
            if force or now - self.last_line >= self.line_seconds:
                print(f"  {progress:4.0%} {text}", file=self.stream, flush=True)
                self.last_line = now
            return
        if self.bar is None:
            return
        now = int(progress * 1000)
        self.bar.update(max(0, now - self.last))
        self.last = now
        self.bar.set_postfix_str(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
