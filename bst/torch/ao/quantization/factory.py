"""`with_args`: constructors with bound keyword arguments, the currency of QConfig."""
from __future__ import annotations

import functools


class Factory(functools.partial):
    """A class with some keyword arguments bound; calling it builds a fresh instance.

    A plain ``functools.partial`` underneath, so it pickles (modules that carry a ``qconfig`` can be
    saved whole), and chainable: ``Observer.with_args(a=1).with_args(b=2)``.
    """

    def with_args(self, **kwargs) -> Factory:
        return Factory(self.func, *self.args, **{**self.keywords, **kwargs})

    def __repr__(self):
        bound = ", ".join(f"{k}={v!r}" for k, v in self.keywords.items())
        return f"{getattr(self.func, '__qualname__', self.func)}.with_args({bound})"


def with_args(cls: type, **kwargs) -> Factory:
    """Use as ``with_args = classmethod(with_args)``."""
    return Factory(cls, **kwargs)
