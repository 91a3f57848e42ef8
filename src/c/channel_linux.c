/* fmap platform layer for Linux: Channel, a multi-producer multi-consumer
 * message ring in shared memory.
 *
 * The object is one memfd, registered like a mapping (the name goes with the
 * last handle, the memory with the last holder, crash or not), laid out by
 * fmap_chan_init before its name is published:
 *
 *   header   magic, version, sizes; then, each on its own cache lines, the
 *            producers' cursor (head), the consumers' cursor (tail), the
 *            futex words sleepers wait on, and the closed flag;
 *   parts    participant records: (pid, start time) of every attached process;
 *   slots    `capacity` slots (a power of two), each a 64-byte header and up
 *            to `msg_size` bytes of message.
 *
 * The ring is Vyukov's bounded MPMC queue, with one change for crash safety:
 * a slot is claimed by a compare-and-swap on the slot's own 64-bit state
 * word, which records the claimer's participant record, and the cursors only
 * follow (any thread that finds the slot at a cursor claimed moves the cursor
 * on).  So every slot in use names the process using it:
 *
 *   FREE(p)          position p may be claimed by a producer (slot k starts FREE(k))
 *   WRITING(p, who)  a producer is writing position p's message
 *   FULL(p)          position p's message is published
 *   READING(p, who)  a consumer is reading it; done, the slot is FREE(p + capacity)
 *
 * A waiter blocked on a WRITING or READING slot whose claimer is dead (its
 * pid gone, a zombie, or reused by a process with another start time) turns
 * the slot into FREE(p + capacity): a message a dead producer was writing is
 * dropped (never delivered in part), a message a dead consumer was reading is
 * gone with it (delivered at most once).  A record freed by a dead process is
 * swept the same way before it is reused.
 *
 * Waiting: a bounded spin that adapts (it lengthens while spinning pays off
 * and shrinks while it does not), then a futex sleep.  Publishers and
 * releasers make a system call only when the sleeper count says someone
 * sleeps, with sequentially consistent atomics on both sides (a Dekker
 * handshake), so a busy pipeline never enters the kernel.
 */
#define _GNU_SOURCE
#include "fmap.h"
#include "futex_linux.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define CHAN_MAGIC "FMAPCHN\x01"
#define CHAN_VERSION 2u            /* 2: state words stored relative to their slot */
#define SLOT_HEADER 64u             /* a message starts 64-byte aligned */
#define LINE 128                    /* two cache lines: the adjacent-line prefetcher pairs them */
#define DEAD_CHECK_NS 10000000u     /* a blocked waiter looks for a dead claimer this often */
#define YIELD_NS 2000u              /* a spinner yields the CPU this often */

/* The slot state word: position (52 bits) | claimer (10 bits) | state (2 bits). */
enum { S_FREE = 0, S_WRITING = 1, S_FULL = 2, S_READING = 3 };
#define W_STATE(w) ((uint32_t)((w) & 3u))
#define W_OWNER(w) ((uint32_t)(((w) >> 2) & (FMAP_CHAN_PARTS - 1)))
#define W_POS(w) ((w) >> 12)
#define POS_MASK ((UINT64_C(1) << 52) - 1)
#define WORD(pos, owner, state) \
    ((((pos) & POS_MASK) << 12) | ((uint64_t)(owner) << 2) | (uint64_t)(state))
_Static_assert(FMAP_CHAN_PARTS == 1024, "10 bits of claimer");

struct part {
    uint32_t pid;           /* 0 = free, REAPING = being given back */
    uint32_t pad;
    uint64_t start;         /* the process's start time; 0 while being filled in */
    uint32_t sleeping[2];   /* its threads counted in data.sleepers, space.sleepers */
    uint32_t pad2[2];
};
#define REAPING UINT32_MAX

struct fmap_chan {
    char magic[8];          /* written last by init */
    uint32_t version;
    uint32_t header_size;   /* sizeof(struct fmap_chan) of the creator */
    uint64_t capacity;
    uint64_t msg_size;
    uint64_t stride;        /* bytes per slot */
    uint64_t slots_offset;
    uint64_t total_size;
    uint32_t nparts;
    /* Read on every claim, written once: shared by every cache. */
    uint32_t closed __attribute__((aligned(LINE)));
    uint64_t head __attribute__((aligned(LINE)));   /* producers' cursor */
    uint64_t tail __attribute__((aligned(LINE)));   /* consumers' cursor */
    struct {
        uint32_t seq;       /* bumped by every wake-up: the futex word */
        uint32_t sleepers;
    } data __attribute__((aligned(LINE))),          /* consumers wait for messages */
      space __attribute__((aligned(LINE)));         /* producers wait for free slots */
    struct part parts[FMAP_CHAN_PARTS] __attribute__((aligned(LINE)));
};

