"""User-facing errors: anything the user can fix by editing a file or a path.

The CLI prints these as one line and exits with code 2 (no traceback unless --debug).
"""

import signal


class UserError(Exception):
    """An error caused by the user's input; the message names the field and the fix."""

    exit_code = 2


class Stopped(KeyboardInterrupt):
    """A stop signal (SIGTERM, SIGHUP) raised as KeyboardInterrupt, so every cleanup runs as on Ctrl-C.

    The command then exits 128 + the signal's number, as a shell reports a process that signal ended.
    """

    first_signal: int | None = None  # the first stop signal this process received

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.exit_code = 128 + signum
        if Stopped.first_signal is None:
            Stopped.first_signal = signum


def interrupted_exit_code(stop: KeyboardInterrupt) -> int:
    """128 + the stop signal's number (130 for Ctrl-C). Libraries that catch a `Stopped` while they
    clean up (Ray's blocking calls do) may re-raise a plain KeyboardInterrupt: the signal recorded
    when the `Stopped` was raised still decides."""
    if isinstance(stop, Stopped):
        return stop.exit_code
    return 128 + (Stopped.first_signal or signal.SIGINT)


def did_you_mean(name: str, choices) -> str:
    """Return ' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def describe_validation_error(error, source: str) -> str:
    """One line for the first problem in a pydantic ValidationError: 'SOURCE: a.b[0].c: message'."""
    return f"{source}: {describe_problem(error.errors()[0])}"


def problem_path(item: dict) -> str:
    """'a.b[0].c' for one pydantic error item, union branch labels left out."""
    path = ""
    for part in item.get("loc", ()):
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _is_union_branch_label(part):
            path += f".{part}" if path else str(part)
    return path


def describe_problem(item: dict) -> str:
    """'a.b[0].c: message' for one pydantic error item; a whole-model check names its own fields."""
    path = problem_path(item)
    message = item.get("msg", "invalid value").removeprefix("Value error, ")
    if item.get("type") == "extra_forbidden":
        known = item.get("ctx", {}).get("known_fields", ())
        message = "unknown key; remove it or fix the spelling" + did_you_mean(path.rsplit(".", 1)[-1], known)
    elif item.get("type") == "missing":
        message = "required key is missing; add it"
    return f"{path}: {message}" if path else message


def _is_union_branch_label(part) -> bool:
    # pydantic names union branches like 'list[float]' or 'function-after[...]' in error paths.
    return isinstance(part, str) and any(ch in part for ch in "[](),")
