"""Rewards by name: one registry that every task serves, `TASK[reward=NAME]`.

A reward scores final samples of one kind, its *domain*: "vector" (the toy's points of R^d),
"digits-image" (8x8 images in [-1, 1]), "image" (decoded RGB images in [0, 1]). A task declares
its domain and serves every reward of it, whoever registered it:

- built-ins, registered by the task's own module (`REWARDS.register(name, domain=..., ...)`), each
  with a factory that builds the callable for a set-up task (a reward may need the task's objects:
  digits' classifier, sd's CLIP folder), and optionally a `check(task)` run before anything runs;
- plug-ins an installed package names in the entry-point group `diffgrad_bench.rewards`
  (name = "module:attr"): a `Reward` (its domain declared), a function marked with
  `@scores("DOMAIN")`, or a plain function, taken as an "image" reward (the group served sd only
  before it served every task);
- `module:function` or `path/to/file.py:function` given as the option's value: a function
  function(samples) -> (B,) tensor, of the domain of the task that names it.

What a task resolves here is in its cells' keys (`code_objects`): the factory of a registered
reward, the function of one given by path."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from bench.errors import SpecError
from bench.options import Option

REWARD_GROUP = "diffgrad_bench.rewards"
SPEC_HELP = "module:function / file.py:function"
LEGACY_PLUGIN_DOMAIN = "image"  # a plug-in function that declares no domain (the group was sd's)


@dataclass(frozen=True)
class Domain:
    """A kind of sample rewards score: what a reward function is called with."""

    name: str
    argument: str  # how messages name the samples: "images", "points"
    samples: str  # their shape and range, e.g. "(B, 3, H, W) images in [0, 1]"


@dataclass(frozen=True)
class Reward:
    """One reward: `factory(task)` gives the callable samples -> (B,) rewards for a set-up task;
    `check(task)` (optional) refuses, with a SpecError, options the reward cannot run with, before
    anything runs; `traits` are markers a task may ask about (digits' "names-a-class")."""

    name: str
    domain: str
    description: str
    factory: Callable[[Any], Callable]
    check: Callable[[Any], None] | None = field(default=None, compare=False)
    traits: frozenset[str] = frozenset()
    origin: str = "built-in"  # or the entry point's target, or the spec a function came from

    @property
    def code(self) -> tuple:
        """The objects whose code is this reward's (for the cell key)."""
        return (self.factory,) if self.check is None else (self.factory, self.check)


def scores(domain: str) -> Callable[[Callable], Callable]:
    """Marks a plug-in reward function with the domain it scores: `@scores("vector")`."""

    def mark(function: Callable) -> Callable:
        function.reward_domain = domain
        return function

    return mark


def is_spec(value: str) -> bool:
    """module:function or file.py:function (a function given by path)."""
    return ":" in value and bool(value.rpartition(":")[2])


class RewardRegistry:
    """Reward names -> Reward, per domain; plug-ins from the entry-point group on first use."""

    def __init__(self, group: str = REWARD_GROUP) -> None:
        self.group = group
        self._entries: dict[str, Reward] = {}
        self._domains: dict[str, Domain] = {}
        self._plugins: dict[str, str] | None = None  # entry point name -> target, read once
        self._loaded: dict[str, Reward | SpecError] = {}  # entry points loaded so far

    # --- declaring -------------------------------------------------------------------------------
    def domain(self, name: str, argument: str, samples: str) -> str:
        """Declare a domain (idempotent); returns its name."""
        new = Domain(name, argument, samples)
        if self._domains.setdefault(name, new) != new:
            raise SpecError(f"reward domain {name!r} is already declared as {self._domains[name]}")
        return name

    def register(
        self,
        name: str,
        *,
        domain: str,
        description: str,
        factory: Callable[[Any], Callable] | None = None,
        function: Callable | None = None,
        check: Callable[[Any], None] | None = None,
        traits: tuple[str, ...] = (),
    ) -> Reward:
        """Register a reward: a `factory(task) -> function`, or a `function` that needs no task."""
        if (factory is None) == (function is None):
            raise TypeError(f"reward {name!r}: give exactly one of factory(task) and function")
        if factory is None:
            factory = _constant_factory(function)
        if is_spec(name) or not name:
            raise SpecError(f"reward name {name!r}: a name may not be empty or contain ':' (a spec)")
        reward = Reward(name, domain, description, factory, check, frozenset(traits))
        existing = self._entries.get(name)
        if existing is not None and existing != reward:
            raise SpecError(f"reward {name!r} is already registered ({existing.domain}: {existing.description})")
        self._entries[name] = reward
        return reward

    @contextlib.contextmanager
    def scoped(self) -> Iterator[RewardRegistry]:
        """Rewards registered inside the block are gone after it (for tests)."""
        saved = dict(self._entries), dict(self._domains), self._plugins, dict(self._loaded)
        try:
            yield self
        finally:
            self._entries, self._domains, self._plugins, self._loaded = saved

    # --- reading ---------------------------------------------------------------------------------
    def plugins(self) -> dict[str, str]:
        """Entry point name -> "module:attr", of the installed packages' rewards."""
        if self._plugins is None:
            self._plugins = {e.name: e.value for e in importlib.metadata.entry_points(group=self.group)}
        return self._plugins

    def _plugin(self, name: str) -> Reward:
        """The entry point `name`, loaded (SpecError if it fails to, every time it is asked for)."""
        if name not in self._loaded:
            target = self.plugins()[name]
            try:
                value = _load(target)
            except SystemExit as exc:
                self._loaded[name] = SpecError(f"reward {name!r} ({target}) called sys.exit({exc.code!r}) on loading")
            except Exception as exc:
                self._loaded[name] = SpecError(f"reward {name!r} failed to load from {target}: {first_line(exc)}")
            else:
                if isinstance(value, Reward):
                    self._loaded[name] = dataclasses.replace(value, name=name, origin=target)
                elif callable(value):
                    domain = getattr(value, "reward_domain", LEGACY_PLUGIN_DOMAIN)
                    _check_signature(value, name, self.domain_of(domain))
                    function = _exit_is_an_error(value, name, self.domain_of(domain))
                    self._loaded[name] = Reward(
                        name, domain, f"plug-in: {target}", _constant_factory(function), origin=target
                    )
                else:
                    self._loaded[name] = SpecError(f"reward {name!r} ({target}) is neither a Reward nor callable")
        entry = self._loaded[name]
        if isinstance(entry, SpecError):
            raise SpecError(str(entry))
        return entry

    def domain_of(self, name: str) -> Domain:
        return self._domains.get(name) or Domain(name, "samples", f"{name} samples")

    def entries(self, domain: str | None = None) -> list[Reward]:
        """Every reward (of `domain`), built-ins in registration order, then the plug-ins that load."""
        found = [r for r in self._entries.values() if domain is None or r.domain == domain]
        for name in self.plugins():
            if name in self._entries:
                continue
            try:
                reward = self._plugin(name)
            except SpecError:
                continue  # a broken plug-in is refused where it is named, not in every list
            if domain is None or reward.domain == domain:
                found.append(reward)
        return found

    def names(self, domain: str | None = None) -> list[str]:
        return [r.name for r in self.entries(domain)]

    def listing(self) -> list[Reward]:
        """Every reward of every registered task (their modules register their built-ins), then
        the plug-ins': for `python -m bench list`."""
        from bench.registry import TASKS

        for name in TASKS.names():
            with contextlib.suppress(SpecError):
                TASKS.get(name)
        return self.entries()

    def get(self, value: str, domain: str) -> Reward:
        """The reward `value` names for a task of `domain`: a registered name, an entry point, or a
        module:function / file.py:function spec (loaded). SpecError, with the valid names, if none."""
        if value in self._entries:
            reward = self._entries[value]
        elif value in self.plugins():
            reward = self._plugin(value)
        elif is_spec(value):
            function = user_function(value, self.domain_of(domain))
            return Reward(value, domain, f"your own: {value}", _constant_factory(function), origin=value)
        else:
            raise SpecError(f"reward={value}: {self.refusal(value, domain)}")
        if reward.domain != domain:
            raise SpecError(f"reward={value}: {self.refusal(value, domain)}")
        return reward

    def refusal(self, value: str, domain: str) -> str | None:
        """Why `value` is no reward for a task of `domain` (None if it may be one): the Option check.
        A spec is only read here; loading it is `get`'s (a task's preflight)."""
        if is_spec(value):
            return None
        known = self._entries.get(value)
        if known is None and value in self.plugins():
            try:
                known = self._plugin(value)
            except SpecError as exc:
                return str(exc)
        if known is not None and known.domain == domain:
            return None
        valid = self.names(domain)
        if known is not None:
            why = f"scores {known.domain} samples, not {domain} ones; "
        else:
            close = difflib.get_close_matches(value, valid, n=1)
            why = f"is unknown (did you mean {close[0]!r}?); " if close else "is unknown; "
        return f"{why}must be one of {', '.join(valid)}, or {SPEC_HELP}"

    # --- what a task uses ------------------------------------------------------------------------
    def option(self, domain: str, default: str, help: str = "") -> Option:
        """The `reward` option of a task of `domain`, checked against this registry."""
        names = "|".join(r.name for r in self._entries.values() if r.domain == domain)
        return Option(
            "reward",
            str,
            default,
            help or f"a reward of {domain} samples (python -m bench list), or {SPEC_HELP}",
            check=lambda value: self.refusal(value, domain),
            metavar=f"{names}|module:function" if names else "module:function",
        )

    def preflight(self, value: str, task: Any, domain: str) -> Reward:
        """Resolve the reward and run its check: the one-line refusals before anything runs."""
        reward = self.get(value, domain)
        if reward.check is not None:
            reward.check(task)
        return reward

    def build(self, value: str, task: Any, domain: str) -> Callable:
        """The reward callable for a set-up task."""
        return self.get(value, domain).factory(task)

    def traits(self, value: str, domain: str) -> frozenset[str]:
        """The reward's traits (none for a function given by path, which is not loaded for this)."""
        return frozenset() if is_spec(value) else self.get(value, domain).traits

    def code_objects(self, value: str, domain: str) -> tuple:
        """What the reward's code is, for the cell key (Task.code_objects)."""
        return self.get(value, domain).code


REWARDS = RewardRegistry()


def _constant_factory(function: Callable) -> Callable[[Any], Callable]:
    """A factory that ignores the task; its `__module__` is the function's, so that the code in the
    cell key is the function's own."""

    def factory(task: Any) -> Callable:
        return function

    factory.__module__ = getattr(function, "__module__", None) or __name__
    factory.__wrapped__ = function
    return factory


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    value = importlib.import_module(module)
    for part in attr.split("."):
        value = getattr(value, part)
    return value


def user_function(spec: str, domain: Domain) -> Callable:
    """'package.module:function' or 'path/to/file.py:function': loaded, its signature checked (it
    must take the samples as its one argument), and wrapped so that a sys.exit() inside it fails
    the cell instead of ending the sweep."""
    target, _, attr = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            file = Path(target).expanduser()
            if not file.is_file():
                raise SpecError(f"reward={spec}: no such file {file}")
            name = f"_bench_reward_{file.stem}_{hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:8]}"
            module = _exec_file(name, file)
        else:
            module = importlib.import_module(target)
        function = getattr(module, attr)
    except SpecError:
        raise
    except SystemExit as exc:
        raise SpecError(
            f"reward={spec}: loading it called sys.exit({exc.code!r}); a reward module must only define its function"
        ) from None
    except Exception as exc:
        raise SpecError(
            f"reward={spec}: cannot load it ({first_line(exc)}); expected module:function or file.py:function"
        ) from None
    if not callable(function):
        raise SpecError(f"reward={spec}: {attr} is not callable")
    _check_signature(function, spec, domain)
    return _exit_is_an_error(function, spec, domain)


def _exec_file(name: str, file: Path):
    module_spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # found by name, so that its code is in the cells' keys
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def first_line(exc: BaseException) -> str:
    """'Type: the first line of its message', for one-line errors."""
    try:
        text = str(exc).strip()
    except Exception:  # a plug-in's exception whose str() fails still gets a line
        text = ""
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _check_signature(function: Callable, spec: str, domain: Domain) -> None:
    """SpecError unless function(samples) is a valid call (one positional argument)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # some builtins have no signature: nothing to check
        return
    try:
        signature.bind(object())
    except TypeError as exc:
        raise SpecError(
            f"reward={spec}: its signature {signature} cannot be called as function({domain.argument}) ({exc}); "
            f"expected function({domain.samples}) -> (B,) rewards"
        ) from None


def _exit_is_an_error(function: Callable, spec: str, domain: Domain) -> Callable:
    @functools.wraps(function)
    def reward(samples):
        try:
            return function(samples)
        except SystemExit as exc:
            raise RuntimeError(
                f"reward={spec} called sys.exit({exc.code!r}) while scoring {domain.argument}; a reward "
                "returns a (B,) tensor of rewards and never exits"
            ) from None

    return reward
