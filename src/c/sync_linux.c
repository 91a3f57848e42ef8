/* fmap platform layer for Linux: Mutex, Semaphore and Event.
 *
 * Each object is one page of a memfd, registered in the registry of names like
 * a mapping (so the name goes with the last handle and the memory with the
 * last holder, crash or not), laid out by fmap_sync_init before the name is
 * published:
 *
 *   - a header: magic, version, type and sizes, checked by every opener;
 *   - the state on one cache line: a futex word (semaphore count, event
 *     state) with a count of its sleepers, or a mutex's lock and recursion
 *     depth; and `seq`, bumped on every release or set, which wait_any
 *     sleeps on.
 *
 * A mutex is our robust lock (rlock_linux.h) plus a recursion depth: the
 * next taker finds out that the owning thread died and takes the mutex over,
 * abandoned (Windows: WAIT_ABANDONED).  It used to be a robust pthread mutex,
 * whose robust-list links live in the shared page, where any holder of the
 * object could forge them and make glibc's unlock write anywhere.
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
#include "rlock_linux.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
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

#define SYNC_MAGIC "FMAPSYN\x01"
#define SYNC_VERSION 2u           /* 2: our own mutex lock, not a pthread mutex */
#define FUTEX_32_FLAG 2u            /* futex_waitv: a 32-bit word; shared (no FUTEX2_PRIVATE) */

struct sync_page {
    char magic[8];          /* written last by init */
    uint32_t version;
    uint32_t type;          /* FMAP_T_* */
    uint32_t size;          /* sizeof(struct sync_page) of the creator */
    uint32_t lock_size;     /* sizeof(fmap_rlock) of the creator */
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
        fmap_rlock lock;        /* mutex: owner thread; robust (rlock_linux.h) */
    } st __attribute__((aligned(64)));
};

/* A handle: its mapping of the page, and what the page's header said when
   the handle was opened, checked then and never read from the page again
   (any process holding the object can rewrite the page: a type read anew
   would let it make an event's handle act as a free mutex). */
struct fmap_sync {
    struct sync_page *p;
    uint32_t type;          /* FMAP_T_* */
    uint32_t flags;         /* FMAP_SYNC_* */
    uint32_t maximum;       /* semaphore */
};

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


