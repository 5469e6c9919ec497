"""Training speed against the official PyTorch port (hidasib/GRU4Rec_PyTorch_Official), side by side.

    python benchmarks/compare_port.py --port /work/.mirror/hidasib+GRU4Rec_PyTorch_Official/repo --out port.md
    python benchmarks/compare_port.py --port PORT --out smoke.md --settings rsc15_topk_bprmax --steps 300

For each setting, one epoch on the same file: the port as a user runs it (its run.py -ps ... -d cpu,
torch's default threads) and then ours (benchmarks/train_speed.py). Prints the table (setting, data,
port mb/s, ours mb/s, ratio) and writes it to --out (markdown) and next to it as a PNG bar plot.

--port is the port's git directory (as `fetch` of github:hidasib/GRU4Rec_PyTorch_Official leaves it)
or a checkout of it. A git directory is cloned into --workdir; nothing of the port goes into this
repository. The port gets its own virtual environment (--venv; numpy<2, pandas<2.3, torch), made on
the first run. Data sets are written there as plain TSV (the port reads the header as text), cut to
their first --sessions sessions by start time where an epoch is long. --steps cuts every epoch on
both sides after that many mini-batches (the port through port_steps.py, which leaves its code as
is); the port's mb/s then counts its first step, ours leaves it out (train_speed.py).
"""
import argparse
import os
import re
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

from common import DATA_DIR, ROOT, threads

from atomicfile import write_atomically  # noqa: E402

Setting = namedtuple('Setting', 'label data sessions paramfile')
SETTINGS = {
    'rsc15_xe_shared_100_best': Setting('rsc15_xe_shared_100_best (100, 32)', 'yoochoose1_64_train_full', None,
                                        'rsc15_xe_shared_100_best.py'),
    'rsc15_topk_bprmax': Setting('Top-k bpr-max, one-hot (100, 32)', 'rsc15_100k_train_full', None,
                                 'rsc15_topk_bprmax.py'),
    'retailrocket_bprmax_shared_best': Setting('retailrocket_bprmax_shared_best (224, 80)', 'retailrocket_train_full',
                                               25000, 'retailrocket_bprmax_shared_best.py'),
    'diginetica_bprmax_shared_best': Setting('diginetica_bprmax_shared_best (512, 128)', 'diginetica_train_full',
                                             45000, 'diginetica_bprmax_shared_best.py'),
}
PORT_REQUIREMENTS = ['numpy<2', 'pandas<2.3', 'torch==2.13.0', 'joblib']  # torch 2.13.0: a CPU wheel on this disk
PORT_SPEED = re.compile(r'^Epoch1 --> loss: \S+\s+\(\S+s\)\s+\[([0-9.]+) mb/s', re.M)
OUR_SPEED = re.compile(r'^speed: ([0-9.]+) mini-batches/s', re.M)


def port_checkout(port, workdir):
    """A work tree of the port: --port itself, or a clone of the git directory --port into workdir."""
    port = Path(port).resolve()
    if (port / 'run.py').is_file():
        return port
    if not (port / 'HEAD').is_file():
        sys.exit(f'--port {port}: neither a checkout of the port (no run.py) nor a git directory (no HEAD); '
                 'give the path that `fetch` of github:hidasib/GRU4Rec_PyTorch_Official returned')
    checkout = workdir / 'GRU4Rec_PyTorch_Official'
    if not (checkout / 'run.py').is_file():
        subprocess.run(['git', 'clone', '--quiet', str(port), str(checkout)], check=True)
    return checkout


def port_python(venv):
    """The port's interpreter, in its own virtual environment, made and filled if it cannot import its needs."""
    python = venv / 'bin' / 'python'
    check = [str(python), '-c', 'import joblib, numpy, pandas, torch']
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f'setting up the port\'s virtual environment in {venv} ({", ".join(PORT_REQUIREMENTS)})', flush=True)
    subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
    subprocess.run([str(python), '-m', 'pip', 'install', '--quiet', *PORT_REQUIREMENTS], check=True)
    return python


