/* fmap platform layer for Linux: Mutex, Semaphore and Event.
 *
 * Each object is one page of a memfd, registered in the registry of names like
 * a mapping (so the name goes with the last handle and the memory with the
 * last holder, crash or not), laid out by fmap_sync_init before the name is
 * published:
 *
 *   - a header: magic, version, type and sizes, checked by every opener;
 *   - the state on one cache line: a futex word (semaphore count, event
 *     state) with a count of its sleepers, or a glibc robust mutex; and
 *     `seq`, bumped on every release or set, which wait_any sleeps on.
 *
 * Mutexes are pthread mutexes, process-shared, robust and recursive: the
 * kernel's robust-list protocol marks one abandoned when its owning thread
 * dies, and the next locker gets EOWNERDEAD (Windows: WAIT_ABANDONED).
 * Semaphores and events are our own shared futex words; releasers make a
 * system call only when the sleeper count says someone sleeps, so the
 * uncontended paths stay in user space.  Sleepers and wakers pair their
 * updates with sequentially consistent atomics (a Dekker handshake): either
 * the sleeper sees the new state or the waker sees the sleeper.
 *
 * A sleeper killed while counted leaves the count high: later releases then
 * make a harmless futex_wake each.  Nothing else a dead process leaves here
 * can block anyone.
 */
#define _GNU_SOURCE
#include "fmap.h"
#include "futex_linux.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* ---- the one macro table ------------------------------------------------ */
#ifndef SYS_futex_waitv
#define SYS_futex_waitv 449         /* Linux 5.16, the same number on every arch */
#endif
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 30))
#define HAVE_CLOCKLOCK 1            /* pthread_mutex_clocklock: glibc 2.30 */
#else
#define HAVE_CLOCKLOCK 0
#endif

#define SYNC_MAGIC "FMAPSYN\x01"
#define SYNC_VERSION 1u
#define FUTEX_32_FLAG 2u            /* futex_waitv: a 32-bit word; shared (no FUTEX2_PRIVATE) */

struct sync_page {
    char magic[8];          /* written last by init */
    uint32_t version;
    uint32_t type;          /* FMAP_T_* */
    uint32_t size;          /* sizeof(struct sync_page) of the creator */
    uint32_t mutex_size;    /* sizeof(pthread_mutex_t) of the creator */
    uint32_t flags;         /* FMAP_SYNC_*, fixed at creation */
    uint32_t maximum;       /* semaphore: maximum count, fixed at creation */
    /* What every acquire and release touches, on one cache line. */
    struct {
        uint32_t seq;           /* bumped on every release / set: wait_any's futex */
        uint32_t seq_waiters;   /* wait_any callers sleeping on seq */
        uint32_t word;          /* futex: semaphore count, or event state (1 = set) */
        uint32_t waiters;       /* threads sleeping on word */
        uint32_t depth;         /* mutex: recursion depth, written by the owner only */
        uint32_t pad;
        pthread_mutex_t m;      /* mutex: robust, recursive, process-shared */
    } st __attribute__((aligned(64)));
};

/* A handle: its mapping of the page, and what the page's header said when
   the handle was opened, checked then and never read from the page again
   (any process holding the object can rewrite the page: a type read anew
   would let it make an event's handle run pthread code on a forged mutex,
   or a mutex's close() unmap a page the robust list still points into). */
struct fmap_sync {
    struct sync_page *p;
    uint32_t type;          /* FMAP_T_* */
    uint32_t flags;         /* FMAP_SYNC_* */
    uint32_t maximum;       /* semaphore */
};

/* The robust-futex word the kernel reads is glibc's __lock, the mutex's first
   int (ABI-fixed): TID of the owner | FUTEX_WAITERS | FUTEX_OWNER_DIED. */
_Static_assert(sizeof(pthread_mutex_t) >= sizeof(uint32_t), "pthread_mutex_t");

static int fail(fmap_err *e, int status, int sys, const char *call)
{
    e->status = status;
    e->sys = sys;
    e->call = call;
    return status;
}

/* ---- time, threads, futexes --------------------------------------------- */

uint64_t fmap_clock_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}


