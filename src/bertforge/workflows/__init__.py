"""The workflows built on the training engine (`bertforge.train`): pretraining (`pretrain.py`), fine-tuning
(`finetune.py` with the task adapters in `tasks.py`), held-out evaluation (`evaluate.py`), sentence models
(`sentence.py`, `sentence_losses.py`), distillation (`distill.py`, `distill_model.py`) and the one-batch
sanity check (`sanity.py`), each with its argument table and runner (`*_cli.py`). The engine never
imports from here."""
