"""(Seat) User prompt datasets: JSONL/Parquet/Arrow files as a prompt source.

Empty today: prompts come from the built-in tasks (``actors.tasks``). Datasets
join here (no ``ray``, no ``actors.runtime``).
"""
