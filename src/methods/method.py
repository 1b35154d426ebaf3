"""The contract of a compression method module, read once into a :class:`Method`.

A method is ``src/methods/<name>.py`` (:class:`MethodModule`) plus ``conf/ffn_mode/<name>.yaml``,
whose ``compress`` node names the module's ``compress`` with the config's options (a partial).
:meth:`Method.of` reads everything else the project needs from the module the partial points
to, so the rest of the code never looks a method up itself.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .types import Compressed, MLPCalibration, MLPWeights


class MethodModule(Protocol):
    """What a method's module provides.

    - ``VERSION``: a string bumped whenever the method's output changes (part of the cache key; a
      module without one counts as ``"0"``);
    - ``compress(w, mid_dim, *, seed, **options)``: a pure function of one MLP returning a
      ``FusedMLP`` or ``LowRankMLP``; one that takes ``calib`` receives the layer's
      ``MLPCalibration`` wherever the settings read calibration data;
    - optionally ``check(width, mid_dim, *, calib_size, **options)``, raising ``OptionError`` for a
      bad option: the preflight runs it before any weights load (``compress`` calls it too);
    - optionally ``needs_calibration(**options) -> bool``: whether the method reads calibration data
      with these options (default: never).
    """

    VERSION: str

    def compress(self, w: MLPWeights, mid_dim: int, *, seed: int, **options: Any) -> Compressed: ...


@dataclass(frozen=True)
class Method:
    """One compression method with its config's options, as its module declares it."""

    name: str  # the ffn_mode option (conf/ffn_mode/<name>.yaml): the cache folder and the checkpoint's "method"
    compress: functools.partial  # the module's compress with the config's options
    options: Mapping[str, Any]  # those options (part of the cache key)
    version: str  # the module's VERSION
    check: Callable[..., None] | None  # the module's check hook, if any
    takes_calib: bool  # compress accepts ``calib``
    needs_calibration: bool  # the method itself reads calibration data with these options

    @classmethod
    def of(cls, fn: Callable[..., Compressed], name: str | None = None) -> Method:
        """Read the method whose ``compress`` is ``fn`` (a function or a partial carrying its options);
        ``name`` defaults to its module's last name (``src.methods.svd`` -> ``svd``)."""
        partial = fn if isinstance(fn, functools.partial) else functools.partial(fn)
        module: MethodModule = sys.modules[partial.func.__module__]
        options = MappingProxyType(dict(partial.keywords))
        declared = getattr(module, "needs_calibration", None)
        return cls(
            name=name or partial.func.__module__.rsplit(".", 1)[-1],
            compress=partial,
            options=options,
            version=str(getattr(module, "VERSION", "0")),
            check=getattr(module, "check", None),
            takes_calib="calib" in inspect.signature(partial).parameters,
            needs_calibration=bool(declared and declared(**options)),
        )

    def validate(self, width: int, mid_dim: int, calib_size: int) -> None:
        """Run the method's own option checks (``OptionError``) for a layer of ``width`` compressed to ``mid_dim``."""
        if self.check is not None:
            self.check(width, mid_dim, calib_size=calib_size, **self.options)

    def __call__(self, w: MLPWeights, mid_dim: int, *, seed: int, calib: MLPCalibration | None = None) -> Compressed:
        """Compress one MLP; ``calib`` reaches the method where it takes one."""
        return self.compress(w, mid_dim, seed=seed, **({"calib": calib} if self.takes_calib and calib is not None else {}))
