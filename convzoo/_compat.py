"""Every private torch and Triton API convzoo touches, in one place: each probed once at import (and again by
:func:`probe`), each with a public fallback that is slower, never wrong, and never an import error.

=================  ==================================================  =============================================
fast path          private API                                         fallback when it is missing or differs
=================  ==================================================  =============================================
``plain_eager``    ``torch._C`` dispatch-key sets and the TLS queries  every call goes through the dispatcher (the
                   for modes, transforms, Python dispatcher, profiler  custom op), as under any mode
``c_apply``        ``torch._C._FunctionBase.apply``                    ``Function.apply`` (its Python preamble)
``forward_ad_      ``torch._library.autograd.make_autograd_impl`` and  not installed: a direct
guard``            ``Library.impl(..., allow_override=True)``          ``torch.ops.convzoo.*`` call drops a forward-
                                                                       mode tangent, and the import warns once (the
                                                                       entry points in ``convzoo.functional`` still
                                                                       carry them)
``aten_im2col``    ``torch._C._nn.im2col`` / ``col2im``                :mod:`convzoo.reference` (same bits)
``graph_task``     ``torch._C._current_graph_task_id``                 forwards recomputed by activation
                                                                       checkpointing cannot be told apart:
                                                                       ``KFACFactors`` and ``DynamicSparseConv``
                                                                       warn at construction that they count
``interpreted``    ``triton.runtime.interpreter.InterpretedFunction``  "not a ``triton.runtime.JITFunction``"
``int8_mm``        ``torch._int_mm`` (int8 × int8 → int32, CPU)        the coactivation count's CPU path runs its
                                                                       fp32 weight-gradient convolution (same
                                                                       counts, 2-3× slower)
=================  ==================================================  =============================================

:func:`convzoo.debug_info` reports which fast paths are active on the running torch and Triton. Each probe does
more than look the name up: it checks the API behaves as convzoo relies on (a plain tensor's dispatch keys are
the set it expects, im2col gives the reference's bits), so a torch that changed one falls back instead of
running it wrongly.

Also here, as the one home of version differences: :func:`sym_max` (torch 2.11's Dynamo cannot trace
``torch.sym_max`` of two plain ints under ``fullgraph=True``; newer ones fold it).
"""

from __future__ import annotations

import inspect
import sys
import warnings

import torch
import torch.autograd.forward_ad as fwAD

# the fast paths' state: name -> active (set by probe())
FAST_PATHS: dict[str, bool] = {}
# why a fast path is inactive: name -> reason
WHY_NOT: dict[str, str] = {}

# The private objects the fast paths use, as probe() leaves them; each probe returns its names' values, and
# _OFF holds what each name is where its probe failed.
_OFF = {"plain_eager": {"_plain_keysets": frozenset(), "_dispatch_keys": None, "_stack_len": None,
                        "_function_mode": None, "_tls_included": None, "_python_dispatcher": None,
                        "_profiling": None, "_tracing_state": None},
        "c_apply": {"_c_apply": None},
        "forward_ad_guard": {"_make_autograd_impl": None},
        "aten_im2col": {"im2col": None, "col2im": None},
        "graph_task": {"_graph_task_id": None},
        "interpreted": {"_interpreted_type": None},
        "int8_mm": {"int8_mm": None}}
# queried by every path, fast or not: a torch.func transform / a forward-AD level may be active (the public
# reading where the private query is gone: assume one may be, so the call takes the complete autograd.Function)
_transforms = None
_has_forward_level = False
# (each _OFF name, declared; probe() sets them)
_plain_keysets: frozenset = frozenset()
_dispatch_keys = _stack_len = _function_mode = _tls_included = _python_dispatcher = _profiling = None
_tracing_state = _c_apply = _make_autograd_impl = _graph_task_id = _interpreted_type = None
int8_mm = None
im2col = col2im = None


def _keyset(*keys) -> int:
    out = torch._C.DispatchKeySet(keys[0])
    for k in keys[1:]:
        out = out | torch._C.DispatchKeySet(k)
    return out.raw_repr()