def data_file(setting, sessions, workdir):
    """The setting's training data as a plain TSV in workdir, cut to its first sessions by start time."""
    import pandas as pd
    source = DATA_DIR / f'{setting.data}.tsv.gz'
    path = workdir / 'data' / (f'{setting.data}_first{sessions}.tsv' if sessions else f'{setting.data}.tsv')
    if path.exists():
        return path
    data = pd.read_csv(source, sep='\t', dtype={'SessionId': 'int64', 'ItemId': 'int64', 'Time': 'float64'})
    if sessions:
        starts = data.groupby('SessionId')['Time'].min().sort_values(kind='stable')
        if sessions > len(starts):
            sys.exit(f'{source} has {len(starts):,} sessions, fewer than the {sessions:,} asked for')
        data = data[data['SessionId'].isin(starts.index[:sessions])]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda partial: data[['SessionId', 'ItemId', 'Time']].to_csv(partial, sep='\t', index=False))
    return path


def port_parameters(params):
    """Our parameter file's values as the port's run.py -ps string, for one epoch.

    The port has no final_act (its bpr-max always applies ELU with elu_param, 0 for none; cross-entropy
    always softmax) and no adapt (it always uses Adagrad with momentum)."""
    port = {}
    for name, value in params.items():
        if name == 'final_act':
            if value.startswith('elu-'):
                port['elu_param'] = value[len('elu-'):]
            elif value == 'linear' and params.get('loss') == 'bpr-max':
                port['elu_param'] = 0
            elif not (value == 'softmax' and params.get('loss') == 'cross-entropy'):
                raise ValueError(f'final_act={value} with loss={params.get("loss")} has no equivalent in the port')
        elif name == 'adapt':
            if value != 'adagrad':
                raise ValueError(f'adapt={value}: the port only has Adagrad')
        else:
            port[name] = '/'.join(map(str, value)) if isinstance(value, (list, tuple)) else value
    port['n_epochs'] = 1
    return ','.join(f'{name}={value}' for name, value in port.items())


