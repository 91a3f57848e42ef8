/* The robust lock of rlock_linux.h: one 64-bit word in shared memory. */
#define _GNU_SOURCE
#include "fmap.h"
#include "futex_linux.h"
#include "rlock_linux.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

/* ---- the one macro table ------------------------------------------------ */
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define LOW_HALF 1                  /* the futex word is the word's low 32 bits */
#else
#define LOW_HALF 0
#endif

/* A sleeping waiter looks at the owner this often: nothing wakes it when the
   owner dies (the kernel's robust list would, but that list is what we keep
   out of shared memory). */
#define RLOCK_POLL_NS 10000000u

_Static_assert(sizeof(fmap_rlock) == 8, "fmap_rlock is one 64-bit word");

/* ---- who we are --------------------------------------------------------- */

static __thread int t_tid;          /* gettid() */
static __thread uint64_t t_self;    /* our owner word: start time << 32 | tid */
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void after_fork(void)
{
    t_tid = 0;      /* the forking thread has a new id in the child */
    t_self = 0;
}

static void atfork_init(void)
{
    pthread_atfork(NULL, NULL, after_fork);
}

int fmap_tid(void)
{
    int t = t_tid;
    if (!t) {
        pthread_once(&atfork_once, atfork_init);
        t = t_tid = (int)syscall(SYS_gettid);
    }
    return t;
}

static uint64_t self_word(void)
{
    uint64_t s = t_self;
    if (!s) {
        int tid = fmap_tid(), dead;
        /* A thread's own /proc/<tid>/stat gives its start time (0 when /proc
           cannot be read: then reused ids go unnoticed, nothing worse). */
        uint64_t start = fmap_proc_start(tid, &dead);
        s = t_self = (uint64_t)(uint32_t)start << 32 | (uint32_t)tid;
    }
    return s;
}

static uint32_t *futex_of(fmap_rlock *l)
{
    return (uint32_t *)&l->word + LOW_HALF;
}

static uint64_t identity(uint64_t w)
{
    return w & ~(uint64_t)RLOCK_WAITERS;
}

/* Is the thread that w names gone: exited, its process dead or a zombie, or
   its id now another thread's?  A few µs (a kill(2) and a /proc read). */
static int owner_gone(uint64_t w)
{
    int tid = (int)(w & RLOCK_TID_MASK), dead;
    if (!tid)
        return 0;
    /* Called only on a word that is not our identity: with our id but another
       start time, it names an earlier thread that had our id (or is forged). */
    if (tid == fmap_tid())
        return 1;
    /* kill() takes any thread's id and answers for its thread group. */
    if (kill(tid, 0) != 0 && errno == ESRCH)
        return 1;
    /* A killed process's main thread lingers as a zombie until reaped. */
    uint64_t start = fmap_proc_start(tid, &dead);
    if (dead)
        return 1;
    uint32_t want = (uint32_t)(w >> 32);
    return want && start && (uint32_t)start != want;
}

static int cas(fmap_rlock *l, uint64_t *expected, uint64_t desired)
{
    return __atomic_compare_exchange_n(&l->word, expected, desired, 0, __ATOMIC_ACQ_REL,
                                       __ATOMIC_ACQUIRE);
}

/* ---- the lock ----------------------------------------------------------- */

int fmap_rlock_take(fmap_rlock *l, uint64_t deadline)
{
    uint64_t me = self_word(), w = 0;
    if (cas(l, &w, me))
        return RLOCK_OK;
    /* Whether to ask after the owner: on entry and when a sleep ran its full
       poll, not after each wake (a lock passed around wakes us often, and the
       question costs a few µs). */
    int ask = 1;
    for (;;) {
        if (!(w & RLOCK_TID_MASK)) {
            /* Free (the other bits are a waiter flag or garbage).  We have
               waited, so others may sleep too: the flag makes our give wake one. */
            if (cas(l, &w, me | RLOCK_WAITERS))
                return RLOCK_OK;
            continue;
        }
        if (identity(w) == me)
            return RLOCK_MINE;
        if (ask) {
            ask = 0;
            /* Take it over from this very word: of several waiters that
               found the owner gone, one CAS succeeds. */
            if (owner_gone(w)) {
                if (cas(l, &w, me | RLOCK_WAITERS))
                    return RLOCK_ABANDONED;
                ask = 1;
                continue;
            }
        }
        if (!deadline)
            return RLOCK_BUSY;
        if (!(w & RLOCK_WAITERS)) {
            uint64_t flagged = w | RLOCK_WAITERS;
            if (!cas(l, &w, flagged))
                continue;
            w = flagged;
        }
        uint64_t now = fmap_clock_ns();
        if (now >= deadline)
            return RLOCK_TIMEOUT;
        uint64_t until = deadline - now > RLOCK_POLL_NS ? now + RLOCK_POLL_NS : deadline;
        int r = futex_wait_until(futex_of(l), (uint32_t)w, until);
        if (r == EINTR)
            return RLOCK_INTR;
        if (r == ETIMEDOUT)
            ask = 1;
        else if (r != 0) {
            errno = r;
            return RLOCK_ERROR;
        }
        w = __atomic_load_n(&l->word, __ATOMIC_ACQUIRE);
    }
}

int fmap_rlock_give(fmap_rlock *l)
{
    if (identity(__atomic_load_n(&l->word, __ATOMIC_RELAXED)) != self_word())
        return -1;
    uint64_t w = __atomic_exchange_n(&l->word, 0, __ATOMIC_ACQ_REL);
    if (w & RLOCK_WAITERS)
        futex_wake(futex_of(l), 1);
    return 0;
}

void fmap_rlock_init_owned(fmap_rlock *l)
{
    __atomic_store_n(&l->word, self_word(), __ATOMIC_RELEASE);
}

int fmap_rlock_mine(const fmap_rlock *l)
{
    return identity(__atomic_load_n(&l->word, __ATOMIC_ACQUIRE)) == self_word();
}

int fmap_rlock_owner(const fmap_rlock *l, int *gone)
{
    uint64_t w = __atomic_load_n(&l->word, __ATOMIC_ACQUIRE);
    int tid = (int)(w & RLOCK_TID_MASK);
    if (gone)
        *gone = tid && identity(w) != self_word() && owner_gone(w);
    return tid;
}