static __thread int t_tid;          /* gettid(), cached per thread */
static pthread_once_t tid_once = PTHREAD_ONCE_INIT;

static void tid_after_fork(void)
{
    t_tid = 0;   /* the forking thread has a new id in the child */
}

static void tid_init(void)
{
    pthread_atfork(NULL, NULL, tid_after_fork);
}

static int my_tid(void)
{
    int t = t_tid;
    if (!t) {
        pthread_once(&tid_once, tid_init);
        t = t_tid = (int)syscall(SYS_gettid);
    }
    return t;
}

static uint32_t load(const uint32_t *w)
{
    return __atomic_load_n(w, __ATOMIC_SEQ_CST);
}


static uint32_t mutex_word(struct sync_page *s)
{
    return __atomic_load_n((uint32_t *)&s->st.m, __ATOMIC_RELAXED);
}

/* Does a live thread of this process own the mutex? */
static int owned_here(const fmap_sync *h)
{
    if (h->type != FMAP_T_MUTEX)
        return 0;
    uint32_t tid = mutex_word(h->p) & FUTEX_TID_MASK;
    if (!tid)
        return 0;
    if ((int)tid == my_tid())
        return 1;
    return syscall(SYS_tgkill, fmap_getpid(), (int)tid, 0) == 0;
}

/* wait_any sleepers watch seq: bump it, and wake them only if there are any.
   The bump is a full barrier, ordering the release before the sleeper check. */
static void seq_signal(struct sync_page *s)
{
    __atomic_add_fetch(&s->st.seq, 1, __ATOMIC_SEQ_CST);
    if (load(&s->st.seq_waiters))
        futex_wake(&s->st.seq, INT_MAX);
}

/* ---- pages -------------------------------------------------------------- */

size_t fmap_sync_size(void)
{
    size_t page = fmap_page_size();
    return sizeof(struct sync_page) > page ? sizeof(struct sync_page) : page;
}

