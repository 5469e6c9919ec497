"""Every example of README.md and docs/*.md runs: each fenced python and bash block, in the document's
order, as a reader following it would run them.

A block may carry markers, HTML comments (invisible once rendered) on the lines right before its fence:

    <!-- doctest: skip REASON -->                         not run; the reason says why
    <!-- doctest: replace `OLD` with `NEW` (REASON) -->   run with OLD replaced by NEW, e.g. fewer epochs

OLD must occur in the block, so that a marker never outlives the text it changes; `{port}` in NEW
becomes a free TCP port. A fence in any other language (text, json) is shown, not run; every fence
must name its language, so that no example escapes the test by a missing `python`.

The blocks of one document run one after another in a scratch copy of the repository (its files,
without the virtual environment, caches or git data) next to a link `shared` to the real data folder,
so that `../shared/data`, `paramfiles/` and `run.py` resolve as in a clone and whatever the examples
write stays in the scratch folder. Python blocks run with this interpreter. Bash blocks run with
`set -eo pipefail` and this interpreter's bin folder first on PATH, as in an activated virtual
environment: `python`, `pip` and the `gru4rec` command are its own (where `gru4rec` is not installed,
`python -m run`, which is what the console script runs). Background processes a block starts (a
server) are ended with it. The documents run on the real data in ../shared/data and are skipped where it
is absent.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.docs

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
DOCUMENTS = ['README.md', *sorted(str(p.relative_to(REPO)) for p in (REPO / 'docs').glob('*.md'))]
RUN_LANGUAGES = {'python': 'python', 'bash': 'bash', 'sh': 'bash', 'shell': 'bash'}
SHOWN_LANGUAGES = {'text', 'json', 'console-output', 'toml', 'ini', 'markdown'}
MARKER = re.compile(r'<!--\s*doctest:\s*(.*?)\s*-->', re.DOTALL)
REPLACE = re.compile(r'replace\s+`([^`]*)`\s+with\s+`([^`]*)`\s*(\(.*\))?$', re.DOTALL)
FENCE = re.compile(r'^(```+)(.*)$')
BLOCK_TIMEOUT = 600
SCRATCH_IGNORE = shutil.ignore_patterns('.git', '.venv', '__pycache__', '*.egg-info', '.pytest_cache', '.hypothesis',
                                        'build', 'dist', 'data', '*.gru4rec', '*.db')


class Block:
    """A fenced block: its language, text, first line number and markers ('skip' reason or replacements)."""

    def __init__(self, language, text, line, markers):
        self.language, self.text, self.line = language, text, line
        self.skip, self.replacements = None, []
        for marker in markers:
            if marker.startswith('skip'):
                self.skip = marker[len('skip'):].strip()
                if not self.skip:
                    raise ValueError(f'line {line}: "doctest: skip" needs a reason')
                continue
            match = REPLACE.match(marker)
            if match is None:
                raise ValueError(f'line {line}: unknown doctest marker {marker!r}; use "skip REASON" or '
                                 '"replace `OLD` with `NEW` (REASON)"')
            if match.group(1) not in text:
                raise ValueError(f'line {line}: the marker replaces {match.group(1)!r}, which the block does not hold')
            self.replacements.append(match.group(1, 2))

    def runnable(self):
        return self.language in RUN_LANGUAGES and self.skip is None

    def code(self, port):
        text = self.text
        for old, new in self.replacements:
            text = text.replace(old, new.replace('{port}', str(port)))
        return text


def parse_blocks(markdown):
    """The fenced blocks of a markdown text, each with the markers of the comment lines before it."""
    blocks, markers, lines = [], [], markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line.strip())
        if fence is None:
            if line.strip():
                found = MARKER.findall(line)
                markers = markers + found if found and line.strip().startswith('<!--') else []
            i += 1
            continue
        language = fence.group(2).strip().split(' ')[0].lower()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence.group(1)), None)
        if end is None:
            raise ValueError(f'line {i + 1}: the fence is never closed')
        if not language:
            raise ValueError(f'line {i + 1}: a fence without a language; name it (python, bash, text, ...)')
        if language not in RUN_LANGUAGES and language not in SHOWN_LANGUAGES:
            raise ValueError(f'line {i + 1}: unknown fence language {language!r}')
        if markers and language not in RUN_LANGUAGES:
            raise ValueError(f'line {i + 1}: doctest markers on a {language} block, which is not run anyway')
        blocks.append(Block(language, '\n'.join(lines[i + 1:end]) + '\n', i + 2, markers))
        markers, i = [], end + 1
    if markers:
        raise ValueError(f'doctest markers {markers} at the end of the document, before no block')
    return blocks


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def scratch_clone(folder):
    """A copy of the repository's files at folder/repo with folder/shared linked to the real data folder."""
    clone = folder / 'repo'
    shutil.copytree(REPO, clone, ignore=SCRATCH_IGNORE, symlinks=True)
    if SHARED.is_dir():
        (folder / 'shared').symlink_to(SHARED, target_is_directory=True)
    return clone


