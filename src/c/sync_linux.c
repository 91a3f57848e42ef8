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
 *     sleeps on;
 *   - an auto-reset event's wait slots, one per blocked waiter, through
 *     which a set() releases that waiter by itself (see "events" below).
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
 * make a harmless futex_wake each.  A waiter killed in a wait slot is found
 * out by the set() that would release it, or by the next waiter when it was
 * released already.  Nothing else a dead process leaves here can block
 * anyone.
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
#define SYNC_VERSION 3u           /* 2: our own mutex lock; 3: event generations and wait slots */
#define FUTEX_32_FLAG 2u            /* futex_waitv: a 32-bit word; shared (no FUTEX2_PRIVATE) */
#define EV_SET 1u                   /* an event's word: signalled */
#define EV_GEN 2u                   /* a manual-reset event's word: one set() (bits 1-31 count them) */
#define EV_PEND 2u                  /* an auto-reset event's word: a set() in flight (release_one) */
#define EV_PEND_WAIT_NS 1000000u    /* how long a set() lets another in flight finish (pend_settle) */
#define EV_SLOTS 128                /* an auto-reset event's wait slots (twice FMAP_WAIT_MAX) */
#define EV_STALE_NS 20000000u       /* a release not taken for this long: is its waiter dead? */
#define EV_REAP_NS 100000000u       /* full reaps of one page's slots: one per 100 ms at most */
#define EV_REAP_MAX 4               /* releases one try passes on at most (a forged page's cost) */

/* An auto-reset event's wait slot: one blocked waiter, which a set() can
   release by itself (see "Events" below). */
enum { SLOT_FREE = 0, SLOT_WAITING = 1, SLOT_RELEASED = 2 };
struct ev_slot {
    uint64_t who;           /* the waiting thread (fmap_rlock_self), 0 = free: claimed by CAS */
    uint64_t stamp;         /* when a set() released it (CLOCK_MONOTONIC; 0: just now) */
    uint32_t state;         /* futex: SLOT_*, what the waiter sleeps on */
    uint32_t ticket;        /* arrival order: the longest waiter is released first */
};

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
        uint32_t seq_waiters;   /* wait_any callers waiting (asleep on seq, or between slices) */
        uint32_t word;          /* futex: semaphore count, or event state (EV_SET, EV_GEN) */
        uint32_t waiters;       /* threads sleeping on word */
        uint32_t depth;         /* mutex: recursion depth, written by the owner only */
        uint32_t pad;
        fmap_rlock lock;        /* mutex: owner thread; robust (rlock_linux.h) */
    } st __attribute__((aligned(64)));
    struct {
        uint32_t tickets;       /* the next waiter's ticket */
        uint32_t pad;
        uint64_t used[2];       /* bit i: slot i may be in use (what a set() looks through) */
        uint64_t reaped_at;     /* the last full reap of the slots (one per EV_REAP_NS) */
        uint64_t signal_at;     /* the last release or set seen by wait_any sleepers */
        uint64_t asked_at;      /* the last look at old releases' waiters (one per EV_STALE_NS) */
    } ev __attribute__((aligned(64)));
    struct ev_slot slot[EV_SLOTS];
};
_Static_assert(sizeof(struct sync_page) <= 4096, "a synchronization object fits one page");

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

static uint64_t load64(const uint64_t *w)
{
    return __atomic_load_n(w, __ATOMIC_SEQ_CST);
}


/* Before a release or set: when wait_any callers sleep on the object, when
   it was signalled, for one that an event's set() released meanwhile (the
   earlier of the two is what satisfied its wait).  */
