"""Watching a run: TensorBoard (and optionally Weights & Biases) scalars, sample completions, report.png.

``config.py`` is the ``watch`` config section (``WatchConfig``); ``writers.py`` sends each
metrics row and evaluation to the configured backends (``MetricWriters``); ``samples.py``
logs a few prompt/completion/reward rows every N steps (``SampleLog``); ``plot.py`` draws
``RUN_DIR/report.png`` from the run's files (``draw_report``; ``fleetrl report`` runs it on a
finished run or one still in progress); ``jsonl.py`` reads and cuts back the run's
``*.jsonl`` files. The driver's ``RunReport`` (``learner/driver/report.py``) uses all of it.

Everything here works on files in the run directory and nothing else: no ``ray``, no
``actors.runtime``, no actors (lazy imports included), so it runs in the driver, in
``fleetrl report`` on a laptop, and in unit tests without a cluster.
"""
