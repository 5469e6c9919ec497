"""Where live sessions keep their state: in this process's memory, or in Redis for many processes.

A live session's state is what the next click needs (live.py): the GRU's hidden state of every layer
(float32) and the item indices of its last `history` clicks (for exclude_seen), with the number of
clicks read so far. Both stores read, step and write that state per session; the network's step is
passed in, so a store knows shapes, never weights.

- InProcessStore: preallocated rows for `capacity` sessions; the least recently used session is
  ended to make room, an idle one after `idle_timeout` seconds. Lost when the process ends.
- RedisStore: one Redis string per session, `idle_timeout` as its TTL; the most sessions are Redis's
  own (maxmemory with an LRU eviction policy). Any number of processes on any number of machines serve
  the same sessions, and the sessions outlive every one of them. A click steps the state here and
  writes it back only if Redis still holds the state it was stepped from (a compare-and-set script,
  which also renews the TTL), else reads it again and steps again: two processes clicking one session
  at once never lose a click. The state it steps from is the one this process wrote last, when it
  still has it (a cache of `capacity` sessions), so that a click usually costs one round trip to
  Redis, not two; the compare-and-set makes a stale copy harmless.

Keys carry a namespace (the model's lineage and the state's shape), so that the states of one model
are never read by a network they mean nothing to.
"""
import os
import threading
import time
from collections import OrderedDict

import numpy as np

FLOAT = np.float32


def _available_memory():
    """Bytes of memory the system can give without swapping (Linux MemAvailable), None if unknown."""
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n):
    return f'{n / 2 ** 30:,.1f} GiB' if n >= 2 ** 30 else f'{n / 2 ** 20:,.1f} MiB'


class InProcessStore:
    """Session states in preallocated rows of this process's memory (see the module docstring).
    Thread-safe: every method takes the store's lock, and none calls another while holding it."""

    ENTRY_BYTES = 200  # the session id map's entry (the id, its row, the ordered dict's links), about

    def __init__(self, layers, history, capacity=100_000, idle_timeout=1800.0, clock=time.monotonic):
        self.layers, self.history = list(layers), int(history)
        self.capacity, self.idle_timeout, self.clock = int(capacity), idle_timeout, clock
        needed = self.capacity * (self.bytes_per_session + self.ENTRY_BYTES)
        available = _available_memory()
        if available is not None and needed > available:
            raise ValueError(f'capacity={self.capacity:,} sessions need {_gib(needed)} of memory '
                             f'({self.bytes_per_session + self.ENTRY_BYTES} bytes each), more than the '
                             f'{_gib(available)} available: lower the capacity, or keep the states in Redis')
        self._lock = threading.Lock()
        self._states = [np.zeros((self.capacity, L), dtype=FLOAT) for L in self.layers]  # capacity x L
        self._seen = np.zeros((self.capacity, self.history), dtype=np.int32)  # capacity x history, a ring
        self._n_clicks = np.zeros(self.capacity, dtype=np.int64)  # known clicks so far
        self._last = np.zeros(self.capacity, dtype=np.float64)  # time of the last use
        self._rows = OrderedDict()  # session id -> row, least recently used first
        self._free = list(range(self.capacity - 1, -1, -1))

    @property
    def bytes_per_session(self):
        """Bytes of preallocated state per session (without the session id map's entry)."""
        return 4 * sum(self.layers) + 4 * self.history + 8 + 8

    def fresh(self, layers, namespace):
        """An empty store of the same kind and settings, for the states of another network."""
        return InProcessStore(layers, self.history, self.capacity, self.idle_timeout, self.clock)

    def describe(self):
        return f'in-process memory (capacity {self.capacity:,} sessions)'

    def __len__(self):
        with self._lock:
            self._expire(self.clock())
            return len(self._rows)

    def __contains__(self, session_id):
        with self._lock:
            self._expire(self.clock())
            return session_id in self._rows

    def advance(self, session_ids, X, step):
        """Steps the states of distinct sessions by their clicked item indices X (M): a session that
        is not live starts from the zero state. step(X, H) -> new H, H a list of M x L per layer.
        Returns (the last layer's new states (M x L), the item indices each session has seen)."""
        H_last = np.empty((len(X), self.layers[-1]), dtype=FLOAT)  # M x L
        seen = [None] * len(X)
        with self._lock:
            now = self.clock()
            self._expire(now)
            # At most `capacity` sessions at a time, so that making room never ends a session of the
            # same chunk: their rows are the most recently used.
            for first in range(0, len(X), self.capacity):
                part = slice(first, first + self.capacity)
                rows = np.array([self._row(s, now) for s in session_ids[part]])
                H = step(X[part], [states[rows] for states in self._states])
                for states, h in zip(self._states, H):
                    states[rows] = h
                H_last[part] = H[-1]
                if self.history:
                    self._seen[rows, self._n_clicks[rows] % self.history] = X[part]
                self._n_clicks[rows] += 1
                seen[part] = [self._seen_of(row) for row in rows]
        return H_last, seen

    def read(self, session_ids, touch=True):
        """(last layer's states (M x L, zero where not live), live (M booleans), seen indices (None where
        not live)); touch: the read counts as use for the LRU order and the time-out."""
        H_last = np.zeros((len(session_ids), self.layers[-1]), dtype=FLOAT)  # M x L
        live = np.zeros(len(session_ids), dtype=bool)
        seen = [None] * len(session_ids)
        with self._lock:
            now = self.clock()
            self._expire(now)
            for i, session_id in enumerate(session_ids):
                row = self._rows.get(session_id)
                if row is None:
                    continue
                if touch:
                    self._rows.move_to_end(session_id)
                    self._last[row] = now
                H_last[i], live[i], seen[i] = self._states[-1][row], True, self._seen_of(row)
        return H_last, live, seen

    def end(self, session_id):
        """Ends a session; returns whether it was live."""
        with self._lock:
            self._expire(self.clock())
            row = self._rows.pop(session_id, None)
            if row is None:
                return False
            self._free.append(row)
            return True

    def close(self):
        pass

    # -- with the lock held ----------------------------------------------------------------------------

    def _expire(self, now):
        """Ends the sessions idle for longer than idle_timeout: the least recently used come first."""
        if self.idle_timeout is None:
            return
        while self._rows:
            session_id, row = next(iter(self._rows.items()))
            if now - self._last[row] <= self.idle_timeout:
                return
            del self._rows[session_id]
            self._free.append(row)

    def _row(self, session_id, now):
        """The row of a session, made most recently used; a new one (zero state) if it is not live."""
        row = self._rows.get(session_id)
        if row is not None:
            self._rows.move_to_end(session_id)
        else:
            if not self._free:
                _, evicted = self._rows.popitem(last=False)
                self._free.append(evicted)
            row = self._free.pop()
            for states in self._states:
                states[row] = 0
            self._n_clicks[row] = 0
            self._rows[session_id] = row
        self._last[row] = now
        return row

    def _seen_of(self, row):
        return self._seen[row, :min(self._n_clicks[row], self.history)].copy()