def environment(clone, folder):
    """Variables of an activated virtual environment of this interpreter, the clone's modules first."""
    bin_dir = Path(sys.executable).parent
    path = [str(bin_dir)]
    if shutil.which('gru4rec', path=str(bin_dir)) is None:
        shim = folder / 'bin' / 'gru4rec'
        shim.parent.mkdir()
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m run "$@"\n')
        shim.chmod(0o755)
        path.insert(0, str(shim.parent))
    env = dict(os.environ, PATH=os.pathsep.join(path + [os.environ.get('PATH', '')]), PYTHONPATH=str(clone),
               VIRTUAL_ENV=str(bin_dir.parent))
    env.pop('PYTHONHOME', None)
    return env


def run_block(block, clone, env, where):
    """Runs one block in the clone; raises AssertionError with its output when it fails."""
    code = block.code(free_port())
    if RUN_LANGUAGES[block.language] == 'python':
        script = clone / '_doc_example.py'
        script.write_text(code)
        command = [sys.executable, script.name]
    else:
        command = ['bash', '-c', 'set -eo pipefail\n' + code]
    log = clone / '_doc_example.log'  # a file, not a pipe: a background server would hold a pipe open
    with open(log, 'w') as out:
        process = subprocess.Popen(command, cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
        try:
            process.wait(timeout=BLOCK_TIMEOUT)
        finally:
            try:  # the block's background processes (a server) end with it
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            process.kill()
            process.wait()
    output = log.read_text()
    if process.returncode != 0:
        raise AssertionError(f'{where}, the {block.language} block at line {block.line} failed '
                             f'(exit status {process.returncode}):\n{code}\n--- output ---\n{output[-6000:]}')
    return output


def run_document(markdown, folder, where):
    """Runs the document's runnable blocks in order in a fresh scratch clone; returns their outputs."""
    blocks = parse_blocks(markdown)
    clone = scratch_clone(folder)
    env = environment(clone, folder)
    return [run_block(block, clone, env, where) for block in blocks if block.runnable()]


@pytest.mark.parametrize('document', DOCUMENTS)
def test_every_example_of_the_document_runs(document, tmp_path):
    markdown = (REPO / document).read_text(encoding='utf-8')
    blocks = parse_blocks(markdown)  # a bad marker or fence fails here, with or without the data
    if not any(block.runnable() for block in blocks):
        return
    if '../shared/data' in markdown and not (SHARED / 'data').is_dir():
        pytest.skip(f'real data not found: {SHARED / "data"} (../shared/data from the repository root) is absent')
    run_document(markdown, tmp_path, document)


def test_a_failing_example_fails_with_its_line_and_output(tmp_path):
    markdown = ('# Doc\n\n```python\nprint("fine")\n```\n\n<!-- doctest: replace `3` with `4` (checks the '
                'replacement) -->\n```bash\necho 3 > three.txt\n```\n\n```python\nimport pathlib\n'
                'assert pathlib.Path("three.txt").read_text() == "4\\n"\nraise SystemExit("broken example")\n```\n')
    with pytest.raises(AssertionError, match=r'(?s)the python block at line 13 failed.*broken example'):
        run_document(markdown, tmp_path, 'doc.md')


def test_a_background_server_ends_with_its_block(tmp_path):
    markdown = '```bash\nsleep 300 &\necho $! > pid\n```\n'
    run_document(markdown, tmp_path, 'doc.md')
    pid = int((tmp_path / 'repo' / 'pid').read_text())
    with pytest.raises(ProcessLookupError):
        for _ in range(50):  # the process may take a moment to be reaped
            os.kill(pid, 0)
            subprocess.run(['sleep', '0.1'], check=True)


@pytest.mark.parametrize('markdown, error', [
    ('<!-- doctest: skip -->\n```python\npass\n```\n', 'needs a reason'),
    ('<!-- doctest: fast -->\n```python\npass\n```\n', 'unknown doctest marker'),
    ('<!-- doctest: replace `n_epochs=10` with `n_epochs=1` (short) -->\n```python\nn_epochs=5\n```\n',
     'does not hold'),
    ('```\npass\n```\n', 'without a language'),
    ('```python\npass\n', 'never closed'),
    ('<!-- doctest: skip slow -->\n```text\noutput\n```\n', 'not run anyway'),
    ('text\n<!-- doctest: skip slow -->\n', 'before no block'),
])
def test_bad_markers_and_fences_are_refused(markdown, error):
    with pytest.raises(ValueError, match=error):
        parse_blocks(markdown)


def test_markers_apply_to_the_next_block_only():
    blocks = parse_blocks('<!-- doctest: skip needs a GPU -->\n```bash\nnvidia-smi\n```\n\n```bash\necho hi\n```\n'
                          '<!-- doctest: replace `10` with `1` (quick) -->\n```python\nn = 10\n```\n')
    assert [(b.language, b.skip, b.runnable()) for b in blocks] == [
        ('bash', 'needs a GPU', False), ('bash', None, True), ('python', None, True)]
    assert blocks[2].code(port=0) == 'n = 1\n'
