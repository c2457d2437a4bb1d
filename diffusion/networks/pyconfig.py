"""Read score_sde-style `ml_collections` config files (`configs/.../*.py`) without running them.

score_sde, score-MRI and HFS-SDE describe a run by a Python file whose `get_config()` builds an
`ml_collections.ConfigDict`, usually starting from `from configs.default_X_configs import
get_default_configs`. Running such a file would run arbitrary code, and a checkpoint's config is an untrusted
input, so this module *interprets* the small language those files use instead, on their syntax tree:

- statements: `import` / `from configs.<name> import <function>` (resolved to `<root>/configs/<name>.py`, root
  being the closest folder above the file that holds it), `def` of argument-free functions, assignments
  (chained, to names and to attributes of config objects, `+=` and friends), `if` / `elif` / `else`, `return`,
  `pass`, docstrings;
- expressions: constants, names, attribute reads, tuples / lists / dicts, arithmetic, comparisons, `and` /
  `or` / `not`, `x if c else y`, and the calls `ml_collections.ConfigDict()`, `<function defined or imported
  here>()`, `torch.device(...)` (its argument, a string) and `torch.cuda.is_available()` (False: a config is
  read as on a CPU machine).

Anything else is refused with an `InputError` naming the file, line and construct. The result is the config as
nested dicts (`{'model': {...}, 'data': {...}, 'training': {...}, ...}`), tuples kept as tuples.
"""

from __future__ import annotations

import ast
import operator
import os
from pathlib import Path
from typing import Any

from lfmri_utils.errors import InputError

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_CMPOPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
           ast.NotIn: lambda a, b: a not in b, ast.Is: operator.is_, ast.IsNot: operator.is_not}
_MAX_POW = 64  # keeps `**` from building huge numbers
_MAX_DEPTH = 16  # nested get_config() calls


class _Cfg(dict):
    """A ConfigDict under construction (attribute access to its keys)."""


class _Return(Exception):
    def __init__(self, value: Any) -> None:
        self.value = value


class _Module:
    """One parsed config file: its functions and the names it imports."""

    def __init__(self, path: Path, reader: _Reader) -> None:
        self.path = path
        try:
            tree = ast.parse(path.read_text(), filename=str(path))
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError) as err:
            raise InputError(f"{path}: cannot read the config file ({type(err).__name__}: {err})") from err
        self.functions: dict[str, ast.FunctionDef] = {}
        self.imported: dict[str, tuple[_Module, str]] = {}
        self.modules: set[str] = set()
        for node in tree.body:
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                continue  # docstring
            if isinstance(node, ast.Import):
                self.modules |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.module is None or not node.module.startswith("configs."):
                    reader.refuse(path, node, f"import from {node.module!r} (only configs.<name>)")
                other = reader.module(reader.resolve(path, node.module, node))
                for alias in node.names:
                    self.imported[alias.asname or alias.name] = (other, alias.name)
            elif isinstance(node, ast.FunctionDef):
                if node.args.args or node.args.vararg or node.args.kwarg or node.args.kwonlyargs:
                    reader.refuse(path, node, f"function {node.name}() with arguments")
                self.functions[node.name] = node
            else:
                reader.refuse(path, node, f"top-level {type(node).__name__}")


