"""paropt.py workers sharing one study on a real PostgreSQL server, started in a temporary directory."""
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sessionlogs import synthetic_log

optuna = pytest.importorskip('optuna')
pytest.importorskip('psycopg2', reason="the PostgreSQL driver: pip install 'gru4rec[test]'")
REPO = Path(__file__).resolve().parents[1]
PG_BIN_DIRS = ['/usr/local/bin', *sorted(map(str, Path('/usr/lib/postgresql').glob('*/bin')), reverse=True)]
SPACE = [{'name': 'layers', 'dtype': 'int', 'values': [4, 8], 'step': 4},
         {'name': 'learning_rate', 'dtype': 'float', 'values': [0.05, 0.2], 'step': 0.05}]


def pg_bin():
    """The folder holding initdb and pg_ctl (the machine image's, or the Debian package's)."""
    for folder in PG_BIN_DIRS:
        if all(os.access(Path(folder) / tool, os.X_OK) for tool in ('initdb', 'pg_ctl')):
            return Path(folder)
    pytest.skip('PostgreSQL is not installed (no initdb / pg_ctl in /usr/local/bin or /usr/lib/postgresql/*/bin): '
                'apt-get install postgresql, as .ci/run does')


def as_server_user(command, **kwargs):
    """Runs a PostgreSQL tool; as root through the `postgres` system user, since PostgreSQL refuses root."""
    if os.geteuid() == 0:
        command = ['runuser', '-u', 'postgres', '--', *command]
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=60, **kwargs)


@pytest.fixture
def postgres_url():
    """A throw-away PostgreSQL server on a free port of 127.0.0.1; yields its SQLAlchemy URL."""
    tools = pg_bin()
    if os.geteuid() == 0:
        try:
            pwd.getpwnam('postgres')
        except KeyError:
            subprocess.run(['useradd', '--system', '--no-create-home', 'postgres'], check=True, timeout=60)
    folder = Path(tempfile.mkdtemp(prefix='gru4rec-pg-'))
    if os.geteuid() == 0:
        shutil.chown(folder, 'postgres', 'postgres')
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    data = folder / 'data'
    try:
        as_server_user([str(tools / 'initdb'), '-D', str(data), '-U', 'postgres', '-A', 'trust', '--no-sync'])
        as_server_user([str(tools / 'pg_ctl'), '-D', str(data), '-l', str(folder / 'server.log'), '-w', '-t', '30',
                        '-o', f'-h 127.0.0.1 -p {port} -k {folder} -F', 'start'])
        yield f'postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres'
    finally:
        if (data / 'postmaster.pid').exists():
            as_server_user([str(tools / 'pg_ctl'), '-D', str(data), '-m', 'immediate', '-w', 'stop'])
        shutil.rmtree(folder, ignore_errors=True)


def trial_numbers(log):
    """Numbers of the trials a worker's Optuna log says it finished, pruned or failed."""
    return [int(n) for n in re.findall(r'Trial (\d+) (?:finished|pruned|failed)', log)]


@pytest.mark.filterwarnings('ignore::optuna.exceptions.ExperimentalWarning')  # retried_trial_number
def test_two_workers_split_a_postgresql_study_and_it_survives_a_killed_worker(tmp_path, postgres_url):
    synthetic_log(60, seed=1).to_csv(tmp_path / 'train.tsv', sep='\t', index=False)
    synthetic_log(20, seed=2, first_session=501, first_time=1e5).to_csv(tmp_path / 'valid.tsv', sep='\t', index=False)
    (tmp_path / 'space.json').write_text('\n'.join(json.dumps(e) for e in SPACE))
    n_trials = 5
    command = [sys.executable, str(REPO / 'paropt.py'), 'train.tsv', 'valid.tsv', '-opf', 'space.json',
               '-ps', 'n_epochs=1,batch_size=8,n_sample=4,loss=bpr-max', '-nt', str(n_trials), '-pm', 'mrr',
               '--storage', postgres_url, '--study', 'shared', '--heartbeat', '1']
    # Each worker leads its own process group, so that killing it takes its run.py trial too, as when a
    # machine is lost.
    # One storage for all the test's reads: every load_study(storage=url) opens an engine of its own, and the
    # connections of those not yet collected exhaust the server's max_connections (100) on a slow machine.
    # Made before the workers start, it also creates the tables before they race to.
    storage = optuna.storages.RDBStorage(postgres_url)
    workers = [subprocess.Popen(command + ['--seed', str(seed)], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True) for seed in (1, 2)]
    victim, survivor = workers
    try:
        deadline = time.time() + 120
        while True:  # kill the victim while it runs its second trial
            assert time.time() < deadline, 'the first worker never started a second trial'
            time.sleep(0.2)
            try:
                study = optuna.load_study(study_name='shared', storage=storage)
            except KeyError:  # not created yet
                continue
            mine = [t for t in study.get_trials() if t.user_attrs.get('worker', '').endswith(f':{victim.pid}')]
            running = [t for t in mine if t.state == optuna.trial.TrialState.RUNNING]
            if running and len(mine) > 1:
                break
        os.killpg(victim.pid, signal.SIGKILL)
        killed = running[0].number
        victim_log = victim.communicate(timeout=30)[1]
        out, survivor_log = survivor.communicate(timeout=300)
    finally:
        for worker in workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
    assert survivor.returncode == 0, survivor_log
    assert 'Best trial #' in out

    trials = optuna.load_study(study_name='shared', storage=storage).get_trials()
    finished = [t for t in trials if t.state.is_finished()]
    # The survivor finds the killed trial stale at the start of a trial more than two heartbeats after the
    # kill and runs its retry right away; if it had started one trial in between, the study ends one over -nt.
    assert len(finished) == len(trials) and n_trials <= len(trials) <= n_trials + 1
    by_victim, by_survivor = trial_numbers(victim_log), trial_numbers(survivor_log)
    # Both workers ran trials, none twice, and every finished trial but the killed one was reported by its worker.
    assert by_victim and by_survivor and not set(by_victim) & set(by_survivor)
    assert sorted(by_victim + by_survivor + [killed]) == sorted(t.number for t in finished)
    assert all(t.user_attrs['worker'].endswith(f':{victim.pid}' if t.number in by_victim + [killed] else
                                               f':{survivor.pid}') for t in finished)
    # The killed trial was failed by the surviving worker once its heartbeat stopped, and retried with its
    # parameters as a new trial.
    assert trials[killed].state == optuna.trial.TrialState.FAIL
    retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number
    retries = [t for t in trials if retried(t) == killed]
    assert len(retries) == 1 and retries[0].params == trials[killed].params and retries[0].number in by_survivor
    assert all(0 <= t.value <= 1 for t in finished if t.state == optuna.trial.TrialState.COMPLETE)
