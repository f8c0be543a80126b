"""Static checks of every registered kernel's source, for what the CPU interpreter cannot show.

int64 offsets: a stride or a runtime size passed to a kernel is int32 whenever its value fits
(Triton specialises integer arguments), and so are ``tl.program_id``, ``tl.arange`` and the index of
``for k in range(K)``. A product of two int32 values wraps at 2^31 on the GPU — silently, as a wrong
address. So every product with a stride or a runtime size as a factor must have a factor that is
int64 by construction: ``.to(tl.int64)`` / ``tl.cast(..., tl.int64)``, or arithmetic, indexing or a
``tl.where`` / ``tl.minimum`` / ... over such a value, followed through assignments and into the
``@triton.jit`` helpers a kernel calls. The analysis is conservative: what it cannot prove int64 fails.

Masks: every ``tl.load`` and ``tl.store`` has a ``mask=`` (an unmasked out-of-bounds access reads
garbage on a GPU and nothing in the interpreter complains).
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import types

import pytest
import triton
import triton.language as tl

from convzoo import _compat, autotune, kernels

kernels.load_all()  # registers every kernel's autotune spec

# calls whose (integer) result is int64 when any of these positional arguments is
_PROPAGATE = {"where": (1, 2), "minimum": (0, 1), "maximum": (0, 1), "abs": (0,), "cdiv": (0, 1)}


def _is_int64_dtype(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "int64"


def _pyfunc(fn):
    """The Python function behind a JITFunction / InterpretedFunction (or a plain function)."""
    return getattr(fn, "fn", fn)


def _is_jit(obj) -> bool:
    return isinstance(obj, triton.runtime.JITFunction) or _compat.interpreted(obj)


def _callee(py, func: ast.expr):
    """What a call's ``func`` names in the Python function ``py``'s globals: ``helper(...)`` or
    ``module.helper(...)`` (the kernels reach ``_common`` as ``cm``) of a module that is not Triton's (``tl.sum``
    and the other jit functions of its own library are not ours to check); None for anything else."""
    if isinstance(func, ast.Name):
        return py.__globals__.get(func.id)
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        module = py.__globals__.get(func.value.id)
        if isinstance(module, types.ModuleType) and module.__name__.partition(".")[0] != "triton":
            return getattr(module, func.attr, None)
    return None


class Int64Check:
    """Abstract interpretation of one ``@triton.jit`` function: which names hold int64 values.

    ``params`` maps each parameter to whether it is int64; ``runtime`` names the parameters that are
    runtime integers (sizes and strides) of the kernel, followed into helpers. Findings go to ``errors``.
    """

    def __init__(self, fn, params: dict[str, bool], runtime: set[str], errors: list, depth: int = 0):
        self.py = _pyfunc(fn)
        self.name = self.py.__name__
        self.env = dict(params)
        self.runtime = runtime
        self.errors = errors
        self.depth = depth
        self.returns: list = []

    # ------------------------------------------------------------------ statements
    def run(self):
        tree = ast.parse(textwrap.dedent(inspect.getsource(self.py)))
        self.block(tree.body[0].body)
        if not self.returns:
            return False
        # several returns: int64 only where every return is
        first = self.returns[0]
        if isinstance(first, tuple):
            return tuple(all(r[i] for r in self.returns) for i in range(len(first)))
        return all(self.returns)

    def block(self, stmts):
        for st in stmts:
            self.stmt(st)

    def stmt(self, st):
        if isinstance(st, ast.Assign):
            value = self.expr(st.value)
            for target in st.targets:
                self.assign(target, value)
        elif isinstance(st, ast.AnnAssign):  # `NS: tl.constexpr = BLOCK_K // SUB`: an assignment
            if st.value is not None:
                self.assign(st.target, self.expr(st.value))
        elif isinstance(st, ast.AugAssign):
            value = self.binop(st.op, ast.Name(st.target.id), st.value, st) if isinstance(st.target, ast.Name) \
                else self.expr(st.value)
            self.assign(st.target, value)
        elif isinstance(st, ast.If):
            self.expr(st.test)
            before = dict(self.env)
            self.block(st.body)
            after_body = self.env
            self.env = dict(before)
            self.block(st.orelse)
            self.env = self.meet(after_body, self.env)
        elif isinstance(st, ast.For):
            self.for_loop(st)
        elif isinstance(st, ast.Return):
            self.returns.append(self.expr(st.value) if st.value is not None else False)
        elif isinstance(st, ast.Expr):
            self.expr(st.value)
        elif isinstance(st, (ast.Pass, ast.Assert)):
            pass
        else:
            raise NotImplementedError(f"{self.name}: statement {type(st).__name__} at line {st.lineno}")

    def for_loop(self, st):
        """The loop index of range / tl.range / tl.static_range is int32; the body runs twice so that a
        value carried round the loop meets its value from before the loop."""
        for arg in getattr(st.iter, "args", []):
            self.expr(arg)
        before = dict(self.env)
        for _ in range(2):
            self.assign(st.target, False)
            self.block(st.body)
            self.env = self.meet(before, self.env)

    @staticmethod
    def meet(a: dict, b: dict) -> dict:
        return {k: a.get(k, v) and v for k, v in b.items()} | {k: v for k, v in a.items() if k not in b}

    def assign(self, target, value):
        if isinstance(target, ast.Name):
            self.env[target.id] = value
        elif isinstance(target, ast.Tuple):
            values = value if isinstance(value, tuple) else (value,) * len(target.elts)
            for t, v in zip(target.elts, values):
                self.assign(t, v)
        else:  # subscript / attribute targets: no name to track
            self.expr(target)

    # ------------------------------------------------------------------ expressions
    def expr(self, node):
        if node is None:
            return False
        if isinstance(node, ast.Name):
            return self.env.get(node.id, False)
        if isinstance(node, ast.Constant):
            return False
        if isinstance(node, ast.BinOp):
            return self.binop(node.op, node.left, node.right, node)
        if isinstance(node, ast.UnaryOp):
            v = self.expr(node.operand)
            return v if isinstance(node.op, (ast.USub, ast.UAdd)) else False
        if isinstance(node, (ast.Compare, ast.BoolOp)):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.expr):
                    self.expr(child)
            return False
        if isinstance(node, ast.Subscript):
            self.expr(node.slice)
            return self.expr(node.value)
        if isinstance(node, ast.IfExp):
            self.expr(node.test)
            return self.expr(node.body) and self.expr(node.orelse)
        if isinstance(node, ast.Tuple):
            return tuple(self.expr(e) for e in node.elts)
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, (ast.Attribute, ast.Slice, ast.List)):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.expr):
                    self.expr(child)
            return False
        raise NotImplementedError(f"{self.name}: expression {type(node).__name__} at line {node.lineno}")

    def binop(self, op, left, right, node):
        lv, rv = self.expr(left), self.expr(right)
        if isinstance(op, ast.Mult):
            for factor, other, other_v in ((left, right, rv), (right, left, lv)):
                if self.is_scaled_int(factor) and not other_v:
                    self.errors.append(
                        f"{self.name}, line {node.lineno}: `{ast.unparse(node)}`: {ast.unparse(factor)} is an "
                        f"int32 kernel argument and `{ast.unparse(other)}` is not provably int64")
                    break
        if isinstance(op, (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod)):
            return lv or rv
        return False

    def is_scaled_int(self, node) -> bool:
        """A stride (any ``stride_*`` name) or a runtime size of the kernel."""
        return isinstance(node, ast.Name) and (node.id.startswith("stride_") or node.id in self.runtime)

    def call(self, node):
        func = node.func
        args = [self.expr(a) for a in node.args]
        for kw in node.keywords:
            self.expr(kw.value)
        if isinstance(func, ast.Attribute) and func.attr == "to":  # x.to(dtype)
            if self.is_scaled_int(func.value):
                self.errors.append(
                    f"{self.name}, line {node.lineno}: `{ast.unparse(node)}`: {ast.unparse(func.value)} is an int "
                    "kernel argument, which Triton passes as the constant 1 when it is 1 (no .to): use tl.cast")
            self.expr(func.value)
            dtype = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "dtype"), None)
            return _is_int64_dtype(dtype)
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name == "cast":  # tl.cast(x, tl.int64)
            return len(node.args) > 1 and _is_int64_dtype(node.args[1])
        if name == "full":  # tl.full(shape, value, tl.int64)
            return len(node.args) > 2 and _is_int64_dtype(node.args[2])
        if name in _PROPAGATE and isinstance(func, ast.Attribute):
            return any(args[i] for i in _PROPAGATE[name] if i < len(args))
        helper = _callee(self.py, func)
        if _is_jit(helper):
            return self.helper(helper, node, args)
        return False

    def helper(self, fn, node, args):
        """Analyse a called @triton.jit helper with its arguments' int64-ness and runtime-ness."""
        if self.depth > 8:
            raise RecursionError(f"{self.name}: helpers nested too deep")
        names = list(inspect.signature(_pyfunc(fn)).parameters)
        params = dict(zip(names, args))
        runtime = {p for p, a in zip(names, node.args) if isinstance(a, ast.Name) and a.id in self.runtime}
        return Int64Check(fn, params, runtime, self.errors, self.depth + 1).run()


