"""The error contract of every entry point: a ``UserError`` is one ``error:`` line and exit code 2."""
import sys

from utils.errors import UserError


def run_main(main):
    """Call ``main()``; turn a ``UserError`` into one ``error:`` line and exit code 2."""
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
