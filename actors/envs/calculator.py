"""The ``calculator`` tool: arithmetic on numbers, parsed, never ``eval``-ed.

Python's own parser (``ast.parse(..., mode="eval")``) turns the expression into a
tree; ``evaluate`` walks it and accepts only numbers, parentheses, unary +/- and
the binary operators below. Anything else (names, calls, attributes, strings,
comprehensions) is a ``ToolError`` naming what was refused. Sizes are bounded so
a call cannot hang the worker: at most ``MAX_CHARS`` characters, exponents up to
``MAX_EXPONENT``, results up to ``MAX_DIGITS`` digits.
"""

from __future__ import annotations

import ast
import math
import operator

MAX_CHARS = 200
MAX_EXPONENT = 64
MAX_DIGITS = 60

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class ToolError(ValueError):
    """A tool call the tool refused or could not complete; its message becomes the observation."""


def calculate(expression: str) -> str:
    """The value of ``expression`` as text: an integer exactly, a float to 12 significant digits."""
    text = expression.strip().replace("×", "*").replace("÷", "/").replace("^", "**")
    if not text:
        raise ToolError("empty expression")
    if len(text) > MAX_CHARS:
        raise ToolError(f"expression longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(text.replace(",", ""), mode="eval")
    except SyntaxError:
        raise ToolError(f"cannot parse {expression.strip()!r}") from None
    value = evaluate(tree.body)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ToolError("the result is not a finite number")
        if value.is_integer() and abs(value) < 10**15:
            return str(int(value))
        return f"{value:.12g}"
    return str(value)


def evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = evaluate(node.left), evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ToolError(f"exponent {right} is larger than {MAX_EXPONENT}")
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        except OverflowError:
            raise ToolError("the result is too large") from None
        if isinstance(value, complex):
            raise ToolError("the result is not a real number")
        if isinstance(value, int) and abs(value) >= 10**MAX_DIGITS:
            raise ToolError(f"the result has more than {MAX_DIGITS} digits")
        return value
    raise ToolError(f"only numbers and + - * / // % ** ( ) are allowed, not {type(node).__name__}")
