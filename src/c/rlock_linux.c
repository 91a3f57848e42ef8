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

_Static_assert(sizeof(fmap_rlock) == 8, "fmap_rlock is one 64-bit word");

/* ---- who we are --------------------------------------------------------- */

static __thread int t_tid;          /* gettid() */
static __thread uint64_t t_self;    /* our owner word: marks << 32 | tid */
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

/* 16 bits of a value for the owner word, never 0 (0 says "not known"). */
static uint32_t fold16(uint64_t x)
{
    x ^= x >> 32;
    x ^= x >> 16;
    return (uint32_t)(x & 0xffff) ? (uint32_t)(x & 0xffff) : 1;
}

/* The high half of an owner word for what /proc says of a thread. */
static uint32_t marks(const fmap_procstat *st)
{
    return (st->start ? fold16(st->start) << 16 : 0) | (st->start_stack ? fold16(st->start_stack) : 0);
}

static uint64_t self_word(void)
{
    uint64_t s = t_self;
    if (!s) {
        int tid = fmap_tid();
        fmap_procstat st;
        /* Our own /proc entry is always ours to read; without /proc the
           marks are 0 (fmap_proc_stat zeroes st) and takers go by the
           thread id alone. */
        fmap_proc_stat(tid, &st);
        s = t_self = (uint64_t)marks(&st) << 32 | (uint32_t)tid;
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

/* Owners this thread found alive by /proc lately.  Within ALIVE_NS of
   that, kill() alone answers (under 1 µs, against about 8 for the /proc
   read), so that a loop asking after a live owner again and again (a
   wait_any whose later object is signalled each time, tries) stays cheap.
   What only /proc tells, an id reused, an exec, a killed process's main
   thread not yet reaped, is then told at the next full look: within
   ALIVE_NS, as a sleeping waiter's poll would. */
#define ALIVE_NS 10000000u
#define ALIVE_KEPT 4u
struct alive {
    uint64_t w, at;
};
static __thread struct alive t_alive[ALIVE_KEPT];
static __thread unsigned t_alive_next;

static int seen_alive(uint64_t w, uint64_t now)
{
    for (unsigned i = 0; i < ALIVE_KEPT; i++)
        if (t_alive[i].w == w && now - t_alive[i].at < ALIVE_NS)
            return 1;
    return 0;
}

/* Is the thread that w names gone: exited, its process dead, a zombie or
   replaced by exec(), or its id now another thread's?  Only a clear answer
   counts: a thread that exists but that /proc does not show us (no /proc,
   hidepid, another user) is taken to be the owner still, as is a mark that
   we cannot read.  A kill(2) and a /proc read, a few µs. */
static int owner_gone(uint64_t w)
{
    int tid = (int)(w & RLOCK_TID_MASK);
    if (!tid)
        return 0;
    /* Called only on a word that is not our identity: with our id but other
       marks, it names an earlier thread that had our id, or this thread
       before an exec (or it is forged). */
    if (tid == fmap_tid())
        return 1;
    /* kill() takes any thread's id and answers for its thread group. */
    if (kill(tid, 0) != 0 && errno == ESRCH)
        return 1;
    w = identity(w);
    uint64_t now = fmap_clock_ns();
    if (seen_alive(w, now))
        return 0;
    fmap_procstat st;
    if (fmap_proc_stat(tid, &st) != 0)
        return 0;
    if (st.dead)                    /* a killed process's main thread, not yet reaped */
        return 1;
    uint32_t want = (uint32_t)(w >> 32), have = marks(&st);
    /* The start time tells a reused id; the stack's start, placed at random
       by every exec, an exec (the id and the start time survive it).  Each
       half counts only when both sides know it. */
    if ((want >> 16) && (have >> 16) && (want >> 16) != (have >> 16))
        return 1;
    if ((want & 0xffff) && (have & 0xffff) && (want & 0xffff) != (have & 0xffff))
        return 1;
    t_alive[t_alive_next++ % ALIVE_KEPT] = (struct alive){w, now};
    return 0;
}

static int cas(fmap_rlock *l, uint64_t *expected, uint64_t desired)
{
    return __atomic_compare_exchange_n(&l->word, expected, desired, 0, __ATOMIC_ACQ_REL,
                                       __ATOMIC_ACQUIRE);
}

/* ---- the lock ----------------------------------------------------------- */

/* CAS retries before the deadline is looked at again: a word that keeps
   changing (a forger's) cannot hold a taker past its deadline. */
#define RETRIES_PER_LOOK 64

int fmap_rlock_take(fmap_rlock *l, uint64_t deadline, int ask, uint64_t poll_ns)
{
    uint64_t me = self_word(), w = 0;
    if (cas(l, &w, me))
        return RLOCK_OK;
    /* Whether to ask after the owner: when the caller says (a try, or a
       wait nobody asked for just before) and when a sleep ran its full
       poll, not after each wake (a lock passed around wakes us often, and
       the question costs a few µs). */
    for (unsigned retries = 0;; retries++) {
        if (retries == RETRIES_PER_LOOK) {
            retries = 0;
            if (!deadline || fmap_clock_ns() >= deadline)
                return deadline ? RLOCK_TIMEOUT : RLOCK_BUSY;
        }
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
            /* Take it over from this very word: of several takers that
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
        /* Nothing wakes a sleeper when the owner dies (the kernel's robust
           list would, but that list is what we keep out of shared memory):
           it wakes every poll_ns to ask. */
        uint64_t until = poll_ns && deadline - now > poll_ns ? now + poll_ns : deadline;
        int r = futex_wait_until(futex_of(l), (uint32_t)w, until);
        if (r == EINTR)
            return RLOCK_INTR;
        if (r == ETIMEDOUT)
            ask = until != deadline;    /* at the deadline, the caller's next call asks */
        else if (r != 0) {
            errno = r;
            return RLOCK_ERROR;
        }
        retries = 0;
        w = __atomic_load_n(&l->word, __ATOMIC_ACQUIRE);
    }
}

int fmap_rlock_give(fmap_rlock *l)
{
    uint64_t me = self_word(), w = __atomic_load_n(&l->word, __ATOMIC_RELAXED);
    /* From our own word only: a word that changed under us is not ours to
       clear (a taker who judged us gone, wrongly, owns it now). */
    do {
        if (identity(w) != me)
            return -1;
    } while (!cas(l, &w, 0));
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

uint64_t fmap_rlock_self(void)
{
    return self_word();
}

int fmap_rlock_gone(uint64_t who)
{
    who = identity(who);
    return who && who != self_word() && owner_gone(who);
}

int fmap_rlock_owner(const fmap_rlock *l, int *gone)
{
    uint64_t w = __atomic_load_n(&l->word, __ATOMIC_ACQUIRE);
    int tid = (int)(w & RLOCK_TID_MASK);
    if (gone)
        *gone = tid && identity(w) != self_word() && owner_gone(w);
    return tid;
}
