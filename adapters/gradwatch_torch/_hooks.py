"""The hooks gradwatch adds to a model and its optimizer, and the one that says a backward pass has
ended.

Gradients are read at the end of each backward pass, once per pass whatever the number of
tensors: the model's forward hook puts a pre-hook on the ``grad_fn`` of each output, which the
backward pass reaches first; it queues an autograd-engine callback, which runs when the pass is
over. The callback re-queues itself once, so that it runs after callbacks others queued during
the pass: DistributedDataParallel's gradient all-reduce and FSDP2's reduce-scatter finish there.

The parameters' post-accumulate-grad hooks (one Python call per tensor per backward) take over
where the output hook cannot tell: a model whose loss does not come from its own forward (a
submodule called directly), a compiled forward (its hooks are traced, not run), sharded
parameters (FSDP2 computes gradients on other tensors), training without an optimizer (a missed
backward could not be noticed). Both are on until the first backward that the output hook saw;
then only the output hook stays. A backward seen to have bypassed it later brings the
parameters' hooks back for good.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ._structure import grad_fns

# Under torch.compile module hooks are traced; this tells a hook so (torch >= 2.3).
is_compiling: Callable[[], bool] = (getattr(getattr(torch, "compiler", None), "is_compiling", None)
                                    or (lambda: False))
# Whether the backward pass in progress will run an autograd node (torch's own multi-grad hook
# uses it); it raises for a leaf's node inside autograd.grad(), which accumulates nothing.
_will_execute: Callable[[Any], bool] | None = getattr(torch._C, "_will_engine_execute_node", None)


def _queue(callback: Callable[[], None]) -> None:
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def _accumulator(p: nn.Parameter) -> Any:
    """The autograd node that accumulates ``p``'s gradient. Held, so that autograd keeps using
    this one (it caches it weakly)."""
    edge = getattr(torch.autograd.graph, "get_gradient_edge", None)
    if edge is not None:
        return edge(p).node
    return p.view_as(p).grad_fn.next_functions[0][0]


class HookSet:
    """Every handle gradwatch holds on the model and the optimizer, so that ``remove()`` (or the
    collection of a dropped watcher) takes them all."""

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def add(self, handle: Any) -> Any:
        self._handles.append(handle)
        return handle

    def remove(self, handles: Iterable[Any]) -> None:
        gone = {id(h) for h in handles}
        for handle in self._handles:
            if id(handle) in gone:
                handle.remove()
        self._handles = [h for h in self._handles if id(h) not in gone]

    def clear(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __len__(self) -> int:
        return len(self._handles)


class BackwardTrigger:
    """Calls ``on_end`` once at the end of each backward pass that accumulates into the watched
    parameters (see the module docstring).

    Args:
        hooks: Where its handles are kept.
        on_end: What to call; it must not hold the watcher strongly (hooks live on the model).
        output_hook: Whether the model's output may be hooked; ``False`` keeps the parameters'
            hooks for good.
    """

    #: Modes: both hooks (until the output hook has seen a backward), the output hook only,
    #: the parameters' hooks only.
    PROBE, OUTPUT, PARAMS = "probe", "output", "params"

    def __init__(self, hooks: HookSet, on_end: Callable[[], None], *, output_hook: bool) -> None:
        self._hooks = hooks
        self._on_end = on_end
        self.mode = self.PROBE if output_hook else self.PARAMS
        self.params: list[nn.Parameter] = []
        self.hooked: set[int] = set()
        self._watched: list[nn.Parameter] = []
        self._accumulators: list[Any] = []
        self._param_handles: list[Any] = []
        self._output_handle: Any = None
        self._queued = self._requeued = self._via_output = False

    def attach(self, model: nn.Module, params: list[nn.Parameter]) -> None:
        """Hook ``params`` (those that take gradients: a frozen tensor cannot take a hook)."""
        self._hooks.remove(self._param_handles)
        self._watched = params
        #: The parameters that take gradients, as hooked.
        self.params = [p for p in params if p.requires_grad]
        self.hooked = {id(p) for p in self.params}
        ref = weakref.ref(self)
        if self.mode != self.PARAMS:
            self._accumulators = [_accumulator(p) for p in self.params]
            if self._output_handle is None:
                def on_forward(module: nn.Module, args: Any, output: Any) -> None:
                    if is_compiling() or not torch.is_grad_enabled():
                        return
                    trigger = ref()
                    if trigger is None or trigger.mode == trigger.PARAMS:
                        return
                    if isinstance(output, torch.Tensor):  # the usual case, without a set
                        if output.grad_fn is not None:
                            output.grad_fn.register_prehook(trigger._on_output_grad)
                        return
                    for fn in grad_fns(output):
                        fn.register_prehook(trigger._on_output_grad)

                self._output_handle = self._hooks.add(model.register_forward_hook(on_forward))
        if self.mode != self.OUTPUT:
            def on_grad(_param: torch.Tensor) -> None:
                trigger = ref()
                if trigger is not None and not trigger._queued:
                    trigger._queued = True
                    _queue(trigger._end)

            self._param_handles = [self._hooks.add(p.register_post_accumulate_grad_hook(on_grad))
                                   for p in self.params]

    def _on_output_grad(self, grad_outputs: Any) -> None:
        if not self._queued and self._accumulates():
            self._queued = self._via_output = True
            _queue(self._end)

    def _accumulates(self) -> bool:
        """Whether this backward pass accumulates into a watched parameter (not an
        ``autograd.grad()`` call, nor a pass restricted to other ``inputs=``)."""
        if _will_execute is None:
            return bool(self._accumulators)
        try:
            return any(_will_execute(node) for node in self._accumulators)
        except RuntimeError:  # autograd.grad() with parameters as inputs
            return False

    def _end(self) -> None:
        if not self._requeued:
            # Once more to the back of the queue: callbacks queued during the backward pass
            # (DDP's all-reduce, FSDP2's reduce-scatter) finish before gradients are read.
            self._requeued = True
            try:
                _queue(self._end)
                return
            except RuntimeError:  # not inside a backward pass after all: read them now
                pass
        self._requeued = self._queued = False
        if self._via_output:
            self._via_output = False
            if self.mode == self.PROBE:  # the output hook works for this model: it is enough
                self.mode = self.OUTPUT
                self._hooks.remove(self._param_handles)
                self._param_handles = []
        self._on_end()

    def fall_back(self, model: nn.Module) -> None:
        """A backward pass bypassed the model's output: the parameters' hooks from now on."""
        self.mode = self.PARAMS
        if self._output_handle is not None:
            self._hooks.remove([self._output_handle])
            self._output_handle = None
        self._accumulators = []
        self.attach(model, self._watched)

    def clear(self) -> None:
        """Let go of the parameters (``remove()`` has taken the hooks)."""
        self.params, self._watched, self._accumulators, self._param_handles = [], [], [], []
        self._output_handle = None
        self.hooked = set()