static int map_page(int fd, struct sync_page **out, fmap_err *e)
{
    void *p = mmap(NULL, fmap_sync_size(), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        return fail(e, FMAP_ESYS, errno, "mmap");
    *out = p;
    return FMAP_OK;
}

static fmap_sync *new_handle(struct sync_page *p, uint32_t type, uint32_t flags,
                             uint32_t maximum, fmap_err *e)
{
    fmap_sync *h = malloc(sizeof *h);
    if (!h) {
        fail(e, FMAP_ESYS, ENOMEM, "malloc");
        return NULL;
    }
    h->p = p;
    h->type = type;
    h->flags = flags;
    h->maximum = type == FMAP_T_SEMAPHORE ? maximum : 0;
    return h;
}

int fmap_sync_init(void *ctx, int fd, fmap_err *e)
{
    fmap_syncspec *sp = ctx;
    struct sync_page *s;
    sp->page = NULL;
    if (map_page(fd, &s, e) != FMAP_OK)
        return e->status;
    fmap_sync *h = new_handle(s, sp->type, sp->flags, sp->maximum, e);
    if (!h) {
        munmap(s, fmap_sync_size());
        return e->status;
    }
    /* A new memfd reads zeros: only the non-zero fields are written. */
    s->version = SYNC_VERSION;
    s->type = sp->type;
    s->size = sizeof(struct sync_page);
    s->mutex_size = sizeof(pthread_mutex_t);
    s->flags = sp->flags;
    if (sp->type == FMAP_T_MUTEX) {
        pthread_mutexattr_t a;
        pthread_mutexattr_init(&a);
        pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
        pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
        pthread_mutexattr_settype(&a, PTHREAD_MUTEX_RECURSIVE);
        int rc = pthread_mutex_init(&s->st.m, &a);
        pthread_mutexattr_destroy(&a);
        if (rc != 0) {
            munmap(s, fmap_sync_size());
            free(h);
            return fail(e, FMAP_ESYS, rc, "pthread_mutex_init");
        }
        /* CreateMutex(bInitialOwner): owned before anyone can open it.  The
           lock goes through the page the handle keeps, so glibc's robust list
           points at a mapping that stays. */
        if ((sp->flags & FMAP_SYNC_OWNED) && pthread_mutex_trylock(&s->st.m) == 0)
            s->st.depth = 1;
    } else if (sp->type == FMAP_T_SEMAPHORE) {
        s->maximum = sp->maximum;
        s->st.word = sp->initial;
    } else {
        s->st.word = sp->initial ? 1 : 0;
    }
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memcpy(s->magic, SYNC_MAGIC, 8);
    sp->page = h;
    return FMAP_OK;
}

int fmap_sync_map(int fd, uint32_t type, fmap_sync **out, fmap_err *e)
{
    struct stat st;
    struct sync_page *s;
    if (fstat(fd, &st) != 0)
        return fail(e, FMAP_ESYS, errno, "fstat");
    if ((uint64_t)st.st_size < sizeof(struct sync_page))
        return fail(e, FMAP_ECORRUPT, 0, "the object is smaller than a synchronization object");
    if (map_page(fd, &s, e) != FMAP_OK)
        return e->status;
    /* The handle takes the type asked for (the one checked) and the flags
       and maximum as read now, once. */
    uint32_t flags = __atomic_load_n(&s->flags, __ATOMIC_RELAXED);
    uint32_t maximum = __atomic_load_n(&s->maximum, __ATOMIC_RELAXED);
    if (memcmp(s->magic, SYNC_MAGIC, 8) != 0 || s->version != SYNC_VERSION ||
        s->type != type || s->size != sizeof(struct sync_page) ||
        s->mutex_size != sizeof(pthread_mutex_t)) {
        munmap(s, fmap_sync_size());
        return fail(e, FMAP_ECORRUPT, 0,
                    "the object's header has a wrong magic, version, type or size");
    }
    fmap_sync *h = new_handle(s, type, flags, maximum, e);
    if (!h) {
        munmap(s, fmap_sync_size());
        return e->status;
    }
    *out = h;
    return FMAP_OK;
}

static void drop_handle(fmap_sync *h)
{
    munmap(h->p, fmap_sync_size());
    free(h);
}

/* Handles closed while a thread of ours still owned their mutex. */
struct retired {
    struct retired *next;
    fmap_sync *h;
};
static struct retired *g_retired;
static pthread_mutex_t g_retired_lock = PTHREAD_MUTEX_INITIALIZER;

void fmap_sync_unmap(fmap_sync *h)
{
    pthread_mutex_lock(&g_retired_lock);
    for (struct retired **link = &g_retired; *link;) {
        struct retired *r = *link;
        if (owned_here(r->h)) {
            link = &r->next;
            continue;
        }
        drop_handle(r->h);
        *link = r->next;
        free(r);
    }
    if (h) {
        /* glibc's robust list links the mutexes a thread owns through the
           mutexes themselves, at this mapping's address: unmapping it now
           would let the kernel write into whatever is mapped there next when
           the thread exits.  Keep it until the mutex is released. */
        struct retired *r = owned_here(h) ? malloc(sizeof *r) : NULL;
        if (r) {
            r->h = h;
            r->next = g_retired;
            g_retired = r;
        } else if (!owned_here(h)) {
            drop_handle(h);
        }   /* else out of memory: leave it mapped for good */
    }
    pthread_mutex_unlock(&g_retired_lock);
}

void fmap_sync_discard(fmap_sync *h)
{
    struct sync_page *s = h->p;
    if (h->type == FMAP_T_MUTEX && (mutex_word(s) & FUTEX_TID_MASK) == (uint32_t)my_tid()) {
        s->st.depth = 0;
        pthread_mutex_unlock(&s->st.m);
    }
    drop_handle(h);
}

void fmap_sync_state(fmap_sync *h, fmap_syncstate *st)
{
    struct sync_page *s = h->p;
    memset(st, 0, sizeof *st);
    st->type = h->type;
    st->maximum = h->maximum;
    st->manual = (h->flags & FMAP_SYNC_MANUAL) != 0;
    if (h->type == FMAP_T_MUTEX) {
        uint32_t w = mutex_word(s);
        st->owner = (int32_t)(w & FUTEX_TID_MASK);
        st->mine = st->owner && st->owner == my_tid();
        st->depth = st->owner ? s->st.depth : 0;
        st->abandoned = !st->owner && (w & FUTEX_OWNER_DIED);
    } else if (h->type == FMAP_T_SEMAPHORE) {
        st->count = load(&s->st.word);
    } else {
        st->set = load(&s->st.word) != 0;
    }
}

/* ---- acquiring ---------------------------------------------------------- */

/* The outcome of a pthread lock call: FMAP_OK, FMAP_WAIT_TIMEOUT or an error. */
static int mutex_got(struct sync_page *s, int rc, int *depth, int *abandoned, fmap_err *e)
{
    if (rc == EOWNERDEAD) {
        /* WAIT_ABANDONED: its owner died holding it; we own it now, and the
           caller is told that what it guards may be half updated. */
        pthread_mutex_consistent(&s->st.m);
        s->st.depth = 0;
        *abandoned = 1;
        rc = 0;
    }
    if (rc == 0) {
        *depth = (int)++s->st.depth;
        return FMAP_OK;
    }
    if (rc == EBUSY || rc == ETIMEDOUT)
        return FMAP_WAIT_TIMEOUT;
    if (rc == ENOTRECOVERABLE)
        return fail(e, FMAP_ECORRUPT, rc, "the mutex is not recoverable");
    if (rc == EAGAIN)
        return fail(e, FMAP_ESYS, rc, "mutex recursion limit");
    return fail(e, FMAP_ESYS, rc, "pthread_mutex_lock");
}

static int mutex_lock_until(struct sync_page *s, uint64_t deadline)
{
#if HAVE_CLOCKLOCK
    struct timespec ts = ns_ts(deadline);
    return pthread_mutex_clocklock(&s->st.m, CLOCK_MONOTONIC, &ts);
#else
    struct timespec ts;
    uint64_t now = fmap_clock_ns();
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t rt = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    ts = ns_ts(rt + (deadline > now ? deadline - now : 0));
    return pthread_mutex_timedlock(&s->st.m, &ts);
#endif
}

/* Take one unit of a semaphore or event; 1 when taken. */
static int take(const fmap_sync *h)
{
    struct sync_page *s = h->p;
    uint32_t c = load(&s->st.word);
    if (h->type == FMAP_T_SEMAPHORE) {
        while (c > 0)
            if (__atomic_compare_exchange_n(&s->st.word, &c, c - 1, 0, __ATOMIC_SEQ_CST,
                                            __ATOMIC_SEQ_CST))
                return 1;
        return 0;
    }
    if (h->flags & FMAP_SYNC_MANUAL)
        return c != 0;
    /* Auto-reset: exactly one waiter turns the event from set to unset. */
    return c != 0 && __atomic_compare_exchange_n(&s->st.word, &c, 0, 0, __ATOMIC_SEQ_CST,
                                                 __ATOMIC_SEQ_CST);
}

static int looks_free(const fmap_sync *h)
{
    struct sync_page *s = h->p;
    if (h->type == FMAP_T_MUTEX) {
        uint32_t w = mutex_word(s);
        return !(w & FUTEX_TID_MASK) || (int)(w & FUTEX_TID_MASK) == my_tid();
    }
    return __atomic_load_n(&s->st.word, __ATOMIC_RELAXED) != 0;
}

int fmap_sync_trywait(fmap_sync *h, int *depth, int *abandoned, fmap_err *e)
{
    struct sync_page *s = h->p;
    *abandoned = 0;
    if (h->type == FMAP_T_MUTEX)
        return mutex_got(s, pthread_mutex_trylock(&s->st.m), depth, abandoned, e);
    return take(h) ? FMAP_OK : FMAP_WAIT_TIMEOUT;
}

/* Sleep on a semaphore's or event's word until taken or deadline. */
static int word_wait(const fmap_sync *h, uint64_t deadline, fmap_err *e)
{
    struct sync_page *s = h->p;
    int rc;
    __atomic_add_fetch(&s->st.waiters, 1, __ATOMIC_SEQ_CST);
    for (;;) {
        if (take(h)) {
            rc = FMAP_OK;
            break;
        }
        /* Wakes and timeouts race: whatever woke us, a unit that is there is
           taken before we give up, so no wake is lost with a leaving waiter. */
        int r = futex_wait_until(&s->st.word, 0, deadline);
        if (r == 0)
            continue;
        if (r == ETIMEDOUT || r == EINTR) {
            rc = take(h) ? FMAP_OK : r == EINTR ? FMAP_WAIT_INTR : FMAP_WAIT_TIMEOUT;
            break;
        }
        rc = fail(e, FMAP_ESYS, r, "futex wait");
        break;
    }
    __atomic_sub_fetch(&s->st.waiters, 1, __ATOMIC_SEQ_CST);
    return rc;
}

/* The spin phase polls for up to spin_ns (bounded by the deadline).  The
   thread it waits for may need this very CPU (more runnable threads than
   CPUs): spinning then only delays it, so the spinner yields now and then. */
#define SPIN_YIELD_NS 2000u

typedef struct {
    uint64_t end, next_yield;
    unsigned i;
} spinner;

static void spin_start(spinner *sp, uint64_t spin_ns, uint64_t deadline)
{
    uint64_t now = fmap_clock_ns();
    sp->end = now + spin_ns < deadline ? now + spin_ns : deadline;
    sp->next_yield = now + SPIN_YIELD_NS;
    sp->i = 0;
}

/* One pause; 0 when the spin time is up. */
static int spin_more(spinner *sp)
{
    cpu_relax();
    if (++sp->i & 15)
        return 1;
    uint64_t now = fmap_clock_ns();
    if (now >= sp->end)
        return 0;
    if (now >= sp->next_yield) {
        sched_yield();
        sp->next_yield = fmap_clock_ns() + SPIN_YIELD_NS;
    }
    return 1;
}

int fmap_sync_wait(fmap_sync *h, uint64_t spin_ns, uint64_t deadline, int *depth,
                   int *abandoned, fmap_err *e)
{
    *abandoned = 0;
    if (spin_ns) {
        spinner sp;
        spin_start(&sp, spin_ns, deadline);
        do {
            if (looks_free(h)) {
                int rc = fmap_sync_trywait(h, depth, abandoned, e);
                if (rc != FMAP_WAIT_TIMEOUT)
                    return rc;
            }
        } while (spin_more(&sp));
    }
    if (h->type == FMAP_T_MUTEX)
        return mutex_got(h->p, mutex_lock_until(h->p, deadline), depth, abandoned, e);
    return word_wait(h, deadline, e);
}

int fmap_sync_try_any(fmap_sync *const *v, int n, int *index, int *depth, int *abandoned,
                      fmap_err *e)
{
    for (int i = 0; i < n; i++) {
        int rc = fmap_sync_trywait(v[i], depth, abandoned, e);
        if (rc == FMAP_WAIT_TIMEOUT)
            continue;
        *index = i;
        return rc;
    }
    return FMAP_WAIT_TIMEOUT;
}

struct waitv {                  /* struct futex_waitv, Linux 5.16 */
    uint64_t val;
    uint64_t uaddr;
    uint32_t flags;
    uint32_t reserved;
};

int fmap_sync_wait_any(fmap_sync *const *v, int n, uint64_t spin_ns, uint64_t deadline,
                       int *index, int *depth, int *abandoned, fmap_err *e)
{
    struct waitv w[FMAP_WAIT_MAX];
    int rc;
    if (n < 1 || n > FMAP_WAIT_MAX)
        return fail(e, FMAP_ESYS, EINVAL, "wait_any object count");
    if (spin_ns) {
        spinner sp;
        spin_start(&sp, spin_ns, deadline);
        do {
            rc = fmap_sync_try_any(v, n, index, depth, abandoned, e);
            if (rc != FMAP_WAIT_TIMEOUT)
                return rc;
        } while (spin_more(&sp));
    }
    for (int i = 0; i < n; i++)
        __atomic_add_fetch(&v[i]->p->st.seq_waiters, 1, __ATOMIC_SEQ_CST);
    for (;;) {
        /* Snapshot before trying: a release after the try changes seq, and
           futex_waitv then returns at once. */
        for (int i = 0; i < n; i++) {
            w[i].val = load(&v[i]->p->st.seq);
            w[i].uaddr = (uint64_t)(uintptr_t)&v[i]->p->st.seq;
            w[i].flags = FUTEX_32_FLAG;
            w[i].reserved = 0;
        }
        rc = fmap_sync_try_any(v, n, index, depth, abandoned, e);
        if (rc != FMAP_WAIT_TIMEOUT)
            break;
        uint64_t now = fmap_clock_ns();
        if (now >= deadline)
            break;
        struct timespec ts = ns_ts(deadline);
        if (syscall(SYS_futex_waitv, w, n, 0, &ts, CLOCK_MONOTONIC) >= 0)
            continue;
        int err = errno;
        if (err == EAGAIN || err == ETIMEDOUT)
            continue;   /* try again; the deadline check ends it */
        if (err == EINTR) {
            rc = fmap_sync_try_any(v, n, index, depth, abandoned, e);
            if (rc == FMAP_WAIT_TIMEOUT)
                rc = FMAP_WAIT_INTR;
            break;
        }
        if (err == ENOSYS) {
            /* A kernel before 5.16: poll each millisecond. */
            uint64_t until = deadline - now > 1000000u ? now + 1000000u : deadline;
            struct timespec t = ns_ts(until);
            if (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL) == EINTR) {
                rc = fmap_sync_try_any(v, n, index, depth, abandoned, e);
                if (rc == FMAP_WAIT_TIMEOUT)
                    rc = FMAP_WAIT_INTR;
                break;
            }
            continue;
        }
        rc = fail(e, FMAP_ESYS, err, "futex_waitv");
        break;
    }
    for (int i = 0; i < n; i++)
        __atomic_sub_fetch(&v[i]->p->st.seq_waiters, 1, __ATOMIC_SEQ_CST);
    return rc;
}

