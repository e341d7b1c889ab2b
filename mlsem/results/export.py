"""Writing results: atomic file writes (a failure leaves neither a partial
file nor a clobbered earlier one) and the JSON encoding of NumPy values."""
from __future__ import annotations

import errno
import os
import tempfile

import numpy as np


def atomic_write(path, write):
    """Write through a temporary file in the same directory, then rename:
    a failure leaves neither a partial file nor a clobbered earlier one."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"cannot write {path!r}: it is a directory", path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".mlsem-", suffix=".tmp", dir=d)
    except OSError as exc:  # name the user's path, not the temporary file's
        why = "its directory does not exist" if not os.path.isdir(d) else exc.strerror
        raise type(exc)(exc.errno, f"cannot write {path!r}: {why}", path) from None
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file 0600; give it the permissions a plain open() would
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise type(exc)(exc.errno, f"cannot write {path!r}: {exc.strerror or exc}", path) from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
