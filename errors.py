"""One base for every error a user can fix (bad input, missing data, a failed download).

Each entry point (the training scripts, evaluate.py, python -m data.*) runs its main() through
`main_exits_2_on_user_error`: a UserError prints its message and exits 2 without a traceback; every other exception
is a bug and keeps its traceback.
"""

import sys


class UserError(Exception):
    """Something the user can fix: the message says what happened and what to try."""


def main_exits_2_on_user_error(main, *args, **kwargs):
    """Run an entry point's main(); a UserError becomes `error: message` on stderr and exit status 2."""
    try:
        return main(*args, **kwargs)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
