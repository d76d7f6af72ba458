"""User prompt datasets: JSONL/Parquet/CSV/Arrow files (or ``save_to_disk`` folders) as a prompt source.

``config.py`` the ``data`` section (``DataConfig``); ``files.py`` reading files
with Hugging Face ``datasets`` (memory-mapped Arrow); ``prompts.py`` rendering
a row's prompt (string or chat messages) into the policy's text and counting
its tokens; ``source.py`` the epoch-shuffled ``DatasetPrompts`` stream the
coordinator hands out and the held-out rows. Imports ``actors.types`` and
``actors.validation`` only (no ``ray``, no ``actors.runtime``).
"""
