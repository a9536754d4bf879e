"""One family for every error that means "the user asked for something wrong".

Each error a user can cause (a bad recipe, a run that cannot be done as asked, a damaged
checkpoint, a pattern that matches nothing, memory that will not suffice, a failed distributed
set-up, an export that cannot be done or fails its checks) is a ``CompressorError``. The CLI catches
this one type and prints the message without a traceback; library users can catch it too. The
subclasses keep their older built-in bases (``ValueError``, ``MemoryError``, ...) so existing
``except`` clauses go on working.
"""

from __future__ import annotations


class CompressorError(Exception):
    """Base of compressor's user-facing errors; ``str(error)`` is the whole message."""
