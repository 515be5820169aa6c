"""The project's one error type, and the top-level handler that prints it without a traceback."""

import sys
import traceback


class PruneError(Exception):
    """A problem with the user's input or configuration. Its message names the file, key or layer at fault."""


def run_main(main, debug=False):
    """Run ``main()``; a PruneError becomes one line on stderr and exit status 2 (``DEBUG=True``: traceback too)."""
    try:
        return main()
    except PruneError as err:
        if debug:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: artifacts already written are intact", file=sys.stderr)
        sys.exit(130)