struct slot {
    uint64_t word;
    uint64_t len;
    uint32_t kind;
};

static int fail(fmap_err *e, int status, int sys, const char *call)
{
    e->status = status;
    e->sys = sys;
    e->call = call;
    return status;
}

static uint64_t round_up(uint64_t n, uint64_t to)
{
    return (n + to - 1) / to * to;
}

static struct slot *slot_at(fmap_chanmap *m, uint64_t pos)
{
    return (struct slot *)(m->slots + (pos & m->mask) * m->stride);
}

static uint64_t load64(const uint64_t *w)
{
    return __atomic_load_n(w, __ATOMIC_SEQ_CST);
}

static int cas64(uint64_t *w, uint64_t *expected, uint64_t desired)
{
    return __atomic_compare_exchange_n(w, expected, desired, 0, __ATOMIC_SEQ_CST,
                                       __ATOMIC_SEQ_CST);
}

/* Slot k's state word is kept XORed with WORD(k, 0, S_FREE), so that the
   zeros of a slot never touched read as FREE(k): creating a channel writes
   (and so allocates) its header only, not a page per slot.  Every access to
   a word goes through these three; pos is any position of the slot. */
static uint64_t word_key(const fmap_chanmap *m, uint64_t pos)
{
    return (pos & m->mask) << 12;
}

static uint64_t load_word(fmap_chanmap *m, uint64_t pos)
{
    return load64(&slot_at(m, pos)->word) ^ word_key(m, pos);
}

static int cas_word(fmap_chanmap *m, uint64_t pos, uint64_t *expected, uint64_t desired)
{
    uint64_t key = word_key(m, pos), raw = *expected ^ key;
    int ok = cas64(&slot_at(m, pos)->word, &raw, desired ^ key);
    *expected = raw ^ key;
    return ok;
}

/* Signed distance between a slot's position and a cursor, modulo 2^52. */
static int64_t pos_diff(uint64_t w, uint64_t cursor)
{
    return (int64_t)(((W_POS(w) - cursor) & POS_MASK) << 12) >> 12;
}

/* Move a cursor forward to at least `to` (others may have moved it already). */
static void advance(uint64_t *cursor, uint64_t from, uint64_t to)
{
    while ((int64_t)(to - from) > 0 && !cas64(cursor, &from, to))
        ;
}

/* ---- futexes ------------------------------------------------------------ */

static void reap_sleepers(fmap_chanmap *m);
#define WAKE_MISSES 1024            /* wakes that found nobody before reap_sleepers */

static void wake(fmap_chanmap *m, uint32_t *seq, uint32_t *sleepers, uint32_t n)
{
    if (__atomic_load_n(sleepers, __ATOMIC_SEQ_CST)) {
        __atomic_add_fetch(seq, 1, __ATOMIC_SEQ_CST);
        long woken = futex_wake(seq, n > INT_MAX ? INT_MAX : (int)n);
        /* Nobody asleep though counted: a sleeper is on its way in or out,
           or died counted.  Many times running, look for the dead. */
        if (woken == 0 && ++m->wake_misses >= WAKE_MISSES) {
            m->wake_misses = 0;
            reap_sleepers(m);
        } else if (woken > 0) {
            m->wake_misses = 0;
        }
    }
}

void fmap_chan_wake_consumers(fmap_chanmap *m, uint32_t n)
{
    wake(m, &m->h->data.seq, &m->h->data.sleepers, n);
}

void fmap_chan_wake_producers(fmap_chanmap *m, uint32_t n)
{
    wake(m, &m->h->space.seq, &m->h->space.sleepers, n);
}

/* ---- participants ------------------------------------------------------- */

/* Is the process behind record i gone?  Only asked of a claimer that has
   kept a waiter blocked for DEAD_CHECK_NS. */
static int part_dead(struct fmap_chan *h, uint32_t i)
{
    uint32_t pid = __atomic_load_n(&h->parts[i].pid, __ATOMIC_SEQ_CST);
    uint64_t start = __atomic_load_n(&h->parts[i].start, __ATOMIC_SEQ_CST);
    int dead;
    if (pid == 0 || pid == REAPING)
        return 1;
    if ((int)pid == fmap_getpid())
        return 0;
    uint64_t now = fmap_proc_start((int)pid, &dead);
    if (dead)
        return 1;
    /* start 0: the record is being filled in, or its owner's start time
       could not be read; either way the pid alone says it lives. */
    return start && now && now != start;
}