def _probe_plain_eager() -> dict:
    C = torch._C
    K = C.DispatchKey
    # The dispatch keys of a plain dense CPU or CUDA tensor, and nothing else: no functorch wrapper (batched,
    # grad), no functional tensor, no negative/conjugate view or zero tensor (the dispatcher materialises
    # those before a kernel sees them), no sparse, meta or other backend.
    found = {"_plain_keysets": frozenset((_keyset(K.CPU, K.ADInplaceOrView, K.AutogradCPU, K.AutocastCPU),
                                          _keyset(K.CUDA, K.ADInplaceOrView, K.AutogradCUDA, K.AutocastCUDA))),
             "_stack_len": C._len_torch_dispatch_stack, "_function_mode": C._is_torch_function_mode_enabled,
             "_tls_included": C._dispatch_tls_is_dispatch_key_included, "_python_dispatcher": K.PythonDispatcher,
             "_profiling": C._autograd._profiler_enabled, "_tracing_state": C._get_tracing_state,
             "_dispatch_keys": C._dispatch_keys}
    if not _has_forward_level or _transforms is None:
        raise RuntimeError("torch.autograd.forward_ad._current_level or "
                           "torch._C._are_functorch_transforms_active is missing")
    # every query takes these arguments and answers with the type plain_eager reads (an import under a mode
    # may see a mode active: its values are not checked)
    queries = (found["_stack_len"](), found["_function_mode"](), _transforms(),
               found["_tls_included"](found["_python_dispatcher"]), found["_profiling"]())
    found["_tracing_state"]()
    if [type(q) for q in queries] != [int, bool, bool, bool, bool]:
        raise RuntimeError(f"the mode/transform/profiler queries answer {queries}, not an int and four bools")
    keys = found["_dispatch_keys"](torch.empty(1, device="cpu"))
    if keys.raw_repr() not in found["_plain_keysets"]:
        raise RuntimeError(f"a plain CPU tensor's dispatch keys are {keys}, not the set convzoo's bypass was "
                           f"written for")
    return found


def _probe_c_apply() -> dict:
    apply = torch._C._FunctionBase.__dict__["apply"]

    class _Probe(torch.autograd.Function):
        @staticmethod
        def forward(t):
            return t * 2

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            return g * 2

    t = torch.ones(1, requires_grad=True)
    out = apply.__get__(None, _Probe)(t)
    out.backward()
    if out.item() != 2.0 or t.grad.item() != 2.0 or type(out.grad_fn).__name__ != "_ProbeBackward":
        raise RuntimeError("torch._C._FunctionBase.apply does not apply the Function")
    return {"_c_apply": apply}


def _probe_forward_ad_guard() -> dict:
    from torch._library.autograd import make_autograd_impl

    if "allow_override" not in inspect.signature(torch.library.Library.impl).parameters:
        raise RuntimeError("torch.library.Library.impl takes no allow_override")
    return {"_make_autograd_impl": make_autograd_impl}


def _probe_aten_im2col() -> dict:
    cols, fold = torch._C._nn.im2col, torch._C._nn.col2im
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)
    got = cols(x, [2, 2], [1, 1], [1, 0], [1, 1])
    want = torch.nn.functional.unfold(x, (2, 2), padding=(1, 0))
    if not torch.equal(got, want):
        raise RuntimeError("torch._C._nn.im2col differs from F.unfold")
    if not torch.equal(fold(want, [3, 4], [2, 2], [1, 1], [1, 0], [1, 1]),
                       torch.nn.functional.fold(want, (3, 4), (2, 2), padding=(1, 0))):
        raise RuntimeError("torch._C._nn.col2im differs from F.fold")
    return {"im2col": cols, "col2im": fold}


def _probe_graph_task() -> dict:
    task = torch._C._current_graph_task_id
    if task() != -1:
        raise RuntimeError("torch._C._current_graph_task_id() is not -1 outside a backward")
    seen = []

    class _Probe(torch.autograd.Function):
        @staticmethod
        def forward(t):
            return t.clone()

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            seen.append(task())
            return g

    _Probe.apply(torch.ones(1, requires_grad=True)).sum().backward()
    if len(seen) != 1 or seen[0] == -1:
        raise RuntimeError("torch._C._current_graph_task_id() is -1 inside a backward")
    return {"_graph_task_id": task}


def _probe_interpreted() -> dict:
    from triton.runtime.interpreter import InterpretedFunction

    return {"_interpreted_type": InterpretedFunction}


def _probe_int8_mm() -> dict:
    mm = torch._int_mm
    a = torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.int8)
    b = torch.tensor([[1, 1], [0, 1], [1, 0]], dtype=torch.int8)
    got = mm(a, b.t().contiguous().t())  # a transposed (column-major) right operand, as the count passes it
    if got.dtype != torch.int32 or not torch.equal(got, torch.tensor([[2, 1], [2, 2]], dtype=torch.int32)):
        raise RuntimeError("torch._int_mm is not the exact int8 matmul into int32")
    return {"int8_mm": mm}


_PROBES = {"plain_eager": _probe_plain_eager, "c_apply": _probe_c_apply, "forward_ad_guard": _probe_forward_ad_guard,
           "aten_im2col": _probe_aten_im2col, "graph_task": _probe_graph_task, "interpreted": _probe_interpreted,
           "int8_mm": _probe_int8_mm}


