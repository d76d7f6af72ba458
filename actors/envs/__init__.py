"""Multi-turn environments and the tools they run, in plain Python.

``base.py`` the contract (``Environment``: ``reset`` / ``step`` / ``finish``,
``StepResult``); ``tools.py`` ``ToolEnvironment`` (``<NAME>ARG</NAME>`` calls);
``calculator.py`` the arithmetic tool (a parser, never ``eval``); ``sandbox.py``
the ``python`` tool in a bubblewrap sandbox; ``config.py`` the ``env`` section
and ``make_env``. The rollout worker drives episodes through them
(``actors.rollout.episodes``). Imports no ``ray``, no ``actors.runtime`` and no
torch: environments run inside rollout workers and, later, behind gRPC servers.
"""