#define REAP_AHEAD 65536u           /* more than any claim takes at once */

/* Record i's process is dead: give back every slot it claims and take its
   sleepers out of the counts (a sleeper killed while counted would otherwise
   make every later publish pay for a futex_wake).  The caller has moved the
   record's pid from the dead one to its own or to REAPING. */
static void reap(fmap_chanmap *m, uint32_t i)
{
    struct fmap_chan *h = m->h;
    /* Only slots some claim has reached: one at position p is claimed by a
       producer that read the head at most REAP_AHEAD before p (consumers
       claim behind the head).  Reading the others would allocate them. */
    uint64_t end = load64(&h->head) + REAP_AHEAD;
    if (end > m->capacity || end < REAP_AHEAD)
        end = m->capacity;
    for (uint64_t k = 0; k < end; k++) {
        uint64_t w = load_word(m, k);
        uint32_t st = W_STATE(w);
        if ((st == S_WRITING || st == S_READING) && W_OWNER(w) == i)
            cas_word(m, k, &w, WORD(W_POS(w) + m->capacity, 0, S_FREE));
    }
    uint32_t d = __atomic_exchange_n(&h->parts[i].sleeping[0], 0, __ATOMIC_SEQ_CST);
    uint32_t p = __atomic_exchange_n(&h->parts[i].sleeping[1], 0, __ATOMIC_SEQ_CST);
    __atomic_sub_fetch(&h->data.sleepers, d, __ATOMIC_SEQ_CST);
    __atomic_sub_fetch(&h->space.sleepers, p, __ATOMIC_SEQ_CST);
    fmap_chan_wake_consumers(m, INT_MAX);
    fmap_chan_wake_producers(m, INT_MAX);
}

/* Wakes found nobody asleep many times over: a sleeper may have died counted.
   Give back the records of dead processes that were sleeping. */
