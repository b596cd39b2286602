"""The Slicer module's parameter node fields, read from ``FMSegSlicer.py`` without Slicer (the module imports
``qt`` and ``slicer.parameterNodeWrapper``, which exist only inside Slicer).

The module's own parameter node class body runs, with the module's FMSegCore and typing imports, stand-in classes
for the names it imports from ``slicer`` (MRML node classes) and stand-ins for ``Choice`` and ``WithinRange`` that
record their arguments: defaults and ranges are the values the module computes, not a copy of them.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

MODULE_FILE = Path(__file__).resolve().parents[1] / "FMSegSlicer" / "FMSegSlicer.py"


class Choice:
    """Records Slicer's ``Choice(choices)``."""

    def __init__(self, choices: Any) -> None:
        self.choices = list(choices)


class WithinRange:
    """Records Slicer's ``WithinRange(minimum, maximum)``."""

    def __init__(self, minimum: Any, maximum: Any) -> None:
        self.range = (minimum, maximum)


def _decorator_name(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def parameter_node_fields(module_file: Path = MODULE_FILE) -> dict[str, dict[str, Any]]:
    """{field: {"type": name, "choices": [...] or None, "range": (min, max) or None, "default": value or None}} of
    the module's ``@parameterNodeWrapper`` class, in the order the class declares them."""
    tree = ast.parse(module_file.read_text())
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef)
               and any(_decorator_name(d) == "parameterNodeWrapper" for d in node.decorator_list)]
    assert [c.name for c in classes] == ["FMSegSlicerParameterNode"]
    namespace: dict[str, Any] = {"Choice": Choice, "WithinRange": WithinRange}
    body: list[ast.stmt] = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("FMSegCore", "typing"):
            body.append(node)
        elif isinstance(node, ast.ImportFrom) and node.module == "slicer":
            namespace.update({alias.asname or alias.name: type(alias.name, (), {}) for alias in node.names})
    node_class = classes[0]
    node_class.decorator_list = []
    body.append(node_class)
    exec(compile(ast.Module(body=body, type_ignores=[]), str(module_file), "exec", dont_inherit=True), namespace)
    cls = namespace[node_class.name]
    fields = {}
    for name, annotation in cls.__annotations__.items():
        base, extras = annotation, ()
        if get_origin(annotation) is Annotated:
            base, *extras = get_args(annotation)
        info: dict[str, Any] = {"type": base.__name__, "choices": None, "range": None,
                                "default": getattr(cls, name, None)}
        for extra in extras:
            if isinstance(extra, Choice):
                info["choices"] = extra.choices
            elif isinstance(extra, WithinRange):
                info["range"] = extra.range
        fields[name] = info
    return fields