# runtime float scalars of the kernels (patch_covariance's out ← alpha·out + coef·F): not sizes
FLOAT_ARGS = frozenset({"alpha", "coef"})


def check_int64(kernel) -> list[str]:
    """Products of a stride / runtime size with something not provably int64, in ``kernel`` and its helpers."""
    params = {p.name: p for p in kernel.params} if hasattr(kernel, "params") else None
    sig = inspect.signature(_pyfunc(kernel))
    runtime = set()
    for name, p in sig.parameters.items():
        constexpr = p.annotation in (tl.constexpr, "tl.constexpr") or (params and params[name].is_constexpr)
        if not constexpr and not name.endswith("_ptr") and name not in FLOAT_ARGS:
            runtime.add(name)
    errors: list[str] = []
    Int64Check(kernel, dict.fromkeys(sig.parameters, False), runtime, errors).run()
    return sorted(set(errors))


def unmasked_memory_ops(kernel) -> list[str]:
    """``tl.load`` / ``tl.store`` calls without ``mask=``, in ``kernel`` and the jit helpers it calls."""
    found, seen, todo = [], set(), [kernel]
    while todo:
        fn = _pyfunc(todo.pop())
        if fn in seen:
            continue
        seen.add(fn)
        for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(fn)))):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in ("load", "store") and \
                    not any(k.arg == "mask" for k in node.keywords):
                found.append(f"{fn.__name__}: `{ast.unparse(node)}`")
            if _is_jit(_callee(fn, f)):
                todo.append(_callee(fn, f))
    return found


