// The process's worker threads for C kernels that split their work (cbackend.OutputLayer, RowAdagrad, the
// products in pieces): the calling thread runs a task with the workers that take it up. Every compiled module
// includes this code, and the first to run a task publishes its pool (a Python module named WORKER_POOL_NAME
// holds its address) for the others: one pool for the whole process, whose workers stay ready from one
// kernel's task to the next.
namespace worker_pool {

static inline void spin_pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

// Work that the calling thread (tid 0) and the workers (tid 1, 2, ...) share: each runs run(tid), which
// must be safe to run again by the same tid and to find the work already done by others.
struct Task {
    virtual void run(int tid) = 0;
    virtual ~Task() {}
};

// A worker waits for the next task for SPIN_NS after each, yielding its core to any other thread that wants it
// (the next task of the step comes within that time while a model trains), then sleeps on a futex: a worker
// that spun on would take the core from the sample store's thread after training. A sleeping worker takes tens
// of microseconds to wake on a virtual machine, so the tasks' work goes in pieces that the threads claim as
// they come: the calling thread does not wait for a worker, and does all of it alone where none comes.
const int MAX_WORKERS = 15;
const long SPIN_NS = 1000000;
// The name under which the pool is published; a change to struct Pool must change it, so that modules built
// from different versions of this file never share one.
#define WORKER_POOL_NAME "_gru4rec_worker_pool_v2"

struct Pool {
    std::atomic<uint32_t> generation{0};  // bumped once per task: the futex the workers wait on
    std::atomic<Task*> current{nullptr};
    std::atomic<int> threads_wanted{1};
    std::atomic<int> inside{0};           // workers between taking up the task and leaving it
    std::atomic<int> sleeping{0};         // workers asleep on the futex (or about to be)
    std::atomic<bool> busy{false};        // a thread of the process is running a task on the workers
    int workers = 0;
    pid_t pid = 0;
};

static void futex_wait(std::atomic<uint32_t>* word, uint32_t value) {
#ifdef __linux__
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT_PRIVATE, value, nullptr, nullptr, 0);
#endif
}

static void futex_wake(std::atomic<uint32_t>* word, int n) {
#ifdef __linux__
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE_PRIVATE, n, nullptr, nullptr, 0);
#endif
}

// The process's pool: this module's own, published, or the one another module published. Called with the
// GIL held (by a kernel's run), which orders the modules' first calls; NULL (with a Python error) on failure.
static Pool* pool() {
    static Pool* found = nullptr;
    if (found) return found;
    PyObject* holder = PyImport_AddModule(WORKER_POOL_NAME);  // borrowed; made empty on first use
    if (!holder) return nullptr;
    PyObject* address = PyObject_GetAttrString(holder, "address");
    if (address) {
        found = (Pool*)PyLong_AsVoidPtr(address);
        Py_DECREF(address);
        return found;
    }
    PyErr_Clear();
    static Pool own;
    address = PyLong_FromVoidPtr(&own);
    if (!address || PyObject_SetAttrString(holder, "address", address) != 0) {
        Py_XDECREF(address);
        return nullptr;
    }
    Py_DECREF(address);
    return found = &own;
}

#ifdef __linux__  // (the workers start on Linux only)
static long now_ns() {
    timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

struct Worker {
    Pool* pool;
    int tid;
};

static void* work(void* arg) {
    Pool& p = *((Worker*)arg)->pool;
    const int tid = ((Worker*)arg)->tid;
    delete (Worker*)arg;
    uint32_t seen = p.generation.load();
    long idle_since = now_ns();
    for (;;) {
        const uint32_t now = p.generation.load(std::memory_order_acquire);
        if (now == seen) {
            if (now_ns() - idle_since < SPIN_NS) {
                for (int q = 0; q < 32; q++) spin_pause();
                sched_yield();
            } else {
                // Counted as sleeping before the last look at the generation: a caller that bumps it after
                // that look sees the count and wakes the futex.
                p.sleeping.fetch_add(1);
                futex_wait(&p.generation, seen);
                p.sleeping.fetch_sub(1);
                idle_since = now_ns();
            }
            continue;
        }
        seen = now;
        // Entering before reading the task, and the caller clearing the task before counting who is
        // inside (both sequentially consistent), lets no worker start on a task that has returned.
        p.inside.fetch_add(1);
        Task* task = p.current.load();
        if (task && tid < p.threads_wanted.load()) task->run(tid);
        p.inside.fetch_sub(1);
        idle_since = now_ns();
    }
    return nullptr;
}
#endif

// Starts workers up to `wanted` (again in a forked child, which has none); returns how many there are, which
// an earlier task may have made more than wanted (none but on Linux, where the workers wait on a futex).
static int start_workers(Pool& p, int wanted) {
#ifdef __linux__
    if (p.pid != getpid()) {
        p.workers = 0;
        p.pid = getpid();
        p.inside.store(0);
        p.sleeping.store(0);
    }
    wanted = std::min(wanted, MAX_WORKERS);
    if (p.workers >= wanted) return p.workers;
    sigset_t all, previous;  // the workers take no signals: Python handles them on its own thread
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &previous);
    while (p.workers < wanted) {
        pthread_t thread;
        Worker* arg = new Worker{&p, p.workers + 1};
        if (pthread_create(&thread, nullptr, work, arg) != 0) {
            delete arg;
            break;
        }
        pthread_detach(thread);
        p.workers++;
    }
    pthread_sigmask(SIG_SETMASK, &previous, nullptr);
    return p.workers;
#else
    return 0;
#endif
}

// Runs `task` on the calling thread and on up to threads - 1 workers; returns when no worker is in it.
// A second thread of the process that runs a task meanwhile runs its own alone, as does a task whose pool
// cannot be found (the Python error cleared: the task is done all the same).
static void run(Task* task, int threads) {
    Pool* found = threads < 2 ? nullptr : pool();
    if (!found) PyErr_Clear();
    bool idle = false;
    if (!found || !found->busy.compare_exchange_strong(idle, true)) {
        task->run(0);
        return;
    }
    Pool& p = *found;
    threads = 1 + std::min(threads - 1, start_workers(p, threads - 1));  // the pool may have more workers
    p.threads_wanted.store(threads);
    p.current.store(task);
    p.generation.fetch_add(1);
    if (threads > 1 && p.sleeping.load() > 0) futex_wake(&p.generation, threads - 1);
    task->run(0);
    p.current.store(nullptr);
    while (p.inside.load() != 0) spin_pause();
    p.busy.store(false);
}

}  // namespace worker_pool
