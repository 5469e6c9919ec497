"""Real servers for the tests, on free ports of 127.0.0.1, started and stopped by the tests: Redis
(`redis-server` from the system's packages; .ci/run installs it) and `gru4rec serve` itself."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import fit_small

ROOT = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = 'test-admin-token-0123456789'
ADMIN = {'authorization': f'Bearer {ADMIN_TOKEN}'}  # the header /reload needs


def saved_model(tmp_path_factory, params):
    """(a small model fitted with conftest.fit_small(**params), the path of its saved file)."""
    model = fit_small(**params)
    path = tmp_path_factory.mktemp('served') / 'model.gru4rec'
    model.savemodel(path)
    return model, path


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server in `folder` with its append-only file synced on every write, so that a kill
    loses nothing it acknowledged; kill() and start() again keep its data."""

    def __init__(self, folder):
        binary = shutil.which('redis-server')
        if binary is None:
            pytest.skip('redis-server is not installed (apt-get install redis-server; .ci/run does)')
        self.binary, self.folder, self.port, self.process = binary, Path(folder), free_port(), None
        self.folder.mkdir(parents=True, exist_ok=True)
        self.url = f'redis://127.0.0.1:{self.port}/0'

    def start(self):
        self.process = subprocess.Popen(
            [self.binary, '--port', str(self.port), '--bind', '127.0.0.1', '--dir', str(self.folder),
             '--appendonly', 'yes', '--appendfsync', 'always', '--save', '', '--protected-mode', 'no'],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while True:
            try:
                with socket.create_connection(('127.0.0.1', self.port), timeout=1) as s:
                    s.sendall(b'PING\r\n')
                    if s.recv(64).startswith(b'+PONG'):
                        return self
            except OSError:
                pass
            if self.process.poll() is not None or time.time() > deadline:
                self.stop()
                pytest.fail(f'redis-server did not start on port {self.port}')
            time.sleep(0.05)

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Service:
    """`python run.py serve MODEL ...` (the gru4rec console script's main) on a free port."""

    def __init__(self, model_path, *options, token=ADMIN_TOKEN):
        self.port = free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        env = dict(os.environ, OPENBLAS_NUM_THREADS='1')
        if token is not None:
            env['GRU4REC_ADMIN_TOKEN'] = token
        self.process = subprocess.Popen(
            [sys.executable, 'run.py', 'serve', str(model_path), '--port', str(self.port), *map(str, options)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + 90
        while True:
            try:
                if httpx.get(f'{self.url}/health').status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.time() > deadline:
                self.process.kill()
                pytest.fail(f'the service did not start: {self.process.stdout.read().decode()[-3000:]}')
            time.sleep(0.1)

    def kill(self):
        """SIGKILL: no shutdown of any kind, as in a crash or an OOM kill."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self, timeout=30):
        """SIGTERM, as a deploy ends a process; returns what it printed."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=timeout)
        return self.process.stdout.read().decode()
