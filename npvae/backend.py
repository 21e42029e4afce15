"""One switch for the whole package: compiled Numba kernels or their NumPy twins.

Every hot loop in npvae is written twice, side by side in the same module:

    def _kl_numpy(mu, logvar): ...          # the reference, plain NumPy
    @numba_kernel
    def _kl_numba(mu, logvar): ...          # the same maths as an explicit loop
    kl_kernel = dispatch(_kl_numpy, _kl_numba)

`dispatch` returns a callable that looks at the current backend on every call, so
`set_backend("numpy")` takes effect at once everywhere. The backend starts from the
environment variable ``NPVAE_BACKEND`` (``numba`` or ``numpy``; default ``numba``).

Compilation is lazy: nothing is compiled (and Numba is not even imported) until a
kernel is first called with the numba backend. Compiled code is cached on disk
(``cache=True``), so a second process loads it instead of compiling again. No kernel
uses ``fastmath``: its gradients are checked against finite differences, and the two
twins are tested to agree to 1e-12 in float64. One exception, which no gradient passes
through: the float32 polynomial pass of the importance-weighted estimate
(``ops.centred_softplus``) lets the compiler fuse multiplies and adds (``contract``).
Numba's disk cache is keyed by the file that defines a kernel: a kernel reads its
constants from its own file, or takes them as an argument (``ops.poly32.CONSTANTS``),
so that an edit elsewhere cannot leave a stale compiled kernel in use.
Kernels use NumPy's error model: a float division by zero gives inf or nan, as it does
in the twin, instead of raising. That is not only consistent: the check Python's model
puts on every division stops the compiler from vectorizing a loop (Adam runs 14 times
faster without it).
"""
from __future__ import annotations

import os

BACKENDS = ("numba", "numpy")

_state = {"backend": None}
_compile_listeners = []


def _from_env() -> str:
    """The backend named by ``NPVAE_BACKEND`` (default numba); ValueError for any other name."""
    value = os.environ.get("NPVAE_BACKEND", "numba").strip().lower() or "numba"
    if value not in BACKENDS:
        raise ValueError(
            f"NPVAE_BACKEND must be one of {BACKENDS}, got {value!r}: set it to numba "
            f"(compiled kernels) or numpy (their NumPy twins), or unset it"
        )
    return value


def check_environment() -> None:
    """Raise ValueError, with the fix, if ``NPVAE_BACKEND`` names no backend.

    Importing npvae never fails on a bad value: the error comes from the first call
    that needs the backend, or from here (the command line checks before anything else).
    """
    _from_env()


def get_backend() -> str:
    """The backend in force now: 'numba' or 'numpy'."""
    if _state["backend"] is None:
        _state["backend"] = _from_env()
    return _state["backend"]


def set_backend(name: str) -> str:
    """Select 'numba' (compiled kernels) or 'numpy' (reference twins) for the whole package.

    Returns the backend that was in force before, so a caller can restore it.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous = get_backend()
    _state["backend"] = name
    return previous


class use_backend:
    """Context manager: ``with use_backend("numpy"): ...`` then restore the previous one."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.previous = set_backend(self.name)
        return self

    def __exit__(self, *exc):
        set_backend(self.previous)
        return False


def on_first_compile(callback) -> None:
    """Register ``callback(kernel_name)``, called before a kernel's first call in a process.

    That call compiles the kernel, or loads it from the disk cache. ``callback`` may return
    a function of no arguments, called when the first call is over: the command line starts
    a short timer in ``callback`` and cancels it there, so it tells the user about a slow
    compilation but says nothing when the cache is warm.
    """
    _compile_listeners.append(callback)


class _LazyKernel:
    """A Numba kernel compiled (or loaded from the disk cache) on first call."""

    def __init__(self, pyfunc, parallel: bool, contract: bool):
        self.pyfunc = pyfunc
        self.parallel = parallel
        self.contract = contract
        self.__name__ = pyfunc.__name__
        self.__doc__ = pyfunc.__doc__
        self._compiled = None

    def compiled(self):
        if self._compiled is None:
            import numba  # imported here so `import npvae` stays light

            self._compiled = numba.njit(
                cache=True, nogil=True, fastmath={"contract"} if self.contract else False,
                error_model="numpy",
                parallel=self.parallel,
            )(self.pyfunc)
        return self._compiled

    def __call__(self, *args):
        if self._compiled is not None:
            return self._compiled(*args)
        finish = [listener(self.__name__) for listener in _compile_listeners]
        try:
            return self.compiled()(*args)  # compiles, or loads from the cache
        finally:
            for done in finish:
                if callable(done):
                    done()


def numba_kernel(pyfunc=None, *, parallel: bool = False, contract: bool = False):
    """Decorator: mark a plain-Python loop as a Numba kernel (compiled lazily, cached).

    ``contract=True`` lets the compiler fuse a multiply and an add into one instruction
    (one rounding instead of two); no other fast-math liberty is taken. Only for a kernel
    no gradient passes through, tested against an exact reference with a stated tolerance.
    """
    if pyfunc is None:
        return lambda f: _LazyKernel(f, parallel, contract)
    return _LazyKernel(pyfunc, parallel, contract)


def dispatch(numpy_twin, numba_twin):
    """One callable that runs ``numba_twin`` or ``numpy_twin`` according to the backend."""

    def kernel(*args):
        if _state["backend"] == "numpy" or (
            _state["backend"] is None and get_backend() == "numpy"
        ):
            return numpy_twin(*args)
        return numba_twin(*args)

    kernel.__name__ = numpy_twin.__name__.replace("_numpy", "")
    kernel.__doc__ = numpy_twin.__doc__
    kernel.numpy = numpy_twin
    kernel.numba = numba_twin
    return kernel