class _Reader:
    def __init__(self) -> None:
        self.cache: dict[Path, _Module] = {}
        self.depth = 0

    @staticmethod
    def refuse(path: Path, node: ast.AST, what: str) -> None:
        line = getattr(node, "lineno", "?")
        raise InputError(f"{path}:{line}: a config file lfmri cannot read without running it ({what}); "
                         "give the config as JSON or YAML")

    def module(self, path: Path) -> _Module:
        path = path.resolve()
        if path not in self.cache:
            self.cache[path] = _Module(path, self)
        return self.cache[path]

    def resolve(self, path: Path, dotted: str, node: ast.AST) -> Path:
        relative = Path(*dotted.split(".")).with_suffix(".py")
        for root in path.resolve().parents:
            if (root / relative).is_file():
                return root / relative
        self.refuse(path, node, f"{dotted} not found above the file")
        raise AssertionError  # unreachable

    def call_function(self, module: _Module, name: str, node: ast.AST) -> Any:
        if name in module.imported:
            other, original = module.imported[name]
            return self.call_function(other, original, node)
        if name not in module.functions:
            self.refuse(module.path, node, f"call of unknown function {name}()")
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            self.refuse(module.path, node, "calls nested too deeply")
        try:
            self.run(module, module.functions[name].body, {})
        except _Return as ret:
            return ret.value
        finally:
            self.depth -= 1
        return None

    # statements
    def run(self, module: _Module, body: list[ast.stmt], env: dict[str, Any]) -> None:
        for node in body:
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                continue
            if isinstance(node, ast.Pass):
                continue
            if isinstance(node, ast.Assign):
                value = self.eval(module, node.value, env)
                for target in node.targets:
                    self.assign(module, target, value, env)
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                self.assign(module, node.target, self.eval(module, node.value, env), env)
            elif isinstance(node, ast.AugAssign) and type(node.op) in _BINOPS:
                current = self.eval(module, node.target, env)
                value = self.binop(module, node, current, self.eval(module, node.value, env))
                self.assign(module, node.target, value, env)
            elif isinstance(node, ast.If):
                branch = node.body if self.eval(module, node.test, env) else node.orelse
                self.run(module, branch, env)
            elif isinstance(node, ast.Expr):  # evaluated by this interpreter, so a call is refused by `call`
                self.eval(module, node.value, env)
            elif isinstance(node, ast.Return):
                raise _Return(None if node.value is None else self.eval(module, node.value, env))
            else:
                self.refuse(module.path, node, f"statement {type(node).__name__}")

    def assign(self, module: _Module, target: ast.expr, value: Any, env: dict[str, Any]) -> None:
        if isinstance(target, ast.Name):
            env[target.id] = value
        elif isinstance(target, ast.Attribute):
            owner = self.eval(module, target.value, env)
            if not isinstance(owner, _Cfg):
                self.refuse(module.path, target, f"assignment to .{target.attr} of a {type(owner).__name__}")
            owner[target.attr] = value
        else:
            self.refuse(module.path, target, f"assignment to {type(target).__name__}")

    def binop(self, module: _Module, node: ast.AST, a: Any, b: Any) -> Any:
        op = node.op  # type: ignore[attr-defined]
        if isinstance(op, ast.Pow) and isinstance(b, (int, float)) and abs(b) > _MAX_POW:
            self.refuse(module.path, node, "a power above 64")
        try:
            return _BINOPS[type(op)](a, b)
        except Exception as err:  # type errors, division by zero
            self.refuse(module.path, node, f"{type(err).__name__}: {err}")

    # expressions
    def eval(self, module: _Module, node: ast.expr, env: dict[str, Any]) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in env:
                return env[node.id]
            if node.id in ("True", "False", "None"):
                return {"True": True, "False": False, "None": None}[node.id]
            self.refuse(module.path, node, f"name {node.id!r} read before it is set")
        if isinstance(node, ast.Attribute):
            owner = self.eval(module, node.value, env)
            if not isinstance(owner, _Cfg) or node.attr not in owner:
                self.refuse(module.path, node, f"read of .{node.attr} before it is set")
            return owner[node.attr]
        if isinstance(node, (ast.Tuple, ast.List)):
            items = [self.eval(module, e, env) for e in node.elts]
            return tuple(items) if isinstance(node, ast.Tuple) else items
        if isinstance(node, ast.Dict) and all(k is not None for k in node.keys):
            return {self.eval(module, k, env): self.eval(module, v, env)  # type: ignore[arg-type]
                    for k, v in zip(node.keys, node.values, strict=True)}
        if isinstance(node, ast.UnaryOp):
            value = self.eval(module, node.operand, env)
            if isinstance(node.op, ast.USub):
                return -value
            if isinstance(node.op, ast.UAdd):
                return +value
            if isinstance(node.op, ast.Not):
                return not value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = self.eval(module, node.left, env), self.eval(module, node.right, env)
            return self.binop(module, node, left, right)
        if isinstance(node, ast.BoolOp):
            values = (self.eval(module, v, env) for v in node.values)
            return all(values) if isinstance(node.op, ast.And) else any(values)
        if isinstance(node, ast.Compare) and all(type(op) in _CMPOPS for op in node.ops):
            left = self.eval(module, node.left, env)
            for op, comparator in zip(node.ops, node.comparators, strict=True):
                right = self.eval(module, comparator, env)
                if not _CMPOPS[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            test = self.eval(module, node.test, env)
            return self.eval(module, node.body if test else node.orelse, env)
        if isinstance(node, ast.Call):
            return self.call(module, node, env)
        self.refuse(module.path, node, f"expression {type(node).__name__}")
        raise AssertionError  # unreachable

    def call(self, module: _Module, node: ast.Call, env: dict[str, Any]) -> Any:
        name = ast.unparse(node.func)
        if node.keywords and name != "torch.device":
            self.refuse(module.path, node, f"call {name}(...) with keyword arguments")
        if name in ("ml_collections.ConfigDict", "ConfigDict") and not node.args:
            return _Cfg()
        if name == "torch.cuda.is_available" and not node.args:
            return False
        if name == "torch.device" and len(node.args) == 1:
            return str(self.eval(module, node.args[0], env))
        if isinstance(node.func, ast.Name) and not node.args:
            return self.call_function(module, node.func.id, node)
        self.refuse(module.path, node, f"call {name}(...)")
        raise AssertionError  # unreachable


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def read_py_config(path: str | os.PathLike, function: str = "get_config") -> dict[str, Any]:
    """The config a score_sde-style `.py` config file's `get_config()` builds, as nested dicts, without
    running the file (see the module docstring for what is understood). InputError (one line, naming the file
    and the line) for anything else, an unreadable file, or a file without `get_config`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such config file")
    reader = _Reader()
    module = reader.module(path)
    if function not in module.functions and function not in module.imported:
        raise InputError(f"{path}: no {function}() in the config file")
    config = reader.call_function(module, function, ast.Module(body=[], type_ignores=[]))
    if not isinstance(config, dict):
        raise InputError(f"{path}: {function}() does not return a config (got {type(config).__name__})")
    return _plain(config)