/* ---- releasing ---------------------------------------------------------- */

int fmap_mutex_release(fmap_sync *h, fmap_err *e)
{
    struct sync_page *s = h->p;
    if ((mutex_word(s) & FUTEX_TID_MASK) != (uint32_t)my_tid())
        return fail(e, FMAP_ENOTOWNER, EPERM, "mutex release");
    uint32_t depth = s->st.depth;
    s->st.depth = depth > 1 ? depth - 1 : 0;
    int rc = pthread_mutex_unlock(&s->st.m);
    if (rc != 0) {
        s->st.depth = depth;
        return fail(e, rc == EPERM ? FMAP_ENOTOWNER : FMAP_ESYS, rc, "pthread_mutex_unlock");
    }
    if (depth <= 1)
        seq_signal(s);
    return FMAP_OK;
}

int fmap_sem_release(fmap_sync *h, uint32_t n, uint32_t *prev, fmap_err *e)
{
    struct sync_page *s = h->p;
    uint32_t c = load(&s->st.word);
    do {
        /* ERROR_TOO_MANY_POSTS leaves the count as it was. */
        if ((uint64_t)c + n > h->maximum)
            return fail(e, FMAP_ELIMIT, EOVERFLOW, "semaphore release");
    } while (!__atomic_compare_exchange_n(&s->st.word, &c, c + n, 0, __ATOMIC_SEQ_CST,
                                          __ATOMIC_SEQ_CST));
    *prev = c;
    if (load(&s->st.waiters))
        futex_wake(&s->st.word, n > INT_MAX ? INT_MAX : (int)n);
    seq_signal(s);
    return FMAP_OK;
}

void fmap_event_set(fmap_sync *h)
{
    struct sync_page *s = h->p;
    if (__atomic_exchange_n(&s->st.word, 1, __ATOMIC_SEQ_CST) != 0)
        return;     /* already set: SetEvent has no further effect */
    /* Manual reset releases every waiter; auto reset exactly one (the one
       woken takes it, or a newcomer does and the sleepers stay asleep). */
    if (load(&s->st.waiters))
        futex_wake(&s->st.word, (h->flags & FMAP_SYNC_MANUAL) ? INT_MAX : 1);
    seq_signal(s);
}

void fmap_event_reset(fmap_sync *h)
{
    struct sync_page *s = h->p;
    __atomic_store_n(&s->st.word, 0, __ATOMIC_SEQ_CST);
}
