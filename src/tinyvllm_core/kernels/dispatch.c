// Runs a captured jit's CPU kernels in one call from Python: each kernel is a function pointer with its arguments as
// 64-bit words; a kernel split over threads runs part 0 here and the others on worker threads that spin between parts
// (a hand-off is ~100 ns, not the ~20 us of a Python queue and semaphore) and sleep when no kernel came for a while.
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <time.h>

#define MAX_ARGS 32
#define MAX_WORKERS 63
#define SPIN_NS 300000  // a worker spins this long after a part before it sleeps: a decode step's layers come closer
#define SPINS 2000  // then a waiting thread yields its core: on a busy machine the thread it waits for may need it

typedef void (*kernel_fn)(uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t,
                          uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t,
                          uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t,
                          uint64_t, uint64_t, uint64_t, uint64_t, uint64_t);

typedef struct {
  kernel_fn fn;
  int64_t core_id;      // the argument that takes the thread index, or -1
  int64_t num_threads;  // parts of a split kernel
  uint64_t argv[MAX_ARGS];
} kernel_t;

typedef struct {
  int64_t kernel, pos, slot;  // argv[pos] of that kernel = the address of input `slot`
} patch_t;

typedef struct {
  uint64_t posted, done;  // job counters: the worker runs when posted != done
  int32_t sleeping;
  kernel_fn fn;
  uint64_t argv[MAX_ARGS];
} worker_t;

static worker_t workers[MAX_WORKERS];
static int num_workers;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t run_lock = PTHREAD_MUTEX_INITIALIZER;  // one tv_run at a time: the workers are shared

static void call(kernel_fn fn, const uint64_t *a) {
  // SysV x86-64 and AArch64: the caller pops the arguments, so a kernel taking fewer ignores the rest
  fn(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15], a[16], a[17],
     a[18], a[19], a[20], a[21], a[22], a[23], a[24], a[25], a[26], a[27], a[28], a[29], a[30], a[31]);
}

static void pause_cpu(int spins) {
  if (spins > SPINS) {
    sched_yield();
    return;
  }
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ volatile("yield");
#endif
}

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int has_job(worker_t *w) {
  return __atomic_load_n(&w->posted, __ATOMIC_SEQ_CST) != __atomic_load_n(&w->done, __ATOMIC_RELAXED);
}

static void *worker_main(void *arg) {
  worker_t *w = arg;
  for (;;) {
    int64_t idle_since = now_ns();
    for (int spins = 0; !has_job(w); spins++) {
      pause_cpu(spins);
      if (spins % 256 || now_ns() - idle_since < SPIN_NS) continue;
      pthread_mutex_lock(&lock);
      __atomic_store_n(&w->sleeping, 1, __ATOMIC_SEQ_CST);
      while (!has_job(w)) pthread_cond_wait(&wake, &lock);
      __atomic_store_n(&w->sleeping, 0, __ATOMIC_SEQ_CST);
      pthread_mutex_unlock(&lock);
    }
    call(w->fn, w->argv);
    __atomic_store_n(&w->done, w->posted, __ATOMIC_RELEASE);
  }
  return 0;
}

static void forget_workers(void) {  // in a forked child: the workers did not come along
  for (int i = 0; i < MAX_WORKERS; i++) workers[i].posted = workers[i].done = workers[i].sleeping = 0;
  num_workers = 0;
  pthread_mutex_init(&lock, 0);
  pthread_cond_init(&wake, 0);
  pthread_mutex_init(&run_lock, 0);
}

static void register_fork_handler(void) { pthread_atfork(0, 0, forget_workers); }

int tv_start_workers(int n) {  // -> the number of workers running (at least n unless threads cannot start)
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  pthread_once(&once, register_fork_handler);
  for (; num_workers < n && num_workers < MAX_WORKERS; num_workers++) {
    pthread_t thread;
    if (pthread_create(&thread, 0, worker_main, &workers[num_workers])) break;
    pthread_detach(thread);
  }
  return num_workers;
}

static void post(worker_t *w, const kernel_t *k, int64_t tid) {
  w->fn = k->fn;
  for (int i = 0; i < MAX_ARGS; i++) w->argv[i] = k->argv[i];
  w->argv[k->core_id] = (uint64_t)tid;
  __atomic_store_n(&w->posted, w->posted + 1, __ATOMIC_SEQ_CST);
  if (__atomic_load_n(&w->sleeping, __ATOMIC_SEQ_CST)) {
    pthread_mutex_lock(&lock);
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&lock);
  }
}

static void run_split(kernel_t *k) {
  if (tv_start_workers(k->num_threads - 1) < k->num_threads - 1) {  // no threads: every part here
    for (int64_t tid = 0; tid < k->num_threads; tid++) {
      k->argv[k->core_id] = (uint64_t)tid;
      call(k->fn, k->argv);
    }
    return;
  }
  for (int64_t tid = 1; tid < k->num_threads; tid++) post(&workers[tid - 1], k, tid);
  uint64_t argv[MAX_ARGS];
  for (int i = 0; i < MAX_ARGS; i++) argv[i] = k->argv[i];
  argv[k->core_id] = 0;
  call(k->fn, argv);
  for (int64_t tid = 1; tid < k->num_threads; tid++)
    for (int spins = 0; __atomic_load_n(&workers[tid - 1].done, __ATOMIC_ACQUIRE) != workers[tid - 1].posted; spins++)
      pause_cpu(spins);
}

void tv_run(kernel_t *kernels, int64_t num_kernels, const patch_t *patches, int64_t num_patches, const uint64_t *addrs) {
  pthread_mutex_lock(&run_lock);
  for (int64_t i = 0; i < num_patches; i++) kernels[patches[i].kernel].argv[patches[i].pos] = addrs[patches[i].slot];
  for (int64_t i = 0; i < num_kernels; i++) {
    if (kernels[i].num_threads > 1)
      run_split(&kernels[i]);
    else
      call(kernels[i].fn, kernels[i].argv);
  }
  pthread_mutex_unlock(&run_lock);
}
