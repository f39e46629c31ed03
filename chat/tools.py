"""Tools a chat model may call: a calculator, safe by construction.

    python -m chat.tools calc "EXPR"     prints the value, or one line `error: ...` (exit 2)

The calculator evaluates arithmetic on integers and decimals, `+ - * / // % **`, parentheses
and unary minus (and plus), with Python's semantics: integers exact, `/` a Python float, `//`
and `%` with Python's signs, `**` right-associative. It is what the model calls between
`<|tool_call_start|>` and `<|tool_call_end|>` (chat/agent.py), and what it reads back between the
tool-output tokens: the value as Python prints it, or `error: ...`.

Design decisions:
- Never `eval`: the text is parsed by `ast.parse(mode="eval")` and the tree walked against a
  whitelist (number literals, the seven binary operators, unary minus and plus). A name, an
  attribute, a call, a subscript, a string, a comprehension: anything else is refused before a
  single operation is computed, so `__import__('os')` or `().__class__` execute nothing.
- Every cost is bounded before it is paid: the input is at most 1,000 ASCII characters
  (checked before parsing; non-ASCII digits are refused, not read as numbers), parentheses and
  the tree nest at most 50 deep (the parse and the walk stay shallow), every integer, literal
  or intermediate, is at most 10^100 in magnitude, and an exponent at most 1,000 in magnitude
  with the result's size estimated from the base's bit length before `**` runs. So `9**9**9`
  is refused at once instead of running for hours, and no call lasts more than milliseconds.
- Failures are values: `calculate` returns the text the model will read (`error: division by
  zero`), and raises nothing for any input string; only the CLI turns an error into exit 2.
- This module imports nothing beyond the standard library (no torch), so the CLI answers in
  tens of milliseconds.
"""

from __future__ import annotations

import ast
import operator
import sys

MAX_CHARS = 1000
MAX_DEPTH = 50
MAX_INT = 10 ** 100
MAX_EXPONENT = 1000


class CalcError(Exception):
    """A refused or failed expression; the message is what the model reads after `error: `."""


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _checked(value):
    if isinstance(value, complex):  # e.g. (-8) ** 0.5
        raise CalcError("complex result")
    if isinstance(value, int) and abs(value) > MAX_INT:
        raise CalcError("integer larger than 10**100")
    return value


def _power(base, exponent):
    if abs(exponent) > MAX_EXPONENT:
        raise CalcError(f"exponent {exponent} is larger than {MAX_EXPONENT} in magnitude")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        # |base|**exponent >= 2**((bit_length - 1) * exponent): refuse before computing it.
        if (abs(base).bit_length() - 1) * exponent > MAX_INT.bit_length():
            raise CalcError("integer larger than 10**100")
    return base ** exponent


def _walk(node, depth: int):
    if depth > MAX_DEPTH:
        raise CalcError(f"nested more than {MAX_DEPTH} deep")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # bool and complex are not numbers here
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_walk(node.operand, depth + 1)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _walk(node.left, depth + 1), _walk(node.right, depth + 1)
        if isinstance(node.op, ast.Pow):
            return _checked(_power(left, right))
        return _checked(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.Constant):
        raise CalcError(f"not a number: {node.value!r}"[:80])
    raise CalcError(f"not allowed: {type(node).__name__.lower()} (only numbers, + - * / // % ** and parentheses)")


def evaluate(expression: str):
    """The value of `expression` (int or float); raises CalcError for anything refused or failed."""
    if not isinstance(expression, str):
        raise CalcError("the expression must be text")
    if len(expression) > MAX_CHARS:
        raise CalcError(f"expression longer than {MAX_CHARS} characters")
    if not expression.isascii():
        bad = next(c for c in expression if not c.isascii())
        raise CalcError(f"non-ASCII character {bad!r}")
    if not expression.strip():
        raise CalcError("empty expression")
    depth = deepest = 0
    for c in expression:  # before parsing: the parser's own recursion stays shallow
        depth += (c in "([{") - (c in ")]}")
        deepest = max(deepest, depth)
    if deepest > MAX_DEPTH:
        raise CalcError(f"parentheses nested more than {MAX_DEPTH} deep")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        raise CalcError("not an arithmetic expression") from None
    try:
        return _walk(tree.body, 1)
    except ZeroDivisionError:
        raise CalcError("division by zero") from None
    except OverflowError:
        raise CalcError("result too large for a float") from None
    except RecursionError:
        raise CalcError(f"nested more than {MAX_DEPTH} deep") from None


def format_value(value) -> str:
    return repr(value)  # Python's own text: exact integers, shortest round-tripping floats


def calculate(expression: str) -> str:
    """What the model reads back: the value as Python prints it, or `error: ...`. Never raises."""
    try:
        return format_value(evaluate(expression))
    except CalcError as e:
        return f"error: {e}"


TOOLS = {"calc": calculate}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in TOOLS:
        print('usage: python -m chat.tools calc "EXPR"', file=sys.stderr)
        return 2
    try:
        print(format_value(evaluate(argv[1])))
    except CalcError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