def measure(command, log, pattern, timeout, env=None):
    """Runs command, keeps its output in log, returns the speed that pattern finds in it."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                              env=env)
        output, failure = done.stdout, done.returncode and f'exit status {done.returncode}'
    except subprocess.TimeoutExpired as e:
        output, failure = (e.stdout or b'').decode(errors='replace'), f'no result within {timeout} s'
    log.write_text(' '.join(map(str, command)) + '\n\n' + output)
    match = pattern.search(output)
    if failure or not match:
        tail = '\n'.join(output.splitlines()[-15:])
        sys.exit(f'{command[1]}: {failure or "no speed line in its output"} (full output in {log}):\n{tail}')
    print(f'  {Path(command[1]).name}: {float(match.group(1)):.1f} mb/s ({time.perf_counter() - start:.0f} s in all)',
          flush=True)
    return float(match.group(1))


def write_table(rows, out, note):
    header = '| setting (layers, batch) | data | port mb/s | ours mb/s | ratio |\n|---|---|---|---|---|\n'
    lines = [f'| {label} | {data} | {port:.1f} | {ours:.1f} | {ours / port:.2f}x |' for label, data, port, ours in rows]
    table = header + '\n'.join(lines) + '\n'
    print('\n' + table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(note + '\n\n' + table)
    return table


def plot(rows, path, title):
    """Above: both sides' mini-batches/s (log scale from 1); below: ours / port, with the issue's 3x target."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    x = range(len(rows))
    names = [f'{label.replace(" (", chr(10) + "(")}\n{data}' for label, data, _, _ in rows]
    fig, (speed, ratio) = plt.subplots(2, 1, sharex=True, figsize=(2.6 * len(rows) + 3, 8),
                                       gridspec_kw={'height_ratios': [3, 2]})
    for offset, side, color, index in ((-0.2, 'official PyTorch port', 'tab:gray', 2), (0.2, 'ours', 'tab:blue', 3)):
        bars = speed.bar([i + offset for i in x], [row[index] for row in rows], 0.4, label=side, color=color)
        speed.bar_label(bars, fmt='%.1f', fontsize=8)
    speed.set_yscale('log')
    speed.set_ylim(1, max(max(row[2], row[3]) for row in rows) * 1.8)  # room for the labels
    speed.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter('%g'))
    speed.set_ylabel('mini-batches/s (log scale)')
    speed.legend(fontsize=8)
    bars = ratio.bar(list(x), [ours / port for _, _, port, ours in rows], 0.6, color='tab:blue')
    ratio.bar_label(bars, fmt='%.2fx', fontsize=8)
    ratio.axhline(1, color='black', linewidth=0.8)
    ratio.axhline(3, color='tab:red', linestyle='--', linewidth=0.8, label='3x (the target of issue 16)')
    ratio.set_ylabel('ours / port')
    ratio.margins(y=0.12)
    ratio.set_ylim(bottom=0)
    ratio.set_xticks(list(x), names, fontsize=8)
    ratio.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    write_atomically(path, lambda partial: fig.savefig(partial, dpi=120, format='png'))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--port', required=True, help="the port's git directory (from fetch) or a checkout of it")
    parser.add_argument('--out', required=True, type=Path, help='the markdown table; the plot goes next to it (.png)')
    parser.add_argument('--settings', nargs='+', choices=SETTINGS, default=list(SETTINGS), help='rows (default: all)')
    parser.add_argument('--steps', type=int, help='cut each epoch after this many mini-batches (both sides)')
    parser.add_argument('--sessions', type=int,
                        help="train on each data set's first SESSIONS sessions (default: the issue's subsets)")
    parser.add_argument('--workdir', type=Path, default=Path('/tmp/gru4rec_compare_port'),
                        help='for the port checkout, its venv, the data files and the logs (default %(default)s)')
    parser.add_argument('--venv', type=Path, help="the port's virtual environment (default WORKDIR/venv)")
    parser.add_argument('--port-threads', type=int,
                        help="OMP_NUM_THREADS for the port (default: torch's own default, one thread per core)")
    parser.add_argument('--timeout', type=int, default=3600, help='seconds allowed to each training run')
    args = parser.parse_args()
    if args.steps is not None and args.steps < 2:
        parser.error('--steps must be at least 2 (train_speed.py leaves the first step out of the speed)')
    if args.sessions is not None and args.sessions < 1:
        parser.error('--sessions must be positive')
    if args.port_threads is not None and args.port_threads < 1:
        parser.error('--port-threads must be positive')
    if args.out.suffix != '.md':
        parser.error(f'--out {args.out}: give a .md path (the plot goes next to it, as .png)')

    from run import read_paramfile
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / 'logs').mkdir(exist_ok=True)
    checkout = port_checkout(args.port, args.workdir)
    python = port_python((args.venv or args.workdir / 'venv').resolve())
    port_env = dict(os.environ, OMP_NUM_THREADS=str(args.port_threads)) if args.port_threads else None
    load_before = os.getloadavg()
    rows = []
    for name in args.settings:
        setting = SETTINGS[name]
        paramfile = ROOT / 'paramfiles' / setting.paramfile
        sessions = args.sessions or setting.sessions
        data = data_file(setting, sessions, args.workdir)
        data_label = setting.data.replace('_train_full', '') + (f', first {sessions:,} sessions' if sessions else '')
        print(f'{name} on {data_label}', flush=True)
        steps = ['--steps', str(args.steps)] if args.steps else []
        port_run = [str(checkout / 'run.py'), str(data), '-ps', port_parameters(read_paramfile(paramfile)), '-d', 'cpu']
        port_run = [str(python), *([str(ROOT / 'benchmarks' / 'port_steps.py'), str(args.steps)] if args.steps else []),
                    *port_run]
        ours = [sys.executable, str(ROOT / 'benchmarks' / 'train_speed.py'), '--data', str(data), '-pf', str(paramfile),
                *steps]
        port_speed = measure(port_run, args.workdir / 'logs' / f'{name}.port.log', PORT_SPEED, args.timeout, port_env)
        our_speed = measure(ours, args.workdir / 'logs' / f'{name}.ours.log', OUR_SPEED, args.timeout)
        rows.append((setting.label, data_label, port_speed, our_speed))
    load_after = os.getloadavg()
    scope = f'at most {args.steps:,} mini-batches of one epoch' if args.steps else 'one epoch'
    port_threads = args.port_threads or os.environ.get('OMP_NUM_THREADS') or "torch's default"
    note = (f'Measured {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} on {os.cpu_count()} CPUs, {scope} per '
            f'setting, port then ours; threads: port {port_threads}, ours {threads()}; 1-minute load average '
            f'{load_before[0]:.1f} before, {load_after[0]:.1f} after. '
            f'Command: `{" ".join(["python", "benchmarks/compare_port.py", *sys.argv[1:]])}`')
    write_table(rows, args.out, note)
    png = args.out.with_suffix('.png')
    plot(rows, png, f'GRU4Rec training speed, {scope} per setting\nthe official PyTorch port (run.py -d cpu) and ours '
                    f'(train_speed.py); load average {load_before[0]:.1f} before, {load_after[0]:.1f} after')
    print(f'wrote {args.out} and {png}; logs in {args.workdir / "logs"}')


if __name__ == '__main__':
    main()
