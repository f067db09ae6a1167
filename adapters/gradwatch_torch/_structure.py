"""What a model really is, read from one forward pass: skip connections in the autograd graph.

Module names do not say whether a model has residual connections: a transformer block writes
``hidden = residual + attn(hidden)`` inline in ``forward``. The autograd graph does. During the
first forward pass with gradients enabled, every module that holds parameterised submodules
notes the ``grad_fn`` of its tensor inputs and of its output; at the end of that pass each such
module is asked whether its output graph contains an addition ``x + f(x)``: one operand an input
of the module, the other computed from that same input. The hooks then remove themselves, so
later steps pay nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

#: Autograd nodes visited per module at most (a GPT-2 block has a few hundred).
NODE_LIMIT = 5000


def _grad_fns(obj: Any, out: set, depth: int = 0) -> None:
    """The grad_fn of every tensor in ``obj`` (tensors, tuples, lists, dicts, model outputs)."""
    if isinstance(obj, torch.Tensor):
        if obj.grad_fn is not None:
            out.add(obj.grad_fn)
    elif depth < 3 and isinstance(obj, (list, tuple)):
        for x in obj:
            _grad_fns(x, out, depth + 1)
    elif depth < 3 and isinstance(obj, dict):
        for x in obj.values():
            _grad_fns(x, out, depth + 1)


def grad_fns(obj: Any) -> set:
    """The ``grad_fn`` of every tensor in a module's output (or inputs)."""
    out: set = set()
    _grad_fns(obj, out)
    return out


def _reaches(node: Any, targets: set, limit: int) -> bool:
    stack, seen = [node], set()
    while stack and len(seen) < limit:
        n = stack.pop()
        if n in targets:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(fn for fn, _ in n.next_functions if fn is not None)
    return False


def has_skip(outputs: set, inputs: set, limit: int = NODE_LIMIT) -> bool:
    """True when the graph from ``outputs`` back to ``inputs`` adds an input to something
    computed from it (a residual connection)."""
    stack, seen = list(outputs), set()
    while stack and len(seen) < limit:
        node = stack.pop()
        if node in seen or node in inputs:
            continue
        seen.add(node)
        nexts = [fn for fn, _ in node.next_functions if fn is not None]
        if "Add" in type(node).__name__ and len(nexts) >= 2:
            direct = [fn for fn in nexts if fn in inputs]
            computed = [fn for fn in nexts if fn not in inputs
                        and type(fn).__name__ != "AccumulateGrad"]
            if direct and any(_reaches(fn, inputs, limit) for fn in computed):
                return True
        stack.extend(nexts)
    return False


def probe_residual(model: nn.Module, on_result: Callable[[bool], None],
                   is_compiling: Callable[[], bool]) -> list[Any]:
    """Hooks that call ``on_result(found)`` once, after the first forward pass with gradients,
    and then remove themselves. Returns the hook handles (for the watcher's ``remove()``)."""
    blocks = [m for m in model.modules()
              if sum(1 for c in m.modules() if any(True for _ in c.parameters(recurse=False))) >= 2]
    if model not in blocks:
        blocks.append(model)
    seen: list[tuple[set, set]] = []
    handles: list[Any] = []

    def done() -> None:
        for h in handles:
            h.remove()

    def on_block(module, args, kwargs, output) -> None:
        if is_compiling() or not torch.is_grad_enabled():
            return
        inputs: set = set()
        _grad_fns(args, inputs)
        _grad_fns(kwargs, inputs)
        outputs: set = set()
        _grad_fns(output, outputs)
        if outputs and inputs:
            seen.append((outputs, inputs))

    def on_root(module, args, kwargs, output) -> None:
        if is_compiling() or not torch.is_grad_enabled():
            return
        outputs: set = set()
        _grad_fns(output, outputs)
        if not outputs:
            seen.clear()
            return  # no graph (a frozen model, an eval pass): wait for a training forward
        found = any(has_skip(out, inp) for out, inp in seen)
        seen.clear()
        done()
        on_result(found)

    for m in blocks:
        if m is not model:
            handles.append(m.register_forward_hook(on_block, with_kwargs=True))
    # The root's hook last: it runs after every block's in the same pass.
    handles.append(model.register_forward_hook(on_block, with_kwargs=True))
    handles.append(model.register_forward_hook(on_root, with_kwargs=True))
    return handles
