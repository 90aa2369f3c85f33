"""A name -> object registry: the one list of the models, datasets or loss terms a config can name.

Each kind has one ``Registry`` (``model.MODELS``, ``datasets.DATASETS``, ``loss.LOSSES``). Entries register
themselves with a decorator in the file that defines them; on the first lookup the registry imports every
module of its package (found by walking the folder), so that file is the only place a new entry has to be
written.
"""
import difflib

from utils.discovery import import_package_modules
from utils.errors import ConfigError


class RegistryError(Exception):
    """A programming mistake in registrations (e.g. one name registered twice)."""


class Registry:
    """Maps names to objects for one kind of component.

    ``kind`` is used in messages ("model"), ``config_key`` names the config key that selects entries
    ("MODEL.ARCH_NAME") and every module of ``package`` (e.g. "model") is imported before the first lookup.
    """

    def __init__(self, kind, config_key, package=None):
        self.kind = kind
        self.config_key = config_key
        self._package = package
        self._entries = {}
        self._loaded = False

    def register(self, name):
        """Decorator adding the decorated object under ``name``; registering a taken name is an error."""

        def wrap(obj):
            if name in self._entries and self._entries[name] is not obj:
                raise RegistryError(f"{self.kind} name {name!r} is registered twice "
                                    f"({_describe(self._entries[name])} and {_describe(obj)})")
            self._entries[name] = obj
            return obj

        return wrap

    def _load_builtins(self):
        if not self._loaded:
            self._loaded = True
            if self._package:
                import_package_modules(self._package)

    def names(self):
        """Sorted names of every entry."""
        self._load_builtins()
        return sorted(self._entries)

    def __contains__(self, name):
        self._load_builtins()
        return name in self._entries

    def get(self, name, config_key=None):
        """The entry called ``name``; an unknown name raises a one-line ``ConfigError`` with close matches."""
        self._load_builtins()
        if name not in self._entries:
            raise ConfigError(self.unknown_message(name, config_key))
        return self._entries[name]

    def unknown_message(self, name, config_key=None):
        key = config_key or self.config_key
        close = difflib.get_close_matches(str(name), list(self._entries), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return f"config key {key} = {name!r}: no {self.kind} of that name{hint} (known: {', '.join(self.names())})"


def _describe(obj):
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
