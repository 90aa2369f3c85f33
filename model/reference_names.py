"""Renaming between this framework's parameter names and those of the authors' code: one convention for
every model.

A name table is a tuple of ``(our name, the authors' name)`` pairs. A name ending in "." is a prefix (the
rest of the key is kept as it is), any other name is a whole key. Both directions use the same table, and
the longest matching name wins, so the order of a table does not matter.
"""
from utils.errors import CheckpointError


def match_name(key, table, to_reference):
    """``(source name, target name)`` of the pair of ``table`` that renames ``key`` in that direction, or None."""
    best = None
    for ours, reference in table:
        source, target = (ours, reference) if to_reference else (reference, ours)
        hit = key.startswith(source) if source.endswith(".") else key == source
        if hit and (best is None or len(source) > len(best[0])):
            best = (source, target)
    return best


def rename_key(key, table, to_reference):
    """``key`` renamed by ``table`` (to the authors' names with ``to_reference``, else to ours), or None."""
    found = match_name(key, table, to_reference)
    return None if found is None else found[1] + key[len(found[0]):]


def rename_state_dict(state_dict, table, to_reference, source):
    """``state_dict`` with every key renamed by ``table``; ``CheckpointError`` naming ``source`` and the keys that
    no pair maps."""
    renamed, unmapped = {}, []
    for key, value in state_dict.items():
        new_key = rename_key(key, table, to_reference)
        if new_key is None:
            unmapped.append(key)
        else:
            renamed[new_key] = value
    if unmapped:
        shown = ", ".join(unmapped[:5]) + (f", ... {len(unmapped) - 5} more" if len(unmapped) > 5 else "")
        raise CheckpointError(f"{source}: {len(unmapped)} key(s) have no counterpart: {shown}")
    return renamed