static void reap_sleepers(fmap_chanmap *m)
{
    struct fmap_chan *h = m->h;
    for (uint32_t i = 0; i < FMAP_CHAN_PARTS; i++) {
        uint32_t pid = __atomic_load_n(&h->parts[i].pid, __ATOMIC_SEQ_CST);
        if (pid == 0 || pid == REAPING ||
            !(__atomic_load_n(&h->parts[i].sleeping[0], __ATOMIC_SEQ_CST) |
              __atomic_load_n(&h->parts[i].sleeping[1], __ATOMIC_SEQ_CST)) ||
            !part_dead(h, i))
            continue;
        if (__atomic_compare_exchange_n(&h->parts[i].pid, &pid, REAPING, 0,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
            reap(m, i);
            __atomic_store_n(&h->parts[i].start, 0, __ATOMIC_SEQ_CST);
            __atomic_store_n(&h->parts[i].pid, 0, __ATOMIC_SEQ_CST);
        }
    }
}

static int join(fmap_chanmap *m, fmap_err *e)
{
    struct fmap_chan *h = m->h;
    uint32_t me = (uint32_t)fmap_getpid();
    uint64_t start = fmap_self_start();
    /* A free record first; else one whose process died, swept before use. */
    for (int pass = 0; pass < 2; pass++) {
        for (uint32_t i = 0; i < FMAP_CHAN_PARTS; i++) {
            uint32_t pid = __atomic_load_n(&h->parts[i].pid, __ATOMIC_SEQ_CST);
            if (pass == 0 ? pid != 0 : (pid == 0 || pid == REAPING || !part_dead(h, i)))
                continue;
            if (!__atomic_compare_exchange_n(&h->parts[i].pid, &pid, me, 0,
                                             __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
                continue;
            __atomic_store_n(&h->parts[i].start, start, __ATOMIC_SEQ_CST);
            if (pass == 1)
                reap(m, i);
            m->part = i;
            m->pid = (int)me;
            return FMAP_OK;
        }
    }
    return fail(e, FMAP_EFULL, 0, "the channel's participant records (one per process)");
}

static void leave(fmap_chanmap *m)
{
    if (m->pid == fmap_getpid()) {
        __atomic_store_n(&m->h->parts[m->part].start, 0, __ATOMIC_SEQ_CST);
        __atomic_store_n(&m->h->parts[m->part].pid, 0, __ATOMIC_SEQ_CST);
    }
    m->pid = 0;
}

/* A forked child holds its parent's record: it takes its own before it
   claims anything, so the parent's death never gives back the child's slots. */
static int ensure_joined(fmap_chanmap *m, fmap_err *e)
{
    if (m->pid == fmap_getpid())
        return FMAP_OK;
    return join(m, e);
}

/* ---- objects ------------------------------------------------------------ */

static uint64_t header_size(void)
{
    return round_up(sizeof(struct fmap_chan), fmap_page_size());
}

static uint64_t stride_of(uint64_t msg_size)
{
    return SLOT_HEADER + round_up(msg_size + FMAP_CHAN_ROOM, 64);
}

uint64_t fmap_chan_size(uint64_t capacity, uint64_t msg_size)
{
    if (capacity < 1 || capacity > FMAP_CHAN_MAX_CAPACITY || (capacity & (capacity - 1)))
        return 0;
    if (msg_size > (UINT64_C(1) << 40))
        return 0;
    uint64_t stride = stride_of(msg_size);
    if (stride > (UINT64_C(1) << 46) / capacity)
        return 0;
    return round_up(header_size() + capacity * stride, fmap_page_size());
}

static int map_all(int fd, uint64_t size, fmap_chanmap *m, fmap_err *e)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        return fail(e, FMAP_ESYS, errno, "mmap");
    struct fmap_chan *h = p;
    m->h = h;
    m->maplen = size;
    m->slots = (char *)p + h->slots_offset;
    m->capacity = h->capacity;
    m->mask = h->capacity - 1;
    m->msg_size = h->msg_size;
    m->stride = h->stride;
    m->pid = 0;
    m->spin_cur = UINT64_MAX;   /* the first wait may spin for all of spin_max */
    m->spin_since = 0;
    m->wake_misses = 0;
    return FMAP_OK;
}

int fmap_chan_init(void *ctx, int fd, fmap_err *e)
{
    fmap_chanspec *sp = ctx;
    uint64_t size = fmap_chan_size(sp->capacity, sp->msg_size);
    if (!size)
        return fail(e, FMAP_ESYS, EINVAL, "channel size");
    struct fmap_chan *h = mmap(NULL, header_size(), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (h == MAP_FAILED)
        return fail(e, FMAP_ESYS, errno, "mmap");
    /* A new memfd reads zeros: only the non-zero fields are written. */
    h->version = CHAN_VERSION;
    h->header_size = sizeof(struct fmap_chan);
    h->capacity = sp->capacity;
    h->msg_size = sp->msg_size;
    h->stride = stride_of(sp->msg_size);
    h->slots_offset = header_size();
    h->total_size = size;
    h->nparts = FMAP_CHAN_PARTS;
    /* The slots need nothing written: their zeros are FREE (load_word). */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memcpy(h->magic, CHAN_MAGIC, 8);
    munmap(h, header_size());
    return FMAP_OK;
}

int fmap_chan_map(int fd, fmap_chanmap *m, fmap_err *e)
{
    struct stat st;
    if (fstat(fd, &st) != 0)
        return fail(e, FMAP_ESYS, errno, "fstat");
    if ((uint64_t)st.st_size < header_size())
        return fail(e, FMAP_ECORRUPT, 0, "the object is smaller than a channel header");
    struct fmap_chan *h = mmap(NULL, header_size(), PROT_READ, MAP_SHARED, fd, 0);
    if (h == MAP_FAILED)
        return fail(e, FMAP_ESYS, errno, "mmap");
    int ok = memcmp(h->magic, CHAN_MAGIC, 8) == 0 && h->version == CHAN_VERSION &&
             h->header_size == sizeof(struct fmap_chan) && h->nparts == FMAP_CHAN_PARTS &&
             h->slots_offset == header_size() && h->stride == stride_of(h->msg_size) &&
             fmap_chan_size(h->capacity, h->msg_size) == h->total_size &&
             h->total_size == (uint64_t)st.st_size;
    uint64_t size = h->total_size;
    munmap(h, header_size());
    if (!ok)
        return fail(e, FMAP_ECORRUPT, 0,
                    "the channel's header has a wrong magic, version or sizes");
    if (map_all(fd, size, m, e) != FMAP_OK)
        return e->status;
    if (join(m, e) != FMAP_OK) {
        munmap(m->h, m->maplen);
        m->h = NULL;
        return e->status;
    }
    return FMAP_OK;
}

void fmap_chan_unmap(fmap_chanmap *m)
{
    if (!m->h)
        return;
    leave(m);
    munmap(m->h, m->maplen);
    m->h = NULL;
}

void fmap_chan_state(fmap_chanmap *m, fmap_chanstate *st)
{
    struct fmap_chan *h = m->h;
    /* A sleeper killed while counted stays in the counts until wakes miss
       WAKE_MISSES times, which never happens while a live sleeper takes
       every wake: take the dead out before reporting. */
    reap_sleepers(m);
    st->head = load64(&h->head);
    st->tail = load64(&h->tail);
    st->closed = __atomic_load_n(&h->closed, __ATOMIC_SEQ_CST);
    st->consumers_sleeping = __atomic_load_n(&h->data.sleepers, __ATOMIC_RELAXED);
    st->producers_sleeping = __atomic_load_n(&h->space.sleepers, __ATOMIC_RELAXED);
    /* Processes, not records: every handle a process opens has its own. */
    uint32_t pids[FMAP_CHAN_PARTS], n = 0;
    for (uint32_t i = 0; i < FMAP_CHAN_PARTS; i++) {
        uint32_t pid = __atomic_load_n(&h->parts[i].pid, __ATOMIC_RELAXED), j = 0;
        if (pid == 0 || pid == REAPING)
            continue;
        while (j < n && pids[j] != pid)
            j++;
        if (j == n && !part_dead(h, i))
            pids[n++] = pid;
    }
    st->parts = n;
}

int fmap_chan_ended(fmap_chanmap *m)
{
    return (int)__atomic_load_n(&m->h->closed, __ATOMIC_SEQ_CST);
}

uint64_t fmap_chan_pending(fmap_chanmap *m)
{
    uint64_t tl = load64(&m->h->tail), hd = load64(&m->h->head);
    return hd > tl ? hd - tl : 0;
}

/* ---- claiming ----------------------------------------------------------- */

enum { EMPTY = -1 };   /* try_*: nothing to claim now */

/* Each retry of a try_* loop follows another party's progress (a cursor
   moved, a race lost), so a real ring needs few.  State words no ring
   writes (memory scribbled on by a process of the same user) could keep
   one looping for ever, holding the GIL: past this many retries the try
   reports "nothing now", and the caller's wait, with its timeout, goes on. */
#define RETRIES 4096u

/* Swap up to n consecutive slots from `from` that are unclaimed in state
   `want` to state `to`, claimed by this process: how many; *w is the word
   of the first slot not swapped (the producers' and the consumers' claims
   differ only in the two states). */
static uint32_t claim_run(fmap_chanmap *m, uint64_t from, uint32_t n, uint32_t want,
                          uint32_t to, uint64_t *w)
{
    uint32_t i = 0;
    while (i < n) {
        *w = load_word(m, from + i);
        if (*w != WORD(from + i, 0, want) ||
            !cas_word(m, from + i, w, WORD(from + i, m->part, to)))
            break;
        i++;
    }
    return i;
}

/* Producer: claim up to n consecutive FREE slots at the head.  check_dead:
   a full ring whose oldest slot is claimed by a dead process is freed. */
static int try_reserve(fmap_chanmap *m, uint32_t n, int check_dead, uint64_t *pos,
                       uint32_t *got)
{
    struct fmap_chan *h = m->h;
    if (__atomic_load_n(&h->closed, __ATOMIC_SEQ_CST))
        return FMAP_CHAN_CLOSED;
    for (uint32_t tries = 0; tries < RETRIES; tries++) {
        uint64_t hd = load64(&h->head), w = 0;
        uint32_t i = claim_run(m, hd, n, S_FREE, S_WRITING, &w);
        if (i > 0) {
            advance(&h->head, hd, hd + i);
            /* Closed after we looked: give the slots back (a consumer may
               have seen them free and the channel closed, and ended). */
            if (__atomic_load_n(&h->closed, __ATOMIC_SEQ_CST)) {
                for (uint32_t k = 0; k < i; k++)
                    fmap_chan_discard(m, hd + k);
                return FMAP_CHAN_CLOSED;
            }
            *pos = hd;
            *got = i;
            return FMAP_OK;
        }
        int64_t d = pos_diff(w, hd);
        if (d > 0 || (d == 0 && W_STATE(w) != S_FREE)) {
            advance(&h->head, hd, hd + 1);    /* claimed already: help the cursor on */
            continue;
        }
        if (d == 0)
            continue;                         /* lost a race for it */
        if (d == -(int64_t)m->capacity) {     /* the previous lap still uses it: full */
            uint32_t st = W_STATE(w);
            if (check_dead && (st == S_READING || st == S_WRITING) && part_dead(h, W_OWNER(w))) {
                if (cas_word(m, hd, &w, WORD(hd, 0, S_FREE)))
                    fmap_chan_wake_consumers(m, INT_MAX);
                continue;
            }
            return EMPTY;
        }
        /* d < 0 otherwise: our head was stale; read it again */
    }
    return EMPTY;
}

static void skip_holes(fmap_chanmap *m);

/* Consumer: claim up to n consecutive published messages at the tail. */
static int try_take(fmap_chanmap *m, uint32_t n, int check_dead, uint64_t *pos, uint32_t *got)
{
    struct fmap_chan *h = m->h;
    for (uint32_t tries = 0; tries < RETRIES; tries++) {
        uint64_t tl = load64(&h->tail), w = 0;
        uint32_t i = claim_run(m, tl, n, S_FULL, S_READING, &w);
        if (i > 0) {
            advance(&h->tail, tl, tl + i);
            /* Slots given back unsent behind these are passed now: len()
               counts messages, and the next one may be one of them. */
            skip_holes(m);
            *pos = tl;
            *got = i;
            return FMAP_OK;
        }
        int64_t d = pos_diff(w, tl);
        if (d > 0 || (d == 0 && W_STATE(w) == S_READING)) {
            advance(&h->tail, tl, tl + 1);    /* taken or skipped: help the cursor on */
            continue;
        }
        if (d < 0) {
            /* A consumer of the last lap still reads it: no producer has
               claimed position tl, and once closed none ever will. */
            if (__atomic_load_n(&h->closed, __ATOMIC_SEQ_CST))
                return FMAP_CHAN_CLOSED;
            return EMPTY;
        }
        if (W_STATE(w) == S_FULL)
            continue;                         /* lost a race for it */
        if (W_STATE(w) == S_WRITING) {
            if (check_dead && part_dead(h, W_OWNER(w))) {
                /* The producer died writing: its message is dropped. */
                if (cas_word(m, tl, &w, WORD(tl + m->capacity, 0, S_FREE)))
                    fmap_chan_wake_producers(m, 1);
                continue;
            }
            return EMPTY;                     /* being written: wait for it */
        }
        /* FREE(tl): nothing sent yet.  Closed: then nothing ever will be.
           (A producer checks `closed` after claiming, so one that claims
           this slot now gives it back.) */
        if (__atomic_load_n(&h->closed, __ATOMIC_SEQ_CST))
            return FMAP_CHAN_CLOSED;
        return EMPTY;
    }
    return EMPTY;
}

typedef int (*try_fn)(fmap_chanmap *, uint32_t, int, uint64_t *, uint32_t *);

/* The spin budget adapts to how long waits turn out to be.  A wait of w ns
   shorter than spin_max lets later ones spin for 2w (so a busy pipeline,
   whose waits are short, never sleeps).  The budget decays by half a
   millisecond at a time, not a wait at a time: a pipeline whose waits are
   mostly short but now and then longer (a consumer that stops to check a
   batch every 1024 messages) keeps the budget that covers the long ones,
   instead of sleeping through each and paying for a wake-up.  A wait that
   outlasted spin_max halves it (so an idle pipeline soon spins no more).
   Bounded by the handle's spin_max. */
#define SPIN_DECAY_NS 1000000u

static void adapt(fmap_chanmap *m, uint64_t waited, uint64_t now, uint64_t spin_max)
{
    uint64_t cur = m->spin_cur < spin_max ? m->spin_cur : spin_max;
    if (waited >= spin_max) {
        cur /= 2;
        m->spin_since = now;
    } else {
        uint64_t want = 2 * waited + 1000;
        if (want >= cur) {
            cur = want;
            m->spin_since = now;
        } else if (now - m->spin_since >= SPIN_DECAY_NS) {
            cur = cur / 2 > want ? cur / 2 : want;
            m->spin_since = now;
        }
    }
    m->spin_cur = cur < spin_max ? cur : spin_max;
}

/* Spin (up to the adaptive budget), then sleep on the futex, until claimed,
   closed or the deadline.  The caller has tried once already. */
static int wait_claim(fmap_chanmap *m, try_fn try, uint32_t *seq, uint32_t *sleepers,
                      uint32_t *mine, uint32_t n, uint64_t spin_max, uint64_t deadline,
                      uint64_t *pos, uint32_t *got)
{
    uint64_t start = fmap_clock_ns(), now = start;
    uint64_t budget = m->spin_cur < spin_max ? m->spin_cur : spin_max;
    int rc;
    if (budget) {
        uint64_t spin_end = start + budget, next_yield = start + YIELD_NS;
        for (unsigned k = 1;; k++) {
            cpu_relax();
            rc = try(m, n, 0, pos, got);
            if (rc != EMPTY) {
                if (k >= 16)
                    now = fmap_clock_ns();
                adapt(m, now - start, now, spin_max);
                return rc;
            }
            if (k % 16 == 0) {
                now = fmap_clock_ns();
                if (now >= spin_end || now >= deadline)
                    break;
                if (now >= next_yield) {
                    sched_yield();
                    next_yield = now + YIELD_NS;
                }
            }
        }
    }
    uint64_t next_check = start + DEAD_CHECK_NS;
    for (;;) {
        __atomic_add_fetch(mine, 1, __ATOMIC_SEQ_CST);
        __atomic_add_fetch(sleepers, 1, __ATOMIC_SEQ_CST);
        uint32_t v = __atomic_load_n(seq, __ATOMIC_SEQ_CST);
        rc = try(m, n, 0, pos, got);
        if (rc == EMPTY) {
            uint64_t until = deadline < next_check ? deadline : next_check;
            int err = futex_wait_until(seq, v, until);
            __atomic_sub_fetch(sleepers, 1, __ATOMIC_SEQ_CST);
            __atomic_sub_fetch(mine, 1, __ATOMIC_SEQ_CST);
            now = fmap_clock_ns();
            if (err == EINTR) {
                adapt(m, now - start, now, spin_max);
                return FMAP_WAIT_INTR;
            }
            int dead_check = now >= next_check;
            if (dead_check)
                next_check = now + DEAD_CHECK_NS;
            rc = try(m, n, dead_check, pos, got);
            if (rc == EMPTY && now < deadline)
                continue;
        } else {
            __atomic_sub_fetch(sleepers, 1, __ATOMIC_SEQ_CST);
            __atomic_sub_fetch(mine, 1, __ATOMIC_SEQ_CST);
            now = fmap_clock_ns();
        }
        adapt(m, now - start, now, spin_max);
        return rc == EMPTY ? FMAP_WAIT_TIMEOUT : rc;
    }
}

int fmap_chan_reserve(fmap_chanmap *m, uint32_t n, uint64_t spin_max, uint64_t deadline,
                      uint64_t *pos, uint32_t *got, fmap_err *e)
{
    if (ensure_joined(m, e) != FMAP_OK)
        return e->status;
    int rc = try_reserve(m, n, 0, pos, got);
    if (rc == EMPTY) {
        if (!deadline)
            return FMAP_WAIT_TIMEOUT;
        rc = wait_claim(m, try_reserve, &m->h->space.seq, &m->h->space.sleepers,
                        &m->h->parts[m->part].sleeping[1], n,
                        spin_max, deadline, pos, got);
    }
    return rc;
}

/* Consumers ask, at every take, for the word and message start of the slot
   TAKE_AHEAD past the last one taken: when the producers are ahead, that
   message was written on another core, and a take that finds its lines
   still there waits for them one after the other.  Asked for early, they
   travel while the caller handles the messages in between.  For reading
   only: a producer still writing that slot loses nothing but a shared
   copy.  Measured with the benchmark's 64 B stream, one at a time, in
   paired runs: x1.07 and x1.35 when the two CPUs were far apart (a cache
   line's round trip 400 ns), x0.99 when near; 4 KiB x1.03. */
#define TAKE_AHEAD 4u

static void prefetch_ahead(fmap_chanmap *m, uint64_t pos)
{
    const char *s = (const char *)slot_at(m, pos);
    __builtin_prefetch(s, 0, 3);
    __builtin_prefetch(s + SLOT_HEADER, 0, 3);
}

int fmap_chan_take(fmap_chanmap *m, uint32_t n, uint64_t spin_max, uint64_t deadline,
                   uint64_t *pos, uint32_t *got, fmap_err *e)
{
    if (ensure_joined(m, e) != FMAP_OK)
        return e->status;
    int rc = try_take(m, n, 0, pos, got);
    if (rc == EMPTY) {
        if (!deadline)
            return FMAP_WAIT_TIMEOUT;
        rc = wait_claim(m, try_take, &m->h->data.seq, &m->h->data.sleepers,
                        &m->h->parts[m->part].sleeping[0], n,
                        spin_max, deadline, pos, got);
    }
    /* Not in a small ring: there the slot ahead is soon the producers'
       next, and a shared copy of it here costs their write a round trip. */
    if (rc == FMAP_OK && m->capacity >= 4 * TAKE_AHEAD)
        prefetch_ahead(m, *pos + *got - 1 + TAKE_AHEAD);
    return rc;
}

/* ---- messages ----------------------------------------------------------- */

char *fmap_chan_payload(fmap_chanmap *m, uint64_t pos)
{
    return (char *)slot_at(m, pos) + SLOT_HEADER;
}

uint64_t fmap_chan_length(fmap_chanmap *m, uint64_t pos, uint32_t *kind)
{
    struct slot *s = slot_at(m, pos);
    *kind = s->kind;
    /* The producer wrote it; a length past the slot (only a process writing
       the memory directly could make one) is cut to the slot. */
    uint64_t room = m->stride - SLOT_HEADER;
    return s->len <= room ? s->len : room;
}

#define PREFETCH_MAX 16384u

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("prfchw")))   /* PREFETCHW; a NOP where the CPU lacks it */
#endif
static void prefetch_for_write(const char *p, uint64_t len)
{
    for (uint64_t off = 0; off < len; off += 64)
        __builtin_prefetch(p + off, 1, 3);
}

void fmap_chan_commit(fmap_chanmap *m, uint64_t pos, uint64_t len, uint32_t kind)
{
    struct slot *s = slot_at(m, pos);
    s->len = len;
    s->kind = kind;
    __atomic_store_n(&s->word, WORD(pos, 0, S_FULL) ^ word_key(m, pos), __ATOMIC_SEQ_CST);
    /* The slot this producer is likely to write next, if no one uses it:
       its lines were last read by a consumer, on another core; asking for
       them now, for writing, overlaps their transfer with whatever the
       caller does before its next send (4 KiB messages: 4-10% faster). */
    struct slot *next = slot_at(m, pos + 1);
    if ((__atomic_load_n(&next->word, __ATOMIC_RELAXED) ^ word_key(m, pos + 1)) ==
        WORD(pos + 1, 0, S_FREE))
        prefetch_for_write((const char *)next, SLOT_HEADER + (len < PREFETCH_MAX ? len : PREFETCH_MAX));
}

/* Move the consumers' cursor past slots that need no consumer (given back
   unsent, or withheld), as a consumer arriving there would: so len() does
   not count them and a drained, closed channel reads as ended. */
static void skip_holes(fmap_chanmap *m)
{
    struct fmap_chan *h = m->h;
    for (uint32_t tries = 0; tries < RETRIES; tries++) {
        uint64_t tl = load64(&h->tail), w = load_word(m, tl);
        int64_t d = pos_diff(w, tl);
        if (!(d > 0 || (d == 0 && W_STATE(w) == S_READING)))
            return;
        advance(&h->tail, tl, tl + 1);
    }
}

void fmap_chan_discard(fmap_chanmap *m, uint64_t pos)
{
    uint64_t w = WORD(pos, m->part, S_WRITING);
    if (cas_word(m, pos, &w, WORD(pos + m->capacity, 0, S_FREE))) {
        skip_holes(m);
        fmap_chan_wake_consumers(m, INT_MAX);   /* the end of the stream may be here */
        fmap_chan_wake_producers(m, 1);
    }
}

void fmap_chan_withhold(fmap_chanmap *m, uint64_t pos)
{
    uint64_t w = WORD(pos, m->part, S_WRITING);
    if (cas_word(m, pos, &w, WORD(pos, m->part, S_READING))) {
        skip_holes(m);
        fmap_chan_wake_consumers(m, INT_MAX);
    }
}

int fmap_chan_release(fmap_chanmap *m, uint64_t pos)
{
    uint64_t w = WORD(pos, m->part, S_READING);
    if (!cas_word(m, pos, &w, WORD(pos + m->capacity, 0, S_FREE)))
        return -1;
    return 0;
}

void fmap_chan_close(fmap_chanmap *m)
{
    __atomic_store_n(&m->h->closed, 1, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&m->h->data.seq, 1, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&m->h->space.seq, 1, __ATOMIC_SEQ_CST);
    futex_wake(&m->h->data.seq, INT_MAX);
    futex_wake(&m->h->space.seq, INT_MAX);
}
