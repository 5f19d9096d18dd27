"""Which layer each XLA thunk of a compiled ``optimize_for_inference`` program works for, and
how long each thunk ran when several ran at once; used by ``profile_compare.py``.

The compiled HLO keeps no module paths in its metadata, but its entry parameters are named
after them (``f_0___layer1___0___conv2____kernel___value``): a thunk that reads a layer's
weights, or anything computed from them alone, belongs to that layer, so a conv and its
epilogue fusions count together; a max- or mean-reduction is the max-pool or the average pool;
any other thunk (a padding, a Winograd input transform, the residual's fusion boundary) belongs
to the layer of the first thunk that reads its output.
"""

from __future__ import annotations

import collections
import itertools
import re

_PARAM = re.compile(r"f_0___(.+?)_{3,4}(kernel|bias|prepared)___")
_LINE = re.compile(r"\s*(?:ROOT )?%(\S+) = ")


def _closing(text: str, start: int) -> int:
    """Index of the parenthesis closing the one at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        depth += (text[i] == "(") - (text[i] == ")")
        if depth == 0:
            return i
    raise ValueError(f"unbalanced parentheses in HLO line: {text[:200]}")


def _entry_instructions(hlo_text: str) -> list[tuple[str, str, list[str]]]:
    """(name, whole line, operand names) of the entry computation, in program order."""
    entry = hlo_text[hlo_text.index("\nENTRY"):]
    out = []
    for line in entry.splitlines()[1:]:
        if line.startswith("}"):
            break
        match = _LINE.match(line)
        if match:
            rest = line[match.end():]  # "SHAPE opcode(operands), attributes"
            shape_end = _closing(rest, 0) + 1 if rest.startswith("(") else rest.index(" ")
            args_start = rest.index("(", shape_end)
            args = rest[args_start:_closing(rest, args_start) + 1]
            out.append((match.group(1), line, re.findall(r"%([\w.\-]+)", args)))
    return out


def _computations(hlo_text: str) -> dict[str, str]:
    blocks = re.split(r"\n(?=\S)", hlo_text)
    return {m.group(1): b for b in blocks if (m := re.match(r"(?:ENTRY )?%(\S+) ", b))}


def _module_of_param(name: str) -> tuple[str, str] | None:
    """(module path, what it holds) of a weight parameter, e.g. ('layer1.0.conv1', 'bias')."""
    match = _PARAM.match(name)
    if not match:
        return None
    return match.group(1).replace("___", "."), match.group(2)


def thunk_layers(hlo_text: str) -> dict[str, str]:
    """Entry instruction name -> the layer it is charged to (rules in the module docstring)."""
    instructions = _entry_instructions(hlo_text)
    computations = _computations(hlo_text)
    weights: dict[str, set[tuple[str, str]]] = {}  # weight-derived value -> its modules
    label: dict[str, str] = {}
    for name, line, operands in instructions:
        if " parameter(" in line:
            param = _module_of_param(name)
            if param is not None:
                weights[name] = {param}
            continue
        sources = [o for o in operands if o in weights]
        activation = [o for o in operands if o not in weights and not o.startswith("constant")]
        owners = set().union(*(weights[o] for o in sources)) if sources else set()
        if sources and not activation:  # computed from weights alone (a slice of a kernel)
            weights[name] = owners
        if owners:  # a layer's kernel beats a bias; the main path beats the downsample
            label[name] = min(owners, key=lambda mh: (mh[1] == "bias", "downsample" in mh[0],
                                                      mh[0]))[0]
            continue
        called = re.search(r"calls=%(\S+?),", line)
        body = computations.get(called.group(1), "") if called else ""
        if "reduce-window(" in body or '"resnext_flax_max_pool"' in line + body:
            label[name] = "maxpool"  # XLA's reduce_window, or the kernel's max-pool
        elif " reduce(" in body or "reduce_sum" in line:
            label[name] = "avgpool"
    consumers: dict[str, list[str]] = collections.defaultdict(list)
    for name, _, operands in instructions:
        for operand in operands:
            consumers[operand].append(name)
    for name, line, _ in reversed(instructions):
        if " parameter(" in line or name in label:
            continue
        owner = next((label[c] for c in consumers[name] if c in label), None)
        label[name] = owner if owner is not None else "other"
    return label


def shared_time(spans: list[tuple[float, float, str]]) -> dict[str, float]:
    """Each span's time, a stretch that k spans share counting 1/k to each: concurrent thunks
    split the time they overlap, and the sum is the time anything ran."""
    edges = sorted({t for start, end, _ in spans for t in (start, end)})
    out: dict[str, float] = collections.defaultdict(float)
    ordered = sorted(spans)
    active: list[tuple[float, float, str]] = []
    i = 0
    for left, right in itertools.pairwise(edges):
        while i < len(ordered) and ordered[i][0] <= left:
            active.append(ordered[i])
            i += 1
        active = [s for s in active if s[1] > left]
        for _, _, name in active:
            out[name] += (right - left) / len(active)
    return out
