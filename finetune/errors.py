"""The error type every component raises for bad input, carrying the exit code the CLI returns."""

from __future__ import annotations

__all__ = ["EXIT_FAILURE", "EXIT_USAGE", "FinetuneError"]

EXIT_FAILURE = 1  # the job ran but could not produce its result (no usable image, training failed remotely, …)
EXIT_USAGE = 2  # bad arguments, config or input, detected before work started


class FinetuneError(Exception):
    """A problem the user can fix; the message names the file, key or field, what is wrong and how to fix it."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code
