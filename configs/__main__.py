"""``python -m configs [PREFIX]``: every config key with its default and the module that declares it."""
import sys

from configs.defaults import _C
from configs.schema import add_declared_keys


def main(argv):
    """Print ``KEY = default  (module)`` for every key starting with ``argv[0]`` (all keys by default)."""
    prefix = argv[0] if argv else ""
    cfg = _C.clone()
    owners = add_declared_keys(cfg)
    for key in sorted(owners):
        if key.startswith(prefix):
            node = cfg
            for part in key.split("."):
                node = node[part]
            print(f"{key} = {node!r}  ({owners[key]})")


if __name__ == "__main__":
    main(sys.argv[1:])
