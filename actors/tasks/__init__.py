"""Built-in verifiable tasks: prompt streams, labelled and held-out sets, verifiers.

``base.py`` the seeded ``Task`` and ``Example``; ``reverse.py`` and
``arithmetic.py`` the two tasks; ``chat.py`` ``ChatTemplate``; ``registry.py``
``make_task``; ``evaluate.py`` greedy held-out accuracy. Imports ``actors.types``
only (no ``ray``, no ``actors.runtime``).
"""