def probe() -> dict[str, bool]:
    """(Re)probe every private API; returns :data:`FAST_PATHS`. Run at import; the tests run it again with an
    API taken away, to check its fallback. The probes run in a neutral context (CPU default device, grad mode on,
    no inference mode), whatever the importer's, and the results are assigned together at the end."""
    global _transforms, _has_forward_level
    module = sys.modules[__name__]
    _transforms = getattr(torch._C, "_are_functorch_transforms_active", None)
    _has_forward_level = isinstance(getattr(fwAD, "_current_level", None), int)
    values, active, why = {}, {}, {}
    with torch.device("cpu"), torch.inference_mode(False), torch.enable_grad():
        for name, check in _PROBES.items():
            try:
                values.update(check())
            except Exception as e:  # any failure (missing name, changed behaviour): the public route
                values.update(_OFF[name])
                why[name], active[name] = f"{type(e).__name__}: {e}", False
            else:
                active[name] = True
    for attr, value in values.items():
        setattr(module, attr, value)
    WHY_NOT.clear()
    WHY_NOT.update(why)
    FAST_PATHS.clear()
    FAST_PATHS.update(active)
    return dict(FAST_PATHS)


# ---------------------------------------------------------------------------------------------- the fast paths
def plain_eager(tensors) -> bool:
    """Whether the dispatcher, given these tensors now, would go straight to the op's implementation: every
    tensor a plain dense CPU/CUDA ``Tensor`` (exact type: no subclass, no FakeTensor), and no
    TorchDispatchMode (FakeTensorMode, make_fx, FlopCounterMode, ...), torch-function mode, Python
    dispatcher, ``torch.func`` transform or forward-AD level active, no profiler running (its trace
    shows the dispatcher's ``convzoo::*`` events) and no ``torch.jit.trace`` recording (its graph must hold
    the ``convzoo::*`` node, not what one call of it ran). Always False where the probe failed. Not for a call
    under ``torch.compile`` (the caller checks that first: Dynamo must see the custom op)."""
    keysets = _plain_keysets
    if (not keysets or fwAD._current_level >= 0 or _stack_len() or _function_mode() or _transforms()
            or _tls_included(_python_dispatcher) or _profiling() or _tracing_state() is not None):
        return False
    keys = _dispatch_keys
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN_TYPES or keys(t).raw_repr() not in keysets):
            return False
    return True


# Parameter is Tensor with torch-function handling disabled: the op sees a Parameter as a Tensor
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def differentiating() -> bool:
    """A ``torch.func`` transform or a forward-AD level is active. Where the running torch lacks either private
    query, assume one may be: the call then takes the complete ``autograd.Function`` (slower, still right)."""
    if _transforms is None or not _has_forward_level:
        return True
    return fwAD._current_level >= 0 or _transforms()


def functorch_transforming() -> bool:
    """A ``torch.func`` transform (grad, jvp, vjp, vmap, ...) is active. False where the running torch lacks the
    private query (then a layer that mutates its statistics under a transform raises, as torch does: never a silent
    wrong result)."""
    return _transforms is not None and bool(_transforms())


def function_apply(function, plain: bool, *args):
    """``function.apply(*args)``; straight into its C++ ``apply`` when ``plain`` (:func:`plain_eager` held for its
    tensors) and the probe found it: the Python preamble of ``Function.apply`` binds default arguments
    (``inspect.signature``) and unwraps dead ``torch.func`` wrappers (plain tensors are none), each call."""
    if plain and _c_apply is not None:
        return _c_apply.__get__(None, function)(*args)
    return function.apply(*args)


_GUARD_OFF = ("direct torch.ops.convzoo.* calls drop forward-mode tangents on this torch (the guard that makes "
              "them raise could not be installed: see convzoo.debug_info()); convzoo.functional and the layers carry "
              "them")


def override_autograd_kernel(lib: torch.library.Library, op, name: str, make_guard) -> bool:
    """Register ``make_guard(autograd_impl)`` as custom op ``op``'s Autograd kernel in ``lib``, replacing the one
    ``register_autograd`` installed (``autograd_impl``, which the guard calls). Returns whether it was installed.
    Where the probe failed, or the override itself raises, the custom op keeps its own kernel, the fast path is
    reported off, and a warning says what that means (once)."""
    if _make_autograd_impl is not None:
        try:
            guard = make_guard(_make_autograd_impl(op._opoverload, op))
            with warnings.catch_warnings():
                # the dispatcher's note that this very kernel replaces another is the point; any other warning shows
                warnings.filterwarnings("ignore", category=UserWarning, message=(
                    rf"(?s)Warning only once for all operators.*Overriding a previously registered kernel.*"
                    rf"operator: {lib.ns}::{name}\(.*dispatch key: Autograd\n"))
                lib.impl(name, guard, "Autograd", with_keyset=True, allow_override=True)
            return True
        except Exception as e:  # the custom op's own kernel stays (impl raises before registering)
            FAST_PATHS["forward_ad_guard"] = False
            WHY_NOT["forward_ad_guard"] = f"overriding {lib.ns}::{name}: {type(e).__name__}: {e}"
    global _guard_warned
    if not _guard_warned:
        _guard_warned = True
        warnings.warn(_GUARD_OFF, stacklevel=2)
    return False


