"""Built-in verifiers: reward functions that check real answers, usable by name.

``text.py``: ``exact_match`` (normalised comparison with ``answer``), ``Regex``
(``regex``), ``Format`` (``format``), ``Length`` (``length``); ``mathverify.py``:
``MathVerifier`` (``math``, answer equivalence with HF's math-verify, run in a
child process with a per-sample deadline); ``mathchild.py`` the child's loop
(the only module that imports ``math_verify``).

Each verifier with arguments is a class: ``Cls(**function_args)`` checks its
arguments (``ConfigError`` whose message starts with the argument's name) and
returns the reward function ``fn(prompts, completions, **metadata)``. A score is
a float, or an ``actors.types.Excluded`` for a sample that could not be verified
(e.g. a math verification that ran past its deadline).

May import: the standard library, ``math_verify`` (child process only),
``actors.types``, ``actors.validation``; never ``ray``.
"""
