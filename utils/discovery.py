"""Finding a package's modules by walking its folder, so that no hand-kept list names them."""
import importlib
import os
import pkgutil

_imported = set()


def import_package_modules(package_name):
    """Import ``package_name`` and every module below it, once per process (registrations and config
    declarations run when their module is imported)."""
    if package_name in _imported:
        return
    _imported.add(package_name)
    package = importlib.import_module(package_name)
    for info in pkgutil.walk_packages([os.path.dirname(package.__file__)], prefix=f"{package_name}."):
        importlib.import_module(info.name)
