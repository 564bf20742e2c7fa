"""The registry of training modes: ``mode:`` in a scenario names one :class:`Mode`.

``get_mode(name)`` is the mode object; :data:`MODES` maps every registered name to its mode.
:func:`register` adds a mode (and its configuration rules, so scenarios with its name validate);
docs/design.md, "Adding a mode", shows how.
"""

from __future__ import annotations

from fedq.config import MODE_RULES, register_mode_rules, unregister_mode_rules
from fedq.errors import ConfigError
from fedq.modes.base import Mode
from fedq.modes.federated import FederatedMode
from fedq.modes.split import SplitMode

#: Mode name -> its mode object.
MODES: dict[str, Mode] = {}


def register(mode: Mode) -> Mode:
    """Register ``mode`` under ``mode.name`` (a name registers once); returns it."""
    if mode.name in MODES:
        raise ValueError(f"duplicate mode name {mode.name!r}")
    if mode.rules.name != mode.name:
        raise ValueError(f"mode {mode.name!r} carries the rules of {mode.rules.name!r}")
    MODES[mode.name] = mode
    register_mode_rules(mode.rules)
    return mode


def unregister(name: str) -> None:
    """Remove a registered mode (tests)."""
    MODES.pop(name, None)
    unregister_mode_rules(name)


def get_mode(name: str) -> Mode:
    """The mode called ``name``; a ConfigError listing the registered modes otherwise."""
    mode = MODES.get(name)
    if mode is None:
        known = ", ".join(MODES) or "none"
        raise ConfigError(f"mode: unknown mode {name!r}; registered modes: {known}")
    return mode


for _mode in (FederatedMode(), SplitMode()):
    MODES[_mode.name] = _mode
    assert MODE_RULES[_mode.name] is _mode.rules

__all__ = ["MODES", "FederatedMode", "Mode", "SplitMode", "get_mode", "register", "unregister"]
