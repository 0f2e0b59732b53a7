"""The method registry is the one home of a merge method's behaviour.

Outside `evomerge/merge/` no module compares anything with a method's name, family or
sparsification (it asks the method's entry instead); the set of methods the fused GPU kernel runs
is written once, in the registry; and every entry is complete enough for the genome, preflight and
the spec to use it without knowing which method it is.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from evomerge.merge.config import MergeConfig
from evomerge.merge.registry import METHODS, MethodInfo

PACKAGE = Path(__file__).resolve().parents[1] / "evomerge"
MERGE = PACKAGE / "merge"
REGISTRY = MERGE / "registry.py"
# What an entry holds (MethodInfo, the sparsification names as a type) is the registry's other half.
ENTRY_TYPE = MERGE / "method_info.py"
FAMILIES = {m.family for m in METHODS.values()}
SPARSIFICATIONS = {m.sparsification for m in METHODS.values()} - {None}
METHOD_WORDS = set(METHODS) | FAMILIES | SPARSIFICATIONS
# Attributes that say which method something is: comparing them is branching on the method.
IDENTITY_ATTRIBUTES = {"family", "sparsification", "merge_method"}


def _strings_in(node: ast.AST) -> set[str]:
    """The string constants of an operand: itself, or the items of a literal tuple, list or set."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return {item.value for item in items if isinstance(item, ast.Constant) and isinstance(item.value, str)}


def method_branches(source: str) -> list[tuple[int, str]]:
    """(line, code) of every comparison with a method's name, family or sparsification in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            named = any(_strings_in(operand) & METHOD_WORDS for operand in operands)
            identity = any(isinstance(o, ast.Attribute) and o.attr in IDENTITY_ATTRIBUTES for o in operands)
            if named or identity:
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.match_case) and _strings_in(node.pattern) & METHOD_WORDS:
            found.append((node.pattern.lineno, ast.unparse(node.pattern)))
    return found


def test_the_scan_finds_a_branch_on_a_method():
    assert method_branches('if spec.merge.method == "slerp":\n    pass') != []
    assert method_branches('ok = info.sparsification in (None, "magnitude")') != []
    assert method_branches("ok = method.family != wanted") != []
    assert method_branches('if spec.merge.method in ("ties", "della"):\n    pass') != []
    assert method_branches("ok = method.experts_problem(3) is None") == []


def test_no_module_outside_merge_branches_on_a_method():
    branches = {
        f"{path.relative_to(PACKAGE.parent)}:{line}": code
        for path in sorted(PACKAGE.rglob("*.py"))
        if MERGE not in path.parents
        for line, code in method_branches(path.read_text())
    }
    assert branches == {}, "ask the method's entry in evomerge/merge/registry.py instead"


def _fused_sets(source: str) -> list[str]:
    """Literal collections of two or more sparsification rules (the shape of a fused-capable set)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            keys = node.elts
        elif isinstance(node, ast.Dict):
            keys = [key for key in node.keys if key is not None]
        else:
            continue
        if len(_strings_in(ast.Tuple(elts=keys)) & SPARSIFICATIONS) >= 2:
            found.append(ast.unparse(node))
    return found


def test_the_fused_capable_set_is_written_once_in_the_registry():
    outside = {
        str(path.relative_to(PACKAGE.parent)): sets
        for path in sorted(PACKAGE.rglob("*.py"))
        if path not in (REGISTRY, ENTRY_TYPE) and (sets := _fused_sets(path.read_text()))
    }
    assert outside == {}
    setters = [p for p in PACKAGE.rglob("*.py") if p != REGISTRY and "fused_trim=" in p.read_text()]
    assert setters == []


def test_the_fused_path_and_the_memory_plan_agree_on_which_methods_fuse():
    from evomerge.merge.fused.sources import fused_unavailable_reason
    from evomerge.merge.memory_plan import is_fused

    for method in METHODS.values():
        kernel_refuses = "has no fused kernel" in (fused_unavailable_reason("cuda", method) or "")
        assert is_fused(method, on_gpu=True) is not kernel_refuses, method.name
    assert {m.name for m in METHODS.values() if m.fused} == {"task_arithmetic", "ties", "dare_ties", "dare_linear"}


@pytest.mark.parametrize("method", METHODS.values(), ids=list(METHODS))
def test_every_entry_says_what_it_searches_and_how_it_merges_by_default(method: MethodInfo):
    assert set(method.default_searched) <= set(method.tunable)
    assert method.interpolation is None or method.interpolation in method.shared_params
    for version in (1, 2, 3):
        searched = method.default_parameters({}, version)
        assert bool(searched) == method.searchable and set(searched) <= set(method.tunable)
        for param in searched:
            low, high = method.search_bounds(param, {}, version)
            assert low < high
    experts = ["/e0"] if method.experts_exactly == 1 else ["/e0", "/e1"]
    config = MergeConfig.model_validate(method.default_merge("/base", experts, "float32"))
    assert config.merge_method == method.name
    assert (config.base_model is not None) == method.uses_base
    assert method.experts_problem(len(experts)) is None


def test_default_merge_labels_name_one_method_each():
    labels = [m.default_label for m in METHODS.values()]
    assert len(set(labels)) == len(labels)
    assert all(label.startswith(name) for name, label in zip(METHODS, labels, strict=True))


def test_a_method_that_takes_one_expert_says_so_in_the_spec_and_in_a_slice():
    slerp = METHODS["slerp"]
    assert slerp.experts_problem(2) == (
        "slerp merges the base with exactly one expert, got 2; use ties or task_arithmetic for more"
    )
    assert slerp.slice_problem(3) == "slerp merges exactly two models (the base and one other), got 3"
    assert METHODS["ties"].experts_problem(5) is None
