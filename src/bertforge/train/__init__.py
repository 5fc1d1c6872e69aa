"""The training engine every workflow shares: the Trainer (`loop.py`, with its checkpoint state and run folder in
`resume.py` and its settings in `settings.py`), what a run does under faults
(`faults.py`), checkpoints (`checkpoint.py`), optimizers and schedules (`optim.py`, `lamb.py`, `offload.py`),
torchrun plumbing (`distributed.py`, `fsdp.py`), the batch iterator (`batches.py`) and the progress line
(`progress.py`). The workflows that
use it live in `bertforge.workflows`."""