# Writes each KEYS[i] to ARGV[2i + 1] only if it still holds ARGV[2i] ('' for no key), with a TTL of
# ARGV[1] ms (0: none); returns the positions (1-based) of the keys that changed meanwhile.
_COMPARE_AND_SET = """
local ttl = tonumber(ARGV[1])
local changed = {}
for i, key in ipairs(KEYS) do
    local current = redis.call('GET', key)
    if current == false then current = '' end
    if current == ARGV[2 * i] then
        if ttl > 0 then
            redis.call('SET', key, ARGV[2 * i + 1], 'PX', ttl)
        else
            redis.call('SET', key, ARGV[2 * i + 1])
        end
    else
        changed[#changed + 1] = i
    end
end
return changed
"""


class RedisStore:
    """Session states in Redis (see the module docstring). `url`: redis://[:password@]host:port/db
    (or rediss:// for TLS, unix:// for a socket). One string per session: the number of clicks
    (int64), the hidden state of every layer (float32) and the history ring (int32), little-endian."""

    PREFIX = 'gru4rec'
    MAX_RETRIES = 100

    def __init__(self, url, layers, history, namespace, idle_timeout=1800.0, capacity=100_000, client=None):
        try:
            import redis
        except ImportError:
            raise ValueError('a redis:// state store needs redis-py: pip install "gru4rec[redis]"') from None
        self.url, self.layers, self.history = url, list(layers), int(history)
        self.idle_timeout, self.namespace, self.capacity = idle_timeout, namespace, int(capacity)
        self._ttl = 0 if idle_timeout is None else max(1, int(round(idle_timeout * 1000)))
        if client is None:
            try:
                client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10)
                client.ping()
            except (redis.RedisError, ValueError) as e:
                raise ValueError(f'cannot use the state store {self.safe_url(url)}: {e}') from None
        self._redis = client
        self._cas = client.register_script(_COMPARE_AND_SET)
        self._dtype = np.dtype([('n', '<i8'), ('h', '<f4', (sum(self.layers),)), ('seen', '<i4', (self.history,))])
        self._bounds = np.cumsum([0] + self.layers)
        self._written = OrderedDict()  # key -> the state this process wrote last, least recently used first
        self._lock = threading.Lock()  # of _written only: never held during a call to Redis

    @staticmethod
    def safe_url(url):
        """The URL without its password, for messages and logs."""
        head, sep, rest = url.partition('://')
        return f'{head}{sep}{rest.rpartition("@")[2]}' if '@' in rest else url

    @property
    def bytes_per_session(self):
        return self._dtype.itemsize

    def fresh(self, layers, namespace):
        return RedisStore(self.url, layers, self.history, namespace, self.idle_timeout, self.capacity, self._redis)

    def describe(self):
        return f'Redis at {self.safe_url(self.url)} (namespace {self.namespace})'

    def key(self, session_id):
        # int 1 and str '1' are two sessions, as in a dict
        kind = 's' if isinstance(session_id, str) else 'i'
        return f'{self.PREFIX}:{self.namespace}:{kind}:{session_id}'

    def __len__(self):
        return sum(1 for _ in self._redis.scan_iter(match=f'{self.PREFIX}:{self.namespace}:*', count=1000))

    def __contains__(self, session_id):
        return bool(self._redis.exists(self.key(session_id)))

    def _get(self, keys, touch):
        if len(keys) == 1:  # a pipeline's own cost is that of a round trip on the loopback
            key = keys[0]
            return [self._redis.getex(key, px=self._ttl) if touch and self._ttl else self._redis.get(key)]
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            if touch and self._ttl:
                pipe.getex(key, px=self._ttl)
            else:
                pipe.get(key)
        return pipe.execute()

    def _decode(self, blobs):
        """(records of the blobs that hold a state, live mask); a blob of another size counts as none."""
        live = np.array([b is not None and len(b) == self._dtype.itemsize for b in blobs], dtype=bool)
        records = np.zeros(len(blobs), dtype=self._dtype)
        if live.any():
            records[live] = np.frombuffer(b''.join(b for b, ok in zip(blobs, live) if ok), dtype=self._dtype)
        return records, live

    def _split(self, h):
        return [np.ascontiguousarray(h[:, a:b]) for a, b in zip(self._bounds[:-1], self._bounds[1:])]

    def _seen_of(self, record):
        return record['seen'][:min(int(record['n']), self.history)].copy()

    def _remember(self, keys, blobs):
        with self._lock:
            for key, blob in zip(keys, blobs):
                if blob is None:
                    self._written.pop(key, None)
                    continue
                self._written[key] = blob
                self._written.move_to_end(key)
            while len(self._written) > self.capacity:
                self._written.popitem(last=False)

    def advance(self, session_ids, X, step):
        """As InProcessStore.advance."""
        H_last = np.empty((len(X), self.layers[-1]), dtype=FLOAT)  # M x L
        seen = [None] * len(X)
        todo = np.arange(len(X))
        keys = [self.key(s) for s in session_ids]
        with self._lock:  # first try: from the states this process wrote last
            blobs = [self._written.get(key) for key in keys]
        for _ in range(self.MAX_RETRIES):
            missing = [j for j, blob in enumerate(blobs) if blob is None]
            if missing:  # not written here (or changed elsewhere): read them
                for j, blob in zip(missing, self._get([keys[todo[j]] for j in missing], touch=False)):
                    blobs[j] = blob
            records, _ = self._decode(blobs)
            H = step(X[todo], self._split(records['h']))
            records['h'] = np.concatenate(H, axis=1)
            if self.history:
                records['seen'][np.arange(len(todo)), records['n'] % self.history] = X[todo]
            records['n'] += 1
            args, new_blobs = [self._ttl], [r.tobytes() for r in records]
            for old, new in zip(blobs, new_blobs):
                args += [b'' if old is None else old, new]
            todo_keys = [keys[i] for i in todo]
            changed = np.asarray(self._cas(keys=todo_keys, args=args), dtype=np.int64) - 1
            done = np.ones(len(todo), dtype=bool)
            done[changed] = False
            self._remember(todo_keys, [new if ok else None for new, ok in zip(new_blobs, done)])
            H_last[todo[done]] = H[-1][done]
            for j in np.flatnonzero(done):
                seen[todo[j]] = self._seen_of(records[j])
            todo = todo[~done]
            blobs = [None] * len(todo)
            if not len(todo):
                return H_last, seen
        raise RuntimeError(f'{len(todo)} session state(s) kept changing under {self.MAX_RETRIES} tries to update them')

    def read(self, session_ids, touch=True):
        """As InProcessStore.read."""
        records, live = self._decode(self._get([self.key(s) for s in session_ids], touch))
        H_last = np.where(live[:, None], records['h'][:, self._bounds[-2]:], FLOAT(0)).astype(FLOAT)
        seen = [self._seen_of(r) if ok else None for r, ok in zip(records, live)]
        return H_last, live, seen

    def end(self, session_id):
        key = self.key(session_id)
        self._remember([key], [None])
        return bool(self._redis.delete(key))

    def close(self):
        self._redis.close()