_guard_warned = False


def op_name(op) -> str:
    """The name (without namespace) of custom op ``op``, a ``torch.library.CustomOpDef``, which has no public
    attribute for it: the first of its private spellings the running torch has."""
    for read in (lambda: op._name, lambda: op._qualname.split("::")[-1], lambda: op._opoverload._opname):
        try:
            name = read()
        except AttributeError:
            continue
        if isinstance(name, str) and name:
            return name
    raise TypeError(f"cannot read the name of custom op {op!r} on torch {torch.__version__}")


def in_backward() -> bool | None:
    """Whether this runs inside autograd's backward (a forward recomputed by activation checkpointing); None where
    the probe failed (cannot tell)."""
    return None if _graph_task_id is None else _graph_task_id() != -1


def recomputed_forward() -> bool:
    """A forward running inside autograd's backward: activation checkpointing (``torch.utils.checkpoint``,
    reentrant or not) recomputing it, with the input the real forward already saw (statistics hooks skip it).
    A compiled graph's recompute runs no hooks (and Dynamo cannot trace this query), so it is False there; False
    too where the probe failed (see :func:`in_backward`)."""
    return not torch.compiler.is_compiling() and bool(in_backward())


def warn_if_blind_to_recompute(who: str) -> None:
    """Warn (at a statistics hook's construction) where :func:`in_backward` cannot tell a recomputed forward."""
    if in_backward() is None:
        warnings.warn(f"{who}: this torch has no torch._C._current_graph_task_id (see convzoo.debug_info()): forwards "
                      f"recomputed by activation checkpointing will be counted in the statistics again", stacklevel=3)


def interpreted(kernel) -> bool:
    """Whether Triton kernel ``kernel`` (bare, or wrapped by ``triton.autotune`` / ``triton.heuristics``) was
    decorated under ``TRITON_INTERPRET=1`` (runs on the interpreter)."""
    import triton

    while isinstance(kernel, (triton.runtime.Autotuner, triton.runtime.Heuristics)):
        kernel = kernel.fn
    if _interpreted_type is not None:
        return isinstance(kernel, _interpreted_type)
    return isinstance(kernel, triton.runtime.KernelInterface) and not isinstance(kernel, triton.runtime.JITFunction)


# nn.Module's hook registries (private attributes; each an OrderedDict a RemovableHandle points into)
_MODULE_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
                 "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_is_full_backward_hook",
                 "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                 "_load_state_dict_post_hooks")


def move_module_hooks(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """``dst`` takes over ``src``'s module hooks (forward, pre-forward, backward, state-dict ones): the same
    registry objects, so a handle ``src.register_*_hook`` returned removes the hook from ``dst``.

    Raises:
        RuntimeError: ``src`` holds hooks in a registry of another name (a newer torch's): dropping them silently
            would change what the model does.
    """
    import weakref

    from torch.nn.modules.module import _WrappedHook

    for name in _MODULE_HOOKS:
        if name in vars(src):
            setattr(dst, name, getattr(src, name))
    # register_load_state_dict_pre_hook binds its module (a weak reference, passed to the hook when it runs): bind
    # ``dst``, or the hook would be handed ``src`` (a stale module) or fail once ``src`` is gone
    for hook in getattr(dst, "_load_state_dict_pre_hooks", {}).values():
        if isinstance(hook, _WrappedHook) and getattr(hook, "with_module", False) and hook.module() is src:
            hook.module = weakref.ref(dst)
    unknown = [k for k, v in vars(src).items() if "hook" in k and k not in _MODULE_HOOKS and v]
    if unknown:
        raise RuntimeError(f"{type(src).__name__} holds hooks in registries convzoo does not know: {unknown}")


def sym_max(a, b):
    """``max(a, b)`` for ints or SymInts: the builtin on two ints (torch 2.11's Dynamo refuses ``torch.sym_max``
    of plain ints under ``fullgraph=True``), ``torch.sym_max`` otherwise."""
    if type(a) is int and type(b) is int:
        return max(a, b)
    return torch.sym_max(a, b)


def debug_info() -> dict:
    """The versions convzoo runs with and which of its fast paths (private APIs) are active, with the reason
    for each inactive one."""
    import os
    import platform

    import numpy

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"convzoo": sys.modules["convzoo"].__version__ if "convzoo" in sys.modules else None,
            "python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
            "numpy": numpy.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"), "fast_paths": dict(FAST_PATHS),
            "inactive_because": dict(WHY_NOT)}


probe()
