"""Shadowing one attribute of one object, and undoing it safely."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["shadow"]


def shadow(target: Any, name: str, wrapper: Callable[..., Any]) -> Callable[[], bool]:
    """Set ``target.name`` to ``wrapper`` on the instance; return the undo function.

    The undo restores what the instance had (or removes the attribute, so the class's
    method shows again) and returns True. If something else replaced the attribute
    since, it may be calling our wrapper: the undo then leaves everything in place and
    returns False, and the caller makes its wrapper a pass-through instead.
    """
    had = name in vars(target)
    previous = vars(target).get(name)
    setattr(target, name, wrapper)
    ref = weakref.ref(target)

    def undo() -> bool:
        obj = ref()
        if obj is None:
            return True
        if vars(obj).get(name) is not wrapper:
            return False
        if had:
            setattr(obj, name, previous)
        else:
            delattr(obj, name)
        return True

    return undo
