"""Files written whole or not at all (atomicfile.write_atomically), which the model file, run.py's
outputs, paropt's exports and split_valid.py write through."""
import os
import stat

import pytest

from atomicfile import write_atomically


def test_a_failed_write_leaves_the_old_file_and_nothing_else(tmp_path):
    target = tmp_path / 'out.txt'
    target.write_text('old')

    def fails_halfway(partial):
        partial.write_text('half')
        raise OSError(28, 'No space left on device')
    with pytest.raises(OSError, match=f"cannot write {str(target)!r}: No space left on device") as error:
        write_atomically(target, fails_halfway)
    assert error.value.errno == 28
    assert target.read_text() == 'old' and [p.name for p in tmp_path.iterdir()] == ['out.txt']


def test_other_errors_pass_through_unchanged_and_leave_nothing(tmp_path):
    def refuses(partial):
        partial.write_text('half')
        raise ValueError('not this content')
    with pytest.raises(ValueError, match='^not this content$'):
        write_atomically(tmp_path / 'out.txt', refuses)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_directory_is_named_with_its_error_type(tmp_path):
    target = tmp_path / 'missing' / 'out.txt'
    with pytest.raises(FileNotFoundError, match=f"cannot save {str(target)!r}: No such file or directory"):
        write_atomically(target, lambda partial: partial.write_text('x'), action='save')
    assert list(tmp_path.iterdir()) == []


def test_the_written_file_replaces_the_old_one_with_the_usual_permissions(tmp_path):
    target = tmp_path / 'out.txt.gz'
    target.write_text('old')
    seen = []

    def write(partial):
        seen.append(partial)
        partial.write_text('new')
    write_atomically(target, write)
    assert target.read_text() == 'new' and [p.name for p in tmp_path.iterdir()] == ['out.txt.gz']
    # The partial file sits beside the target and ends in its name (pandas picks compression by suffix).
    assert seen[0].parent == tmp_path and seen[0].name.endswith('-out.txt.gz')
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