static uint32_t load(const uint32_t *w)
{
    return __atomic_load_n(w, __ATOMIC_SEQ_CST);
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
    s->lock_size = sizeof(fmap_rlock);
    s->flags = sp->flags;
    if (sp->type == FMAP_T_MUTEX) {
        /* CreateMutex(bInitialOwner): owned before anyone can open it. */
        if (sp->flags & FMAP_SYNC_OWNED) {
            fmap_rlock_init_owned(&s->st.lock);
            s->st.depth = 1;
        }
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
        s->lock_size != sizeof(fmap_rlock)) {
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

void fmap_sync_unmap(fmap_sync *h)
{
    /* Unmapped at once, owned or not: no list outside the page points into
       it (the robust pthread mutex needed its page kept while owned). */
    if (h)
        drop_handle(h);
}

void fmap_sync_discard(fmap_sync *h)
{
    struct sync_page *s = h->p;
    if (h->type == FMAP_T_MUTEX && fmap_rlock_mine(&s->st.lock)) {
        s->st.depth = 0;
        fmap_rlock_give(&s->st.lock);
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
        int gone;
        st->owner = fmap_rlock_owner(&s->st.lock, &gone);
        st->mine = st->owner && fmap_rlock_mine(&s->st.lock);
        /* An owner that is gone owns nothing: the next taker is told. */
        st->abandoned = gone;
        if (gone)
            st->owner = 0;
        st->depth = st->owner ? s->st.depth : 0;
    } else if (h->type == FMAP_T_SEMAPHORE) {
        st->count = load(&s->st.word);
    } else {
        st->set = load(&s->st.word) != 0;
    }
}

/* ---- acquiring ---------------------------------------------------------- */

/* The outcome of fmap_rlock_take for a mutex: FMAP_OK (with the new depth),
   FMAP_WAIT_TIMEOUT, FMAP_WAIT_INTR or an error. */
static int mutex_got(struct sync_page *s, int rc, int *depth, int *abandoned, fmap_err *e)
{
    switch (rc) {
    case RLOCK_ABANDONED:
        /* WAIT_ABANDONED: its owner died holding it; we own it now, and the
           caller is told that what it guards may be half updated. */
        s->st.depth = 0;
        *abandoned = 1;
        /* fall through */
    case RLOCK_OK:
        s->st.depth = 1;
        *depth = 1;
        return FMAP_OK;
    case RLOCK_MINE: {
        uint32_t d = s->st.depth;
        /* Windows' limit is a LONG's; the depth is an int to the caller. */
        if (d >= INT_MAX)
            return fail(e, FMAP_ESYS, EAGAIN, "mutex recursion limit");
        s->st.depth = d + 1;
        *depth = (int)(d + 1);
        return FMAP_OK;
    }
    case RLOCK_BUSY:
    case RLOCK_TIMEOUT:
        return FMAP_WAIT_TIMEOUT;
    case RLOCK_INTR:
        return FMAP_WAIT_INTR;
    default:
        return fail(e, FMAP_ESYS, errno, "futex wait");
    }
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
        return !fmap_rlock_owner(&s->st.lock, NULL) || fmap_rlock_mine(&s->st.lock);
    }
    return __atomic_load_n(&s->st.word, __ATOMIC_RELAXED) != 0;
}

/* ask: for a mutex owned by another thread, look whether that owner is
   gone (a few µs): what a caller's try must do (WAIT_ABANDONED at once),
   which spin loops leave to the calls before and after them. */
int fmap_sync_trywait(fmap_sync *h, int ask, int *depth, int *abandoned, fmap_err *e)
{
    struct sync_page *s = h->p;
    *abandoned = 0;
    if (h->type == FMAP_T_MUTEX)
        return mutex_got(s, fmap_rlock_take(&s->st.lock, 0, ask, 0), depth, abandoned, e);
    return take(h) ? FMAP_OK : FMAP_WAIT_TIMEOUT;
}

int fmap_sync_try_any(fmap_sync *const *v, int n, int ask, int *index, int *depth,
                      int *abandoned, fmap_err *e)
{
    for (int i = 0; i < n; i++) {
        int rc = fmap_sync_trywait(v[i], ask, depth, abandoned, e);
        if (rc == FMAP_WAIT_TIMEOUT)
            continue;
        *index = i;
        return rc;
    }
    return FMAP_WAIT_TIMEOUT;
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

int fmap_sync_wait(fmap_sync *h, uint64_t spin_ns, uint64_t deadline, int ask,
                   uint64_t ask_ns, int *depth, int *abandoned, fmap_err *e)
{
    *abandoned = 0;
    if (spin_ns) {
        spinner sp;
        spin_start(&sp, spin_ns, deadline);
        do {
            if (looks_free(h)) {
                int rc = fmap_sync_trywait(h, 0, depth, abandoned, e);
                if (rc != FMAP_WAIT_TIMEOUT)
                    return rc;
            }
        } while (spin_more(&sp));
    }
    /* Asked on the way to sleep (when the caller says), not only after a
       full poll: a signal that comes more often than the poll (an interval
       timer) would end every sleep early, and the question would never be
       asked. */
    if (h->type == FMAP_T_MUTEX)
        return mutex_got(h->p, fmap_rlock_take(&h->p->st.lock, deadline ? deadline : 1, ask,
                                               ask_ns), depth, abandoned, e);
    return word_wait(h, deadline, e);
}

struct waitv {                  /* struct futex_waitv, Linux 5.16 */
    uint64_t val;
    uint64_t uaddr;
    uint32_t flags;
    uint32_t reserved;
};

int fmap_sync_wait_any(fmap_sync *const *v, int n, uint64_t spin_ns, uint64_t deadline,
                       int ask, int *index, int *depth, int *abandoned, fmap_err *e)
{
    struct waitv w[FMAP_WAIT_MAX];
    int rc;
    if (n < 1 || n > FMAP_WAIT_MAX)
        return fail(e, FMAP_ESYS, EINVAL, "wait_any object count");
    if (spin_ns) {
        spinner sp;
        spin_start(&sp, spin_ns, deadline);
        do {
            rc = fmap_sync_try_any(v, n, 0, index, depth, abandoned, e);
            if (rc != FMAP_WAIT_TIMEOUT)
                return rc;
        } while (spin_more(&sp));
    }
    for (int i = 0; i < n; i++)
        __atomic_add_fetch(&v[i]->p->st.seq_waiters, 1, __ATOMIC_SEQ_CST);
    /* A mutex's owner dying changes no seq: whether it is gone is asked on
       the first try after the spin, when the caller says (its slices bound
       the time a death goes unnoticed), not on every wake. */
    for (;;) {
        /* Snapshot before trying: a release after the try changes seq, and
           futex_waitv then returns at once. */
        for (int i = 0; i < n; i++) {
            w[i].val = load(&v[i]->p->st.seq);
            w[i].uaddr = (uint64_t)(uintptr_t)&v[i]->p->st.seq;
            w[i].flags = FUTEX_32_FLAG;
            w[i].reserved = 0;
        }
        rc = fmap_sync_try_any(v, n, ask, index, depth, abandoned, e);
        ask = 0;
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
            rc = fmap_sync_try_any(v, n, 0, index, depth, abandoned, e);
            if (rc == FMAP_WAIT_TIMEOUT)
                rc = FMAP_WAIT_INTR;
            break;
        }
        if (err == ENOSYS) {
            /* A kernel before 5.16: poll each millisecond. */
            uint64_t until = deadline - now > 1000000u ? now + 1000000u : deadline;
            struct timespec t = ns_ts(until);
            if (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL) == EINTR) {
                rc = fmap_sync_try_any(v, n, 0, index, depth, abandoned, e);
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
    if (!fmap_rlock_mine(&s->st.lock))
        return fail(e, FMAP_ENOTOWNER, EPERM, "mutex release");
    uint32_t depth = s->st.depth;
    if (depth > 1) {
        s->st.depth = depth - 1;
        return FMAP_OK;
    }
    s->st.depth = 0;
    if (fmap_rlock_give(&s->st.lock) != 0)
        return fail(e, FMAP_ENOTOWNER, EPERM, "mutex release");
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