static void note_signal(struct sync_page *s)
{
    if (__atomic_load_n(&s->st.seq_waiters, __ATOMIC_RELAXED))
        __atomic_store_n(&s->ev.signal_at, fmap_clock_ns(), __ATOMIC_SEQ_CST);
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
        s->st.word = sp->initial ? EV_SET : 0;
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
        st->set = (load(&s->st.word) & EV_SET) != 0;
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

/* ---- events ------------------------------------------------------------
 *
 * SetEvent releases the threads waiting at that moment, there and then: a
 * ResetEvent right after cannot keep them waiting, and an auto-reset event
 * set twice with two threads waiting releases both.  A waiter here runs
 * later than the set() that releases it, so what the set() did must stay
 * for it:
 *
 *   - a manual-reset event's word counts its sets (EV_GEN) beside EV_SET.
 *     A waiter notes the word when its wait begins (fmap_waiter.mark) and is
 *     released by the event being set, or by a set since that mark, even one
 *     that a reset() has already undone;
 *   - an auto-reset event's waiter takes a wait slot in the page before it
 *     sleeps, and sleeps on the slot.  set() releases the longest waiting
 *     slot by itself (one CAS, then a wake), and only when no slot waits does
 *     it signal the word (EV_SET), for the next taker.  reset() clears EV_SET
 *     and leaves the slots alone.  A waiter looks at its slot before the
 *     word; one that found both (a set() that came while it was settling in)
 *     passes the slot's release on, as does one whose wait ends otherwise
 *     (a timeout, an exception, another object in wait_any).
 *
 * Spinning and trying never take a slot: a set() that finds no slot taken
 * signals the word, as before, and costs no more.  A set() that finds a slot
 * waiting but whose wake reached nobody asks whether that waiter is gone
 * (kill and /proc, a few µs; it may just be between two slices of its wait)
 * and then takes the release back and frees the slot.  A waiter killed after
 * its release is left a release in its slot: the next try that finds the
 * event unsignalled passes it on, once it is EV_STALE_NS old and its waiter
 * gone.  A process killed between taking such a release back and passing
 * it on loses that one release.  Nothing a slot holds is used as an address
 * or length.  More than EV_SLOTS waiters at once: the rest wait on the word
 * as before (a set() then releases whoever runs first), and look for a free
 * slot at each slice; slots of waiters killed before they waited are
 * freed by a full reap, at most once per EV_REAP_NS.
 */

/* The slots marked used, one at a time. */
typedef struct {
    uint64_t m[2];
} used_iter;

static used_iter used_now(struct sync_page *s)
{
    used_iter u = {{load64(&s->ev.used[0]), load64(&s->ev.used[1])}};
    return u;
}

static int used_next(used_iter *u)
{
    for (int k = 0; k < 2; k++)
        if (u->m[k]) {
            int b = __builtin_ctzll(u->m[k]);
            u->m[k] &= u->m[k] - 1;
            return k * 64 + b;
        }
    return -1;
}

static void used_mark(struct sync_page *s, int i, int on)
{
    uint64_t bit = (uint64_t)1 << (i & 63);
    if (on)
        __atomic_fetch_or(&s->ev.used[i >> 6], bit, __ATOMIC_SEQ_CST);
    else
        __atomic_fetch_and(&s->ev.used[i >> 6], ~bit, __ATOMIC_SEQ_CST);
}

static struct ev_slot *slot_of(struct sync_page *s, const fmap_waiter *w)
{
    return &s->slot[w->slot];
}

static int slot_cas(struct ev_slot *sl, uint32_t from, uint32_t to)
{
    return __atomic_compare_exchange_n(&sl->state, &from, to, 0, __ATOMIC_SEQ_CST,
                                       __ATOMIC_SEQ_CST);
}

/* A slot whose state we just moved to FREE: unmarked, and its claim given
   up last, so that no one claims a slot still in use. */
static void slot_free(struct sync_page *s, int i)
{
    used_mark(s, i, 0);
    __atomic_store_n(&s->slot[i].who, 0, __ATOMIC_SEQ_CST);
}

/* Free the slot of `who`, a waiter that is gone: claimed from that exact
   identity first, so that of several who found it gone one frees it, and no
   one frees a slot taken again since.  1 when the slot held a release, which
   the caller passes on; 0 when it held none; -1 when another got it first. */
static int slot_reclaim(struct sync_page *s, int i, uint64_t who)
{
    struct ev_slot *sl = &s->slot[i];
    if (!__atomic_compare_exchange_n(&sl->who, &who, fmap_rlock_self(), 0, __ATOMIC_SEQ_CST,
                                     __ATOMIC_SEQ_CST))
        return -1;
    uint32_t st = __atomic_exchange_n(&sl->state, SLOT_FREE, __ATOMIC_SEQ_CST);
    slot_free(s, i);
    return st == SLOT_RELEASED;
}

/* The longest waiting slot (lowest ticket, wrapping), or -1. */
static int slot_pick(struct sync_page *s)
{
    int best = -1;
    uint32_t best_ticket = 0;
    used_iter u = used_now(s);
    for (int i; (i = used_next(&u)) >= 0;) {
        if (load(&s->slot[i].state) != SLOT_WAITING)
            continue;
        uint32_t t = __atomic_load_n(&s->slot[i].ticket, __ATOMIC_RELAXED);
        if (best < 0 || (int32_t)(t - best_ticket) < 0) {
            best = i;
            best_ticket = t;
        }
    }
    return best;
}

/* An auto-reset event's word newly signalled: one sleeper on the word (a
   waiter without a slot), and wait_any's, hear of it. */
static void signalled(struct sync_page *s)
{
    if (load(&s->st.waiters))
        futex_wake(&s->st.word, 1);
    seq_signal(s);
}

/* EV_PEND without EV_SET: a set() in flight across a reset(), which may
   yet take its signal back for a waiter that came meanwhile.  It finishes
   in well under a microsecond, unless preempted or killed: we let it, for
   up to EV_PEND_WAIT_NS, before we release anyone ourselves (a release of
   ours in between could leave it nothing to hand that waiter but the word
   we are about to signal).  A set() stalled longer than that shares the
   mark with ours, and one of the two may then leave the word signalled
   with that waiter asleep until its next slice (known gap). */
static void pend_settle(struct sync_page *s)
{
    uint64_t until = 0;
    for (unsigned n = 0;; n++) {
        uint32_t c = load(&s->st.word);
        if ((c & (EV_SET | EV_PEND)) != EV_PEND)
            return;
        uint64_t now = fmap_clock_ns();
        if (!until)
            until = now + EV_PEND_WAIT_NS;
        else if (now >= until)
            return;
        if (n & 63)
            cpu_relax();
        else
            sched_yield();
    }
}

/* Signal an auto-reset event's word as a set() in flight (EV_SET | EV_PEND);
   1 when we did, 0 when it was signalled already. */
static int signal_pending(struct sync_page *s)
{
    uint32_t c = load(&s->st.word);
    do {
        if (c & EV_SET)
            return 0;
    } while (!__atomic_compare_exchange_n(&s->st.word, &c, c | EV_SET | EV_PEND, 0,
                                          __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    return 1;
}

/* Release one waiter of an auto-reset event, or signal the word when none
   waits: SetEvent's work, and a passed-on release's. */
static void release_one(struct sync_page *s)
{
    pend_settle(s);
    /* Bounded: slots that keep changing under us (waiters leaving, a
       forger) end in the word being signalled, which every waiter reads. */
    for (int tries = 0; tries < 2 * EV_SLOTS; tries++) {
        int i = slot_pick(s);
        if (i < 0) {
            /* No slot waits: signal the word, marked in flight (EV_PEND).
               A waiter that took a slot after our pick looked may have read
               the word before we signalled it (each stored, then loaded:
               one of us sees the other); if one did, the release is its,
               through its slot (a wake alone could come before it sleeps),
               and a reset() meanwhile must not undo that: reset() clears
               EV_SET only, a taker both, so EV_PEND still there says that
               our signal was not taken. */
            int ours = signal_pending(s);
            if (slot_pick(s) < 0) {
                if (ours) {
                    __atomic_fetch_and(&s->st.word, ~EV_PEND, __ATOMIC_SEQ_CST);
                    signalled(s);
                }
                return;
            }
            if (ours) {
                uint32_t c = load(&s->st.word);
                do {
                    if (!(c & EV_PEND))
                        return;         /* a taker had it: that was the release */
                } while (!__atomic_compare_exchange_n(&s->st.word, &c,
                                                      c & ~(EV_SET | EV_PEND), 0,
                                                      __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
            }
            /* (A signal that was there before ours stays.) */
            continue;
        }
        struct ev_slot *sl = &s->slot[i];
        if (!slot_cas(sl, SLOT_WAITING, SLOT_RELEASED))
            continue;           /* it left, or another set() took it: pick again */
        __atomic_store_n(&sl->stamp, fmap_clock_ns(), __ATOMIC_SEQ_CST);
        if (futex_wake(&sl->state, 1) > 0)
            return;             /* woken: it will find the release */
        uint64_t who = load64(&sl->who);
        /* Alive and awake (it will find it), or gone with the slot taken
           since by another (our release was had), or another reclaimer
           passes it on: done.  Else its waiter died with our release. */
        if (!fmap_rlock_gone(who) || slot_reclaim(s, i, who) != 1)
            return;
    }
    /* Slots changing faster than we could pick: signal the word, and wake
       every waiting slot to read it. */
    if (!(__atomic_fetch_or(&s->st.word, EV_SET, __ATOMIC_SEQ_CST) & EV_SET))
        signalled(s);
    used_iter u = used_now(s);
    for (int i; (i = used_next(&u)) >= 0;)
        if (load(&s->slot[i].state) == SLOT_WAITING)
            futex_wake(&s->slot[i].state, 1);
}

/* Give up our slot: 1 when a set() had released us (passed on unless keep). */
static int slot_leave(struct sync_page *s, fmap_waiter *w, int keep)
{
    if (w->slot < 0)
        return 0;
    int i = w->slot;
    struct ev_slot *sl = &s->slot[i];
    w->slot = -1;
    if (slot_cas(sl, SLOT_WAITING, SLOT_FREE)) {
        slot_free(s, i);
        return 0;
    }
    /* Not WAITING: released (ours, unless a reaper judged us gone and took
       it, which the CAS tells), or no longer ours at all. */
    if (!slot_cas(sl, SLOT_RELEASED, SLOT_FREE))
        return 0;
    slot_free(s, i);
    if (!keep)
        release_one(s);
    return 1;
}

/* This page's turn at something done once per `every` by any process
   (*last: when it was last done): 1 for the one caller that takes it. */
static int page_turn(uint64_t *last, uint64_t now, uint64_t every)
{
    uint64_t was = load64(last);
    return now - was >= every &&
           __atomic_compare_exchange_n(last, &was, now, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

/* Pass on releases left in the slots of waiters that died after a set()
   released them: how many.  Loads only, unless a release is EV_STALE_NS old
   (or its stamp unwritten: its setter may have died) and so its waiter is
   asked after. */
static int slot_reap_stale(struct sync_page *s)
{
    uint64_t now = 0;
    int passed = 0, asking = 0;
    used_iter u = used_now(s);
    for (int i; (i = used_next(&u)) >= 0 && passed < EV_REAP_MAX;) {
        struct ev_slot *sl = &s->slot[i];
        if (load(&sl->state) != SLOT_RELEASED)
            continue;
        uint64_t at = load64(&sl->stamp), who = load64(&sl->who);
        if (!now)
            now = fmap_clock_ns();
        if (at && now - at < EV_STALE_NS)
            continue;
        /* A waiter released long ago may be alive, only stopped or starved:
           its /proc entry is read once per EV_STALE_NS per page, not at
           every try of every waiter. */
        if (!asking) {
            if (!page_turn(&s->ev.asked_at, now, EV_STALE_NS))
                return passed;
            asking = 1;
        }
        if (fmap_rlock_gone(who) && slot_reclaim(s, i, who) == 1) {
            release_one(s);
            passed++;
        }
    }
    return passed;
}

/* Every slot, used or not (a waiter killed before it marked its slot):
   those of dead waiters freed, their releases passed on.  For a claimer
   that found none free, once per EV_REAP_NS per page: each slot costs a
   kill and a /proc read. */
static int slot_reap_full(struct sync_page *s)
{
    if (!page_turn(&s->ev.reaped_at, fmap_clock_ns(), EV_REAP_NS))
        return 0;
    int freed = 0;
    for (int i = 0; i < EV_SLOTS; i++) {
        uint64_t who = load64(&s->slot[i].who);
        if (!who || !fmap_rlock_gone(who))
            continue;
        int r = slot_reclaim(s, i, who);
        if (r >= 0)
            freed++;
        if (r == 1)
            release_one(s);
    }
    return freed;
}

/* Take a wait slot (w->slot stays -1 when all are in use). */
static void slot_enlist(struct sync_page *s, fmap_waiter *w)
{
    uint64_t me = fmap_rlock_self();
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < EV_SLOTS; i++) {
            struct ev_slot *sl = &s->slot[i];
            uint64_t z = 0;
            if (load64(&sl->who) != 0 ||
                !__atomic_compare_exchange_n(&sl->who, &z, me, 0, __ATOMIC_SEQ_CST,
                                             __ATOMIC_SEQ_CST))
                continue;
            __atomic_store_n(&sl->ticket, __atomic_fetch_add(&s->ev.tickets, 1, __ATOMIC_RELAXED),
                             __ATOMIC_RELAXED);
            __atomic_store_n(&sl->stamp, 0, __ATOMIC_RELAXED);
            used_mark(s, i, 1);
            /* Waiting from here: set() may release us.  The caller reads the
               word after this store (see release_one). */
            __atomic_store_n(&sl->state, SLOT_WAITING, __ATOMIC_SEQ_CST);
            w->slot = i;
            return;
        }
        if (!slot_reap_full(s))
            return;
    }
}

/* Take one unit of a semaphore or event; 1 when taken.  *seen: the word
   when it was not (what a sleeper on the word waits to change). */
static int take(const fmap_sync *h, fmap_waiter *w, uint32_t *seen)
{
    struct sync_page *s = h->p;
    uint32_t c;
    if (h->type == FMAP_T_SEMAPHORE) {
        c = load(&s->st.word);
        while (c > 0)
            if (__atomic_compare_exchange_n(&s->st.word, &c, c - 1, 0, __ATOMIC_SEQ_CST,
                                            __ATOMIC_SEQ_CST))
                return 1;
        *seen = 0;
        return 0;
    }
    if (h->flags & FMAP_SYNC_MANUAL) {
        c = load(&s->st.word);
        *seen = c;
        /* Set now, or set since the wait began (and perhaps reset since). */
        return (c & EV_SET) || ((c ^ w->mark) & ~EV_SET);
    }
    /* Auto reset: a release into our slot first; then the word, where
       exactly one taker turns the event from set to unset. */
    if (w->slot >= 0) {
        struct ev_slot *sl = slot_of(s, w);
        uint32_t st = load(&sl->state);
        if (st == SLOT_RELEASED && slot_cas(sl, SLOT_RELEASED, SLOT_FREE)) {
            slot_free(s, w->slot);
            w->slot = -1;
            return 1;
        }
        if (st != SLOT_WAITING && st != SLOT_RELEASED)
            w->slot = -1;       /* freed under us (judged gone): no longer ours */
    }
    for (int again = 0;; again = 1) {
        c = load(&s->st.word);
        while (c & EV_SET)
            if (__atomic_compare_exchange_n(&s->st.word, &c, c & ~(EV_SET | EV_PEND), 0,
                                            __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
                slot_leave(s, w, 0);
                return 1;
            }
        /* Unsignalled: a release left with a dead waiter is passed on
           (perhaps to us), then we look once more. */
        if (again || !slot_reap_stale(s))
            break;
    }
    *seen = c;
    return 0;
}

static int looks_free(const fmap_sync *h, const fmap_waiter *w)
{
    struct sync_page *s = h->p;
    if (h->type == FMAP_T_MUTEX) {
        return !fmap_rlock_owner(&s->st.lock, NULL) || fmap_rlock_mine(&s->st.lock);
    }
    uint32_t c = __atomic_load_n(&s->st.word, __ATOMIC_RELAXED);
    if (h->type == FMAP_T_EVENT && (h->flags & FMAP_SYNC_MANUAL))
        return (c & EV_SET) || ((c ^ w->mark) & ~EV_SET);
    if (h->type == FMAP_T_EVENT)
        return (c & EV_SET) || (w->slot >= 0 && __atomic_load_n(&s->slot[w->slot].state,
                                                                __ATOMIC_RELAXED) == SLOT_RELEASED);
    return c != 0;
}

void fmap_wait_begin(fmap_sync *h, fmap_waiter *w)
{
    w->mark = load(&h->p->st.word);
    w->slot = -1;
    w->counted = 0;
}

int fmap_wait_end(fmap_sync *h, fmap_waiter *w, int keep)
{
    if (w->counted) {
        __atomic_sub_fetch(&h->p->st.seq_waiters, 1, __ATOMIC_SEQ_CST);
        w->counted = 0;
    }
    return slot_leave(h->p, w, keep);
}

/* ask: for a mutex owned by another thread, look whether that owner is
   gone (a few µs): what a caller's try must do (WAIT_ABANDONED at once),
   which spin loops leave to the calls before and after them. */
int fmap_sync_trywait(fmap_sync *h, fmap_waiter *w, int ask, int *depth, int *abandoned,
                      fmap_err *e)
{
    struct sync_page *s = h->p;
    uint32_t seen;
    *abandoned = 0;
    if (h->type == FMAP_T_MUTEX)
        return mutex_got(s, fmap_rlock_take(&s->st.lock, 0, ask, 0), depth, abandoned, e);
    return take(h, w, &seen) ? FMAP_OK : FMAP_WAIT_TIMEOUT;
}

/* Whether to ask after the owner of v[i], a mutex, before trying it when
   the caller did not say to: a mutex whose owner is gone is signalled
   (abandoned) from that death on, as Windows has it, though nothing in its
   word says so.  Asked (a few µs) only when the answer decides the wait:
   an object after it looks signalled, or a release is in hand (`taking`),
   so that the abandoned mutex, not that object, is what the wait returns. */
static int ask_first(fmap_sync *const *v, const fmap_waiter *w, int i, int n, int taking)
{
    if (v[i]->type != FMAP_T_MUTEX || looks_free(v[i], &w[i]))
        return 0;
    if (taking)
        return 1;
    for (int j = i + 1; j < n; j++)
        if (looks_free(v[j], &w[j]))
            return 1;
    return 0;
}

int fmap_sync_try_any(fmap_sync *const *v, fmap_waiter *w, int n, int ask, int *index,
                      int *depth, int *abandoned, fmap_err *e)
{
    /* A set() that released one of our slots satisfied this wait then, as
       SetEvent would have; so did any other object signalled before it.
       Of the releases, the earliest; before it, the first object in order
       that was signalled earlier still and can be taken now. */
    int first = -1, rc = FMAP_WAIT_TIMEOUT;
    uint64_t first_at = 0, now = 0;
    for (int i = 0; i < n; i++) {
        if (w[i].slot < 0)
            continue;
        struct ev_slot *sl = slot_of(v[i]->p, &w[i]);
        if (load(&sl->state) != SLOT_RELEASED)
            continue;
        uint64_t at = load64(&sl->stamp);
        if (!at)                /* released this instant: its setter stamps it next */
            at = now ? now : (now = fmap_clock_ns());
        if (first < 0 || (int64_t)(at - first_at) < 0) {
            first = i;
            first_at = at;
        }
    }
    if (first >= 0) {
        for (int i = 0; i < n && rc == FMAP_WAIT_TIMEOUT; i++) {
            if (w[i].slot >= 0 || (int64_t)(load64(&v[i]->p->ev.signal_at) - first_at) > 0)
                continue;
            rc = fmap_sync_trywait(v[i], &w[i], ask || ask_first(v, w, i, n, 1), depth,
                                   abandoned, e);
            *index = i;
        }
        if (rc == FMAP_WAIT_TIMEOUT && slot_leave(v[first]->p, &w[first], 1)) {
            *abandoned = 0;
            *index = first;
            rc = FMAP_OK;
        }
    }
    for (int i = 0; i < n && rc == FMAP_WAIT_TIMEOUT; i++) {
        rc = fmap_sync_trywait(v[i], &w[i], ask || ask_first(v, w, i, n, 0), depth,
                               abandoned, e);
        *index = i;
    }
    if (rc != FMAP_OK)
        return rc;
    /* Done: our other slots go now, not when the caller gets round to it
       (a set() and reset() meanwhile would pass theirs on too late). */
    for (int i = 0; i < n; i++)
        if (i != *index)
            slot_leave(v[i]->p, &w[i], 0);
    return rc;
}

/* Sleep on a semaphore's or event's word, or on an auto-reset event's wait
   slot, until taken or deadline. */
static int word_wait(const fmap_sync *h, fmap_waiter *w, uint64_t deadline, fmap_err *e)
{
    struct sync_page *s = h->p;
    int rc, counted = 0;
    uint32_t seen;
    for (;;) {
        if (take(h, w, &seen)) {
            rc = FMAP_OK;
            break;
        }
        uint32_t *f = &s->st.word, val = seen;
        if (w->slot >= 0) {
            f = &slot_of(s, w)->state;
            val = SLOT_WAITING;
        } else if (!counted) {
            /* Counted, then taken again: a release after the count wakes us. */
            __atomic_add_fetch(&s->st.waiters, 1, __ATOMIC_SEQ_CST);
            counted = 1;
            continue;
        }
        /* Wakes and timeouts race: whatever woke us, a unit that is there is
           taken before we give up, so no wake is lost with a leaving waiter. */
        int r = futex_wait_until(f, val, deadline);
        if (r == 0)
            continue;
        if (r == ETIMEDOUT || r == EINTR) {
            rc = take(h, w, &seen) ? FMAP_OK : r == EINTR ? FMAP_WAIT_INTR : FMAP_WAIT_TIMEOUT;
            break;
        }
        rc = fail(e, FMAP_ESYS, r, "futex wait");
        break;
    }
    if (counted)
        __atomic_sub_fetch(&s->st.waiters, 1, __ATOMIC_SEQ_CST);
    return rc;
}

/* An auto-reset event's waiter about to sleep: a slot, taken once for the
   whole wait (one that found none free looks again at each slice). */
static void settle_in(const fmap_sync *h, fmap_waiter *w)
{
    if (h->type != FMAP_T_EVENT || (h->flags & FMAP_SYNC_MANUAL))
        return;
    if (w->slot < 0)
        slot_enlist(h->p, w);
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

int fmap_sync_wait(fmap_sync *h, fmap_waiter *w, uint64_t spin_ns, uint64_t deadline, int ask,
                   uint64_t ask_ns, int *depth, int *abandoned, fmap_err *e)
{
    *abandoned = 0;
    if (spin_ns) {
        spinner sp;
        spin_start(&sp, spin_ns, deadline);
        do {
            if (looks_free(h, w)) {
                int rc = fmap_sync_trywait(h, w, 0, depth, abandoned, e);
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
    settle_in(h, w);
    return word_wait(h, w, deadline, e);
}

struct waitv {                  /* struct futex_waitv, Linux 5.16 */
    uint64_t val;
    uint64_t uaddr;
    uint32_t flags;
    uint32_t reserved;
};

int fmap_sync_wait_any(fmap_sync *const *v, fmap_waiter *wt, int n, uint64_t spin_ns,
                       uint64_t deadline, int ask, int *index, int *depth, int *abandoned,
                       fmap_err *e)
{
    struct waitv w[FMAP_WAIT_MAX];
    int rc;
    if (n < 1 || n > FMAP_WAIT_MAX)
        return fail(e, FMAP_ESYS, EINVAL, "wait_any object count");
    if (spin_ns) {
        spinner sp;
        spin_start(&sp, spin_ns, deadline);
        do {
            rc = fmap_sync_try_any(v, wt, n, 0, index, depth, abandoned, e);
            if (rc != FMAP_WAIT_TIMEOUT)
                return rc;
        } while (spin_more(&sp));
    }
    /* Counted first, so that what is signalled after we take slots
       notes when (note_signal); and for the whole wait, slices and their
       gaps included (fmap_wait_end uncounts). */
    for (int i = 0; i < n; i++)
        if (!wt[i].counted) {
            __atomic_add_fetch(&v[i]->p->st.seq_waiters, 1, __ATOMIC_SEQ_CST);
            wt[i].counted = 1;
        }
    for (int i = 0; i < n; i++)
        settle_in(v[i], &wt[i]);
    /* A mutex's owner dying changes no seq: whether it is gone is asked on
       the first try after the spin, when the caller says (its slices bound
       the time a death goes unnoticed), not on every wake. */
    for (;;) {
        /* Snapshot before trying: a release after the try changes seq (or
           our slot), and futex_waitv then returns at once. */
        for (int i = 0; i < n; i++) {
            uint32_t *f = wt[i].slot >= 0 ? &slot_of(v[i]->p, &wt[i])->state : &v[i]->p->st.seq;
            w[i].val = load(f);
            w[i].uaddr = (uint64_t)(uintptr_t)f;
            w[i].flags = FUTEX_32_FLAG;
            w[i].reserved = 0;
        }
        rc = fmap_sync_try_any(v, wt, n, ask, index, depth, abandoned, e);
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
            rc = fmap_sync_try_any(v, wt, n, 0, index, depth, abandoned, e);
            if (rc == FMAP_WAIT_TIMEOUT)
                rc = FMAP_WAIT_INTR;
            break;
        }
        if (err == ENOSYS) {
            /* A kernel before 5.16: poll each millisecond. */
            uint64_t until = deadline - now > 1000000u ? now + 1000000u : deadline;
            struct timespec t = ns_ts(until);
            if (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL) == EINTR) {
                rc = fmap_sync_try_any(v, wt, n, 0, index, depth, abandoned, e);
                if (rc == FMAP_WAIT_TIMEOUT)
                    rc = FMAP_WAIT_INTR;
                break;
            }
            continue;
        }
        rc = fail(e, FMAP_ESYS, err, "futex_waitv");
        break;
    }
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
    note_signal(s);
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
        note_signal(s);
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
    if (h->flags & FMAP_SYNC_MANUAL) {
        /* Every waiter whose wait began before this set() is released by
           it, now or later: a new generation, with the signal. */
        uint32_t c = load(&s->st.word);
        do {
            if (c & EV_SET)
                return;     /* already set: SetEvent has no further effect */
            note_signal(s);
        } while (!__atomic_compare_exchange_n(&s->st.word, &c, (c | EV_SET) + EV_GEN, 0,
                                              __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
        if (load(&s->st.waiters))
            futex_wake(&s->st.word, INT_MAX);
        seq_signal(s);
    } else {
        /* Even when set already: a waiter that took its slot while the
           word was being signalled is owed this set() of its own. */
        note_signal(s);
        release_one(s);
    }
}

void fmap_event_reset(fmap_sync *h)
{
    /* The signal only: releases already made stay made (and a manual-reset
       event's generation stays, for the waiters it released; an auto-reset
       event's EV_PEND, for the set() in flight). */
    __atomic_and_fetch(&h->p->st.word, ~EV_SET, __ATOMIC_SEQ_CST);
}
