"""(Seat) Multi-turn environments and tools for episodes of several turns.

Empty today: every episode is one completion. Environments join here (plain
Python, no ``ray``, no ``actors.runtime``).
"""