KERNELS = sorted(autotune.registered().items())


@pytest.mark.parametrize("name, spec", KERNELS, ids=[k for k, _ in KERNELS])
def test_stride_products_are_int64(name, spec):
    assert check_int64(spec.kernel) == []


@pytest.mark.parametrize("name, spec", KERNELS, ids=[k for k, _ in KERNELS])
def test_every_load_and_store_is_masked(name, spec):
    assert unmasked_memory_ops(spec.kernel) == []


def test_every_kernel_family_is_checked():
    names = {"unfold", "fold", "local_conv_fwd", "local_conv_grad_weight", "local_conv_grad_input",
             "unfold_transpose", "unfold_transpose_backward", "patch_covariance",
             "extract_patches", "masked_conv_fwd", "masked_conv_grad_weight", "masked_conv_grad_input",
             "coactivation_correlation"}
    assert names <= dict(KERNELS).keys()


# ---------------------------------------------------------------------------------------------- the checker itself
@triton.jit
def _offset(i, stride_q):
    return i * stride_q


@triton.jit
def _int64_of(i):
    return i.to(tl.int64)


@triton.jit
def _scaled(i, stride_q):
    return stride_q * i


# a helper reached as a module's attribute, as the kernels reach _common's (cm._tap_sources(...))
_helpers = types.ModuleType("_helpers")
_helpers._scaled = _scaled


@triton.jit
def _bad_kernel(out_ptr, x_ptr, N, stride_xn, stride_xk, K: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)  # int32
    n = pid * BLOCK + tl.arange(0, BLOCK)
    mask = n < N
    for k in range(K):
        v = tl.load(x_ptr + n * stride_xn + k * stride_xk, mask=mask)  # two int32 products
        tl.store(out_ptr + n * N + k, v, mask=mask)  # n · N: int32 too
    tl.store(out_ptr + _offset(n, stride_xn), 0)  # through a helper, and unmasked
    tl.store(out_ptr + _helpers._scaled(n, stride_xk), 0)  # through a module's helper, and unmasked
    half: tl.constexpr = BLOCK // 2  # an annotated assignment, followed like any other
    tl.store(out_ptr + half * stride_xk, 0, mask=pid == 0)
    tl.store(out_ptr + N.to(tl.int64) * stride_xk, 0, mask=pid == 0)  # N == 1 arrives as the constant 1


@triton.jit
def _good_kernel(out_ptr, x_ptr, N, stride_xn, stride_xk, K: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    n = pid * BLOCK + tl.arange(0, BLOCK)
    mask = n < N
    for k in range(K):
        kk = tl.cast(k, tl.int64)
        v = tl.load(x_ptr + n[:, None] * stride_xn + tl.where(mask, kk, 0)[:, None] * stride_xk, mask=mask[:, None])
        tl.store(out_ptr + n * N + k, tl.sum(v, axis=1), mask=mask)
    tl.store(out_ptr + _offset(_int64_of(pid), stride_xn), 0, mask=pid == 0)
    wide: tl.tensor = pid + BLOCK // 2  # int64 through an annotated assignment
    tl.store(out_ptr + wide * stride_xk, 0, mask=pid == 0)


def test_checker_flags_int32_products_and_unmasked_stores():
    errors = check_int64(_bad_kernel)
    assert any("k * stride_xk" in e for e in errors), errors
    assert any("n * stride_xn" in e for e in errors), errors
    assert any("n * N" in e for e in errors), errors
    assert any(e.startswith("_offset") for e in errors), errors  # followed into the helper
    assert any(e.startswith("_scaled") for e in errors), errors  # and into a module's
    assert any("half * stride_xk" in e for e in errors), errors  # through `half: tl.constexpr = ...`
    assert any("N.to(tl.int64)" in e and "tl.cast" in e for e in errors), errors
    assert len(unmasked_memory_ops(_bad_kernel)) == 2
    assert check_int64(_good_kernel) == [] and unmasked_memory_ops(_good_kernel) == []
