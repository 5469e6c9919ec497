// A process's worker threads for C kernels that split their work (cbackend.OutputLayer, RowAdagrad): the calling
// thread runs a task with the workers that take it up, each kernel's module with workers of its own.
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
// (the next layer's or update's task often comes within that time), then sleeps on a futex: a thread that
// spun between the steps' tasks would take the core from the sample store's thread. A sleeping worker takes
// tens of microseconds to wake on a virtual machine, so the tasks' work goes in pieces that the threads claim
// as they come: the calling thread does not wait for a worker, and does all of it alone where none comes.
const int MAX_WORKERS = 15;
const long SPIN_NS = 150000;
static std::atomic<uint32_t> generation{0};  // bumped once per task: the futex the workers wait on
static std::atomic<Task*> current{nullptr};
static std::atomic<int> threads_wanted{1};
static std::atomic<int> inside{0};           // workers between taking up the task and leaving it
static std::atomic<bool> busy{false};        // a thread of the process is running a task on the workers
static int workers = 0;
static pid_t workers_pid = 0;

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

#ifdef __linux__  // (the workers start on Linux only)
static long now_ns() {
    timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static void* work(void* arg) {
    const int tid = (int)(intptr_t)arg;
    uint32_t seen = generation.load();
    long idle_since = now_ns();
    for (;;) {
        const uint32_t now = generation.load(std::memory_order_acquire);
        if (now == seen) {
            if (now_ns() - idle_since < SPIN_NS) {
                for (int q = 0; q < 32; q++) spin_pause();
                sched_yield();
            } else {
                futex_wait(&generation, seen);
                idle_since = now_ns();
            }
            continue;
        }
        seen = now;
        // Entering before reading the task, and the caller clearing the task before counting who is
        // inside (both sequentially consistent), lets no worker start on a task that has returned.
        inside.fetch_add(1);
        Task* task = current.load();
        if (task && tid < threads_wanted.load()) task->run(tid);
        inside.fetch_sub(1);
        idle_since = now_ns();
    }
    return nullptr;
}
#endif

// Starts workers up to `wanted` (again in a forked child, which has none); returns how many there are (none
// but on Linux, where the workers wait on a futex).
static int start_workers(int wanted) {
#ifdef __linux__
    if (workers_pid != getpid()) {
        workers = 0;
        workers_pid = getpid();
        inside.store(0);
    }
    wanted = std::min(wanted, MAX_WORKERS);
    if (workers >= wanted) return workers;
    sigset_t all, previous;  // the workers take no signals: Python handles them on its own thread
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &previous);
    while (workers < wanted) {
        pthread_t thread;
        if (pthread_create(&thread, nullptr, work, (void*)(intptr_t)(workers + 1)) != 0) break;
        pthread_detach(thread);
        workers++;
    }
    pthread_sigmask(SIG_SETMASK, &previous, nullptr);
    return workers;
#else
    return 0;
#endif
}

// Runs `task` on the calling thread and on up to threads - 1 workers; returns when no worker is in it.
// A second thread of the process that runs a task meanwhile runs its own alone.
static void run(Task* task, int threads) {
    bool idle = false;
    if (threads < 2 || !busy.compare_exchange_strong(idle, true)) {
        task->run(0);
        return;
    }
    threads = 1 + start_workers(threads - 1);
    threads_wanted.store(threads);
    current.store(task);
    generation.fetch_add(1, std::memory_order_release);
    if (threads > 1) futex_wake(&generation, threads - 1);
    task->run(0);
    current.store(nullptr);
    while (inside.load() != 0) spin_pause();
    busy.store(false);
}

}  // namespace worker_pool
