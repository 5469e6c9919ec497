"""HTTP speed of `gru4rec serve`: requests/s and latency of POST /click at 1, 16 and 64 concurrent
clients, against a real server on 127.0.0.1 that this script starts and stops.

    python benchmarks/http_speed.py --model /tmp/yc64.gru4rec --data yoochoose1_64_test
    python benchmarks/http_speed.py --model /tmp/yc64.gru4rec --baseline /tmp/main   # before/after
    python benchmarks/http_speed.py --model /tmp/yc64.gru4rec --servers memory:1 redis:2   # deployments

--servers names the deployments to measure side by side: STORE:WORKERS, the store `memory` (one
process's own) or `redis` (a redis-server this script starts on a free port, with its append-only file
synced every second, as Redis is commonly run), served by that many uvicorn workers. With --baseline,
the server of another checkout (e.g. `git worktree add /tmp/main main`) runs too, and each level drives
it and then this checkout's servers, back to back, with the ratio of their req/s.
`cpu ms` is the server's CPU time per request (user + system of its processes, from /proc; Redis's in
parentheses), which depends less on what else the machine runs than the rates do; `load` the 1-minute
load average after the level.
Each client holds one keep-alive connection and sends the clicks of its own sessions (from the test
log) one request after another, top 20 each; the load generator is a minimal asyncio HTTP/1.1 client
in this process (it shares the machine's cores with the server). Bounded by --seconds per level and
--requests in all per level.
"""
import argparse
import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from common import ROOT, load_log


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_for_port(process, port, what):
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(('127.0.0.1', port), timeout=1):
                return process
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.3)
    process.kill()
    sys.exit(f'{what} did not start')


def start_server(model, port, root=ROOT, env=None, options=()):
    """`run.py serve MODEL` in root, once it accepts connections on port; env: extra environment variables."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS=os.environ.get('OPENBLAS_NUM_THREADS', '1'), **(env or {}))
    process = subprocess.Popen([sys.executable, 'run.py', 'serve', model, '--port', str(port), *options],
                               cwd=root, env=env)
    return wait_for_port(process, port, 'the server')


def start_redis(folder):
    """A redis-server on a free port of 127.0.0.1 with its files in folder: (process, URL)."""
    binary = shutil.which('redis-server') or sys.exit('redis-server is not installed (apt-get install redis-server)')
    port = free_port()
    process = subprocess.Popen([binary, '--port', str(port), '--bind', '127.0.0.1', '--dir', folder, '--save', '',
                                '--appendonly', 'yes', '--appendfsync', 'everysec'], stdout=subprocess.DEVNULL)
    return wait_for_port(process, port, 'redis-server'), f'redis://127.0.0.1:{port}/0'


def cpu_seconds(process):
    """User + system CPU seconds a process and its children (uvicorn's workers) have used so far (Linux
    /proc; NaN elsewhere)."""
    def own(pid):
        try:
            with open(f'/proc/{pid}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
    try:
        with open(f'/proc/{process.pid}/task/{process.pid}/children') as f:
            children = f.read().split()
    except OSError:
        return float('nan')
    return own(process.pid) + sum(own(child) for child in children)


async def client(port, clicks, latencies, failures, deadline):
    reader, writer = await asyncio.open_connection('127.0.0.1', port)
    try:
        for session, item in clicks:
            if time.perf_counter() > deadline:
                break
            body = f'{{"session_id": {session}, "item_id": {item}, "k": 20}}'.encode()
            request = (b'POST /click HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n'
                       b'Content-Length: %d\r\n\r\n' % len(body)) + body
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b'\r\n\r\n')
            length = int(re.search(rb'content-length: *(\d+)', head, re.IGNORECASE).group(1))
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - t0)
            if not head.startswith(b'HTTP/1.1 200'):
                failures.append(head.split(b'\r\n', 1)[0])
    except (OSError, asyncio.IncompleteReadError) as e:
        failures.append(repr(e))
    finally:
        writer.close()


async def level(port, streams, seconds):
    latencies, failures = [], []
    start = time.perf_counter()
    await asyncio.gather(*(client(port, s, latencies, failures, start + seconds) for s in streams))
    return np.array(latencies), failures, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', required=True, help='a model file (GRU4Rec.savemodel)')
    parser.add_argument('--data', default='yoochoose1_64_test', help='click stream (default %(default)s)')
    parser.add_argument('--clients', type=int, nargs='+', default=[1, 16, 64])
    parser.add_argument('--requests', type=int, default=20000, help='at most this many requests per level')
    parser.add_argument('--seconds', type=float, default=10, help='at most about this long per level')
    parser.add_argument('--baseline', help="another checkout's root whose server to measure alongside")
    parser.add_argument('--servers', nargs='+', default=['memory:1'],
                        help='deployments of this checkout to measure, STORE:WORKERS (default %(default)s)')
    args = parser.parse_args()
    log = load_log(args.data).sort_values(['SessionId', 'Time'], kind='stable')
    clicks = list(zip(log.SessionId.tolist(), log.ItemId.tolist()))[:args.requests]
    servers = {}  # name -> (port, process)
    redis, folder = None, tempfile.mkdtemp(prefix='http_speed_redis_')
    try:
        if args.baseline:
            port = free_port()
            servers['baseline'] = (port, start_server(args.model, port, args.baseline))
        for spec in args.servers:
            store, workers = spec.split(':')
            options = ['--workers', workers]
            if store == 'redis':
                if redis is None:
                    redis, url = start_redis(folder)
                options += ['--state-store', url]
            port = free_port()
            servers[spec] = (port, start_server(args.model, port, options=options))
        print(f'{"server":>9} {"clients":>7} {"requests":>8} {"req/s":>8} {"p50 ms":>7} {"p99 ms":>7} '
              f'{"errors":>6} {"cpu ms":>12} {"load":>5}')
        for n_clients in args.clients:
            # Clients take whole sessions in turn, so that each session's clicks stay in order.
            bounds = np.r_[0, np.flatnonzero(np.diff([s for s, _ in clicks])) + 1, len(clicks)]
            streams = [[] for _ in range(n_clients)]
            for j in range(len(bounds) - 1):
                streams[j % n_clients].extend(clicks[bounds[j]:bounds[j + 1]])
            rates = []
            for name, (port, process) in servers.items():
                cpu = cpu_seconds(process)
                cpu_redis = cpu_seconds(redis) if redis and 'redis' in name else None
                latencies, failures, seconds = asyncio.run(level(port, streams, args.seconds))
                cpu = 1e3 * (cpu_seconds(process) - cpu) / len(latencies)
                if cpu_redis is not None:
                    cpu = f'{cpu:.2f} ({1e3 * (cpu_seconds(redis) - cpu_redis) / len(latencies):.2f})'
                else:
                    cpu = f'{cpu:.2f}'
                rates.append(len(latencies) / seconds)
                print(f'{name:>9} {n_clients:>7} {len(latencies):>8} {rates[-1]:>8.0f} '
                      f'{1e3 * np.median(latencies):>7.2f} {1e3 * np.quantile(latencies, 0.99):>7.2f} '
                      f'{len(failures):>6} {cpu:>12} {os.getloadavg()[0]:>5.2f}', flush=True)
                if failures:
                    print('  first failures:', failures[:3])
            if args.baseline:
                print(f'{"ratio":>9} {n_clients:>7} {"":>8} '
                      + ' '.join(f'{rate / rates[0]:>8.2f}' for rate in rates[1:]), flush=True)
    finally:
        for _, process in servers.values():
            process.terminate()
            process.wait(timeout=30)
        if redis is not None:
            redis.terminate()
            redis.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == '__main__':
    main()
