"""Files written whole or not at all: the model file, and every file the command-line tools write.

A reader, or a process killed while writing, never sees half a file at the path: the content goes to a
temporary file beside it, which is flushed to disk and then renamed over the path (a rename within one
directory is atomic on POSIX file systems).
"""
import os
import tempfile
from pathlib import Path

# The permissions open() gives a new file; mkstemp makes its files readable by their owner only.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


def write_atomically(path, write, action='write'):
    """Calls write(partial) with a new temporary path beside `path` (ending in its name, so that a writer
    that picks a format by the suffix, such as pandas' compression, writes the same), flushes it to disk and
    renames it to `path`. Two processes writing the same path at once each write their own partial file; the
    last rename wins. On failure the partial file is removed and nothing at `path` changes; an OSError is
    raised again as the same type, with the message "cannot {action} '{path}': {reason}"."""
    path = Path(path)
    partial = None
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix='.partial-', suffix=f'-{path.name}')
        os.close(fd)
        partial = Path(name)
        write(partial)
        with open(partial, 'rb') as f:
            os.fsync(f.fileno())
        os.chmod(partial, FILE_MODE)
        os.replace(partial, path)
    except BaseException as e:
        if partial is not None:
            partial.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None:
            raise type(e)(e.errno, f'cannot {action} {str(path)!r}: {e.strerror}') from None
        raise
