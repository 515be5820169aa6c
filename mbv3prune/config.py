"""UPPER_CASE constants at the top of a script, overridable as ``--NAME=value`` (after nanoGPT's configurator).

A script defines its constants, one comment each, then ends with ``config.run(main, globals())``:
``--NAME=value`` replaces a constant (the value is a Python literal; a bare word is a string), an unknown
name or a value of another type is refused with one line listing the valid names, and ``--help`` prints
every constant with its value and comment. ``DEBUG=True`` shows tracebacks of the project's errors. A
script run from the command line keeps glibc's heap (``heap.keep_heap``).
"""

import ast
import io
import os
import sys
import tokenize

from .errors import PruneError, run_main
from .heap import keep_heap


def constant_names(namespace):
    """The script's constants, in order: UPPER_CASE names assigned between its two ``# ---`` rules (or, in a
    file without rules, every module-level UPPER_CASE literal)."""
    declared = _declared_names(namespace.get("__file__", ""))
    names = declared if declared is not None else [k for k in namespace if k.isupper() and not k.startswith("_")]
    return [k for k in names if k in namespace and isinstance(namespace[k], _LITERALS)]


_LITERALS = (bool, int, float, str, list, tuple, dict, type(None))


def _declared_names(path):
    """UPPER_CASE names assigned between the first two ``# ---`` lines of ``path``; None without such rules."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError:
        return None
    rules = [i + 1 for i, line in enumerate(lines) if line.startswith("# ---")]
    if len(rules) < 2:
        return None
    tree = ast.parse("\n".join(lines))
    return [
        node.targets[0].id
        for node in tree.body
        if isinstance(node, ast.Assign)
        and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name)
        and rules[0] < node.lineno < rules[1]
        and node.targets[0].id.isupper()
    ]


def constant_comments(path):
    """{NAME: comment} for module-level ``NAME = value  # comment`` lines of a source file."""
    try:
        source = open(path, encoding="utf-8").read()
    except OSError:
        return {}
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments.setdefault(tok.start[0], tok.string.lstrip("#").strip())
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            lines = range(node.lineno, node.end_lineno + 1)
            found[node.targets[0].id] = next((comments[i] for i in lines if i in comments), "")
    return found


def parse_value(raw, default, name):
    """The override ``raw`` as a value of the default's type, or a PruneError naming the constant."""
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = raw  # a bare word is a string
    if default is None or value is None and isinstance(default, str):
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, str):
        return value if isinstance(value, str) else raw
    elif isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return type(default)(value)
    elif isinstance(default, dict):
        if isinstance(value, dict):
            return value
    raise PruneError(f"--{name}={raw}: expected a {type(default).__name__} like {default!r}")


COMMON = (
    "DATA_DIR",
    "RUN_DIR",
    "MODEL_ARCH",
    "CHECKPOINT",
    "IMAGE_SIZE",
    "BATCH_SIZE",
    "NUM_WORKERS",
    "DEVICE",
    "SEED",
    "DEBUG",
)  # the README's common constants: every stage accepts them, so one set of flags serves the chain


def apply_overrides(namespace, argv):
    """Apply ``--NAME=value`` arguments to ``namespace``; return the resolved {NAME: value}.

    A common constant (``COMMON``) that this script does not use is accepted and ignored; other unknown
    names are refused."""
    names = constant_names(namespace)
    for arg in argv:
        key, sep, raw = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if not sep or not key:
            raise PruneError(f"argument {arg!r} is not of the form --NAME=value (valid names: {', '.join(names)})")
        if key not in names and key in COMMON:
            continue
        if key not in names:
            raise PruneError(f"unknown constant --{key} (valid names: {', '.join(names)})")
        namespace[key] = parse_value(raw, namespace[key], key)
    return {k: namespace[k] for k in names}


def help_text(namespace):
    """Every constant with its current value and comment, under the script's docstring."""
    comments = constant_comments(namespace.get("__file__", ""))
    lines = [(namespace.get("__doc__") or "").strip(), "", "Constants (override as --NAME=value):"]
    for k in constant_names(namespace):
        lines.append(f"  {k} = {namespace[k]!r}" + (f"  # {comments[k]}" if comments.get(k) else ""))
    return "\n".join(lines)


def run(main, namespace, argv=None):
    """Resolve the script's constants from ``argv`` (default ``sys.argv[1:]``: from the command line, which
    also keeps glibc's heap), then run ``main(cfg)``."""
    if argv is None:  # from the command line: the process is the script's (not, say, a test run's)
        keep_heap()  # no page faults on every batch's activations (mbv3prune.heap)
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(help_text(namespace))
        return
    debug = any(a.replace(" ", "") == "--DEBUG=True" for a in argv)
    run_main(lambda: main(apply_overrides(namespace, argv)), debug=debug)


def path_or_default(cfg, name, filename):
    """``cfg[name]`` when set, else ``RUN_DIR/filename``: how stages chain without editing."""
    return cfg[name] or os.path.join(cfg["RUN_DIR"], filename)
