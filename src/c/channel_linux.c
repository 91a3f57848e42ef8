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
 *   parts    participant records: (pid, start time) of every open handle's process;
 *   meta     for each slot, 16 bytes: its state word, its message's length
 *            and kind (struct meta);
 *   slots    `capacity` slots (a power of two), each room for `msg_size`
 *            bytes of message and an array's description.
 *
 * The ring is Vyukov's bounded MPMC queue (each slot's 64-bit state word
 * holds the position it is ready for), with the claimer's name added for
 * crash safety:
 *
 *   FREE(p)          position p may be claimed by a producer (slot k starts FREE(k))
 *   WRITING(p, who)  a producer is writing position p's message
 *   FULL(p)          position p's message is published
 *   READING(p, who)  a consumer is reading it; done, the slot is FREE(p + capacity)
 *
 * A run of slots is claimed with one compare-and-swap on a cursor (head for
 * producers, tail for consumers), after reading that they are FREE (FULL);
 * the claimer then names itself in each slot by plain stores.  So a batch
 * costs each side one locked instruction, not one per slot: a locked
 * instruction waits for its line, and a ring's slot lines were last written
 * on the other side's core.  64-byte messages in batches of 64, in C: 42-45 M
 * msg/s against 15 M with a swap per slot when the two CPUs are close (a
 * cache line's round trip 100 ns), 15 M against 4.7 M when far (400 ns).
 * Between the swap and the names, a claimed slot still reads FREE(p)
 * (FULL(p)) though behind the cursor; the cursor names the claim that moved
 * it, and each claim names the one before it, if need be, before it moves
 * the cursor on (mark_behind), so that a dead claimer is always found.
 *
 * Batches are published, and given back, last slot first, each FREE or FULL
 * word carrying the length of the run it starts: a claim reads one word per
 * run, not one per slot, and the other lines travel while the claimer works.
 *
 * A waiter blocked on a WRITING or READING slot whose claimer is dead (its
 * pid gone, a zombie, or reused by a process with another start time) turns
 * the slot into FREE(p + capacity): a message a dead producer was writing is
 * dropped (never delivered in part), a message a dead consumer was reading is
 * gone with it (delivered at most once).  Consumers pass such holes (and
 * slots given back unsent) by moving the tail over them.  A record freed by
 * a dead process is swept the same way before it is reused.
 *
 * Waiting: a bounded spin that adapts (it lengthens while spinning pays off
 * and shrinks while it does not), then a futex sleep.  Publishers and
 * releasers make a system call only when the sleeper count says someone
 * sleeps, with a full fence on both sides between the change and the look
 * at the other's (a Dekker handshake), so a busy pipeline never enters the
 * kernel.
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
#if defined(__x86_64__)
#include <emmintrin.h>
#endif

#define CHAN_MAGIC "FMAPCHN\x01"
#define CHAN_VERSION 5u            /* 4: slot metadata in an array of its own; 5: hole tallies */
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
/* FREE and FULL words name no one: their claimer bits hold a run instead,
   how many slots from this one are known to be in the same state (0 and 1:
   this one).  A run is stored last slot first, so whoever reads its first
   word may take all of it without reading the others' (one remote line per
   run, not per slot); no one else changes those slots before taking that
   first one. */
#define W_RUN(w) (W_OWNER(w) ? W_OWNER(w) : 1u)
#define W_BARE(w) ((w) & ~((uint64_t)(FMAP_CHAN_PARTS - 1) << 2))
#define RUN_MAX (FMAP_CHAN_PARTS - 1)
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
    uint64_t meta_offset;   /* the slots' metadata (struct meta[capacity]) */
    /* Read on every claim, written rarely: shared by every cache. */
    uint32_t closed __attribute__((aligned(LINE)));
    int32_t holes;          /* slots given back unsent (or withheld, or dropped)
                               that the tail has not passed: see skip_holes */
    uint32_t holes_passed;  /* holes the tail has passed, ever: settle_holes' witness */
    uint32_t holes_made;    /* make_hole calls finished (swapped or undone), ever: another */
    uint64_t head __attribute__((aligned(LINE)));   /* producers' cursor */
    uint64_t tail __attribute__((aligned(LINE)));   /* consumers' cursor */
    struct {
        uint32_t seq;       /* bumped by every wake-up: the futex word */
        uint32_t sleepers;
    } data __attribute__((aligned(LINE))),          /* consumers wait for messages */
      space __attribute__((aligned(LINE)));         /* producers wait for free slots */
    struct part parts[FMAP_CHAN_PARTS] __attribute__((aligned(LINE)));
};

/* A slot's metadata: its state word, and its message's length (48 bits)
   and kind (16).  Kept apart from the messages, four to a cache line: a
   message then moves one line of its own between the producer's and the
   consumer's cores (its metadata a quarter of one), where a header line in
   front of each message made two.  In C, 64-byte messages, cache-line
   round trip 400 ns: 28.8 M msg/s in batches against 15.2 M, one at a time
   6.4 M against 2.7 M; at 100 ns, 58.6 M against 44.8 M and 18.3 M against
   9.7 M. */
struct meta {
    uint64_t word;
    uint64_t len_kind;
};
#define LEN_BITS 48

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

static struct meta *meta_at(fmap_chanmap *m, uint64_t pos)
{
    return (struct meta *)m->meta + (pos & m->mask);
}

static char *slot_at(fmap_chanmap *m, uint64_t pos)
{
    return m->slots + (pos & m->mask) * m->stride;
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

/* Ask for the line at p, to write it.  By hand on x86: GCC 12 treats
   __builtin_prefetch as free of effects and drops it, without a word, from
   a target("prfchw") function inlined into one without that target, or
   from a call to it that is not inlined.  PREFETCHW is a NOP where the CPU
   lacks it. */
static inline void prefetch_w(const void *p)
{
#if defined(__x86_64__) || defined(__i386__)
    __asm__ volatile("prefetchw (%0)" : : "r"(p));
#else
    __builtin_prefetch(p, 1, 3);
#endif
}

/* Slot k's state word is kept XORed with WORD(k, 0, S_FREE), so that the
   zeros of a slot never touched read as FREE(k): creating a channel writes
   (and so allocates) its header only, not the metadata's pages.  Every access to
   a word goes through these three; pos is any position of the slot. */
static uint64_t word_key(const fmap_chanmap *m, uint64_t pos)
{
    return (pos & m->mask) << 12;
}

static uint64_t load_word(fmap_chanmap *m, uint64_t pos)
{
    return load64(&meta_at(m, pos)->word) ^ word_key(m, pos);
}

static int cas_word(fmap_chanmap *m, uint64_t pos, uint64_t *expected, uint64_t desired)
{
    uint64_t key = word_key(m, pos), raw = *expected ^ key;
    int ok = cas64(&meta_at(m, pos)->word, &raw, desired ^ key);
    *expected = raw ^ key;
    return ok;
}

/* A plain store of a word only its claimer writes at that moment (the
   names of a fresh claim, a publication, a release): no locked instruction,
   so the store waits in the store buffer and the claimer goes on. */
static void store_word(fmap_chanmap *m, uint64_t pos, uint64_t w)
{
    __atomic_store_n(&meta_at(m, pos)->word, w ^ word_key(m, pos), __ATOMIC_RELEASE);
}

/* Signed distance between a slot's position and a cursor, modulo 2^52. */
static int64_t pos_diff(uint64_t w, uint64_t cursor)
{
    return (int64_t)(((W_POS(w) - cursor) & POS_MASK) << 12) >> 12;
}

/* A cursor: the next position to claim (54 bits) | the record of the claim
   that moved it there (10 bits). */
#define C_POS(c) ((c) >> 10)
#define C_OWNER(c) ((uint32_t)((c) & (FMAP_CHAN_PARTS - 1)))
#define CURSOR(pos, owner) (((uint64_t)(pos) << 10) | (uint64_t)(owner))
#define C_POS_MASK ((UINT64_C(1) << 54) - 1)

/* The two sides: producers claim FREE slots at the head and name them
   WRITING; consumers claim FULL ones at the tail and name them READING. */
enum { HEAD = 0, TAIL = 1 };

static uint64_t *cursor_of(fmap_chanmap *m, int side)
{
    return side == HEAD ? &m->h->head : &m->h->tail;
}

static uint32_t claimable(int side)
{
    return side == HEAD ? S_FREE : S_FULL;
}

static uint32_t claimed(int side)
{
    return side == HEAD ? S_WRITING : S_READING;
}

/* A run's length as a FREE or FULL word holds it. */
static uint32_t run_len(uint64_t n)
{
    return n < RUN_MAX ? (uint32_t)n : RUN_MAX;
}

/* A slot at the tail's position that needs no consumer: given back unsent
   (FREE(tl + capacity)), withheld (READING(tl)), or dropped with a dead
   producer; or the tail read was stale. */
static int is_hole(uint64_t w, uint64_t tl)
{
    int64_t d = pos_diff(w, tl);
    return d > 0 || (d == 0 && W_STATE(w) == S_READING);
}

/* Claims name their claimer in two steps: the cursor's swap, then a store
   into each claimed slot's word.  Between the two, a claimed slot still
   reads as unclaimed, FREE(p) or FULL(p), though behind the cursor.  The
   cursor names the claim that moved it; every claim, before it moves the
   cursor on, stores that claim's name into any of its slots still unnamed
   (this function), so that only the newest claim on a side can be unnamed,
   and whoever looks for a dead claimer finds it through the cursor.

   Everyone names in ascending order, the claimer and this function alike,
   so the unnamed slots are always the last ones before the cursor: this
   function reads down to the lowest unnamed slot, then names upwards.  (A
   walker killed half-way down a top-down walk left named slots above
   unnamed ones, where the next walk stopped: the ring was stuck for good.)
   The same name stored twice (here and by the claimer itself) is harmless,
   and once the claimer has moved a slot on (published, read) the swap here
   fails.  cur: the side's cursor as read; limit: how many slots to name at
   most (the test hook that plays a walker killed part-way). */
static void mark_behind(fmap_chanmap *m, int side, uint64_t cur, uint64_t limit)
{
    uint32_t unnamed = claimable(side);
    uint64_t top = C_POS(cur), p = top;
    for (uint64_t k = 0; k < m->capacity; k++, p--)
        if (W_BARE(load_word(m, p - 1)) != WORD(p - 1, 0, unnamed))
            break;
    for (; p != top && limit > 0; p++, limit--) {
        uint64_t w = load_word(m, p);
        if (W_BARE(w) == WORD(p, 0, unnamed))
            cas_word(m, p, &w, WORD(p, C_OWNER(cur), claimed(side)));
    }
}

/* Name the newest claim on a side, as its cursor reads now: for those who
   look for a dead claimer. */
static void name_newest(fmap_chanmap *m, int side)
{
    mark_behind(m, side, load64(cursor_of(m, side)), UINT64_MAX);
}

/* The cursors this thread last moved, and on which map.  A claim that
   finds a cursor where this thread left it knows that the claim it names
   is named (this thread named it before it returned) and need not look:
   in a stream with one producer and one consumer, never.  Cursor values
   never repeat (positions only grow), map ids are never reused, and a
   forked child's copy names claims its parent named before the fork. */
static __thread struct {
    uint64_t map;
    uint64_t cur[2];
} last;
static uint64_t map_ids;

static void name_behind(fmap_chanmap *m, int side, uint64_t cur)
{
    if (!(last.map == m->id && last.cur[side] == cur))
        mark_behind(m, side, cur, UINT64_MAX);
}

static void moved(fmap_chanmap *m, int side, uint64_t cur)
{
    if (last.map != m->id) {
        last.map = m->id;
        last.cur[HEAD] = last.cur[TAIL] = UINT64_MAX;
    }
    last.cur[side] = cur;
}

/* Turn slot pos from word `from` into `to`, a hole consumers pass (a
   message given back unsent, withheld, or dropped with its dead producer).
   Counted first: a consumer looks for holes after a take only when the
   count says there are some, and the count is never below the holes the
   tail has not passed.  A process killed between the count and the swap
   (or between passing a hole and the count) leaves it too high: takes then
   look for holes every time, slower (about 10% for small messages) but no
   less right, until settle_holes takes the excess off. */
static int make_hole(fmap_chanmap *m, uint64_t pos, uint64_t from, uint64_t to)
{
    __atomic_add_fetch(&m->h->holes, 1, __ATOMIC_SEQ_CST);
    int made = cas_word(m, pos, &from, to);
    if (!made)
        __atomic_sub_fetch(&m->h->holes, 1, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&m->h->holes_made, 1, __ATOMIC_SEQ_CST);
    return made;
}

/* Slot pos, whose word w names a claimer now dead, made FREE for the next
   lap: a message being written is dropped (a hole consumers pass), one
   being read is gone with its reader.  0 when the word changed meanwhile. */
static int free_dead(fmap_chanmap *m, uint64_t pos, uint64_t w)
{
    uint64_t to = WORD(W_POS(w) + m->capacity, 0, S_FREE);
    return W_STATE(w) == S_WRITING ? make_hole(m, pos, w, to) : cas_word(m, pos, &w, to);
}

/* Move the tail from `cur` over the hole at its position (the swap fails
   if another consumer moved it first). */
static void pass_hole(fmap_chanmap *m, uint64_t cur)
{
    uint64_t to = CURSOR(C_POS(cur) + 1, m->part);
    name_behind(m, TAIL, cur);
    if (cas64(&m->h->tail, &cur, to)) {
        __atomic_add_fetch(&m->h->holes_passed, 1, __ATOMIC_SEQ_CST);
        __atomic_sub_fetch(&m->h->holes, 1, __ATOMIC_SEQ_CST);
        moved(m, TAIL, to);
    }
}

/* ---- futexes ------------------------------------------------------------ */

static void reap_sleepers(fmap_chanmap *m);
static int settle_due(fmap_chanmap *m);
#define WAKE_MISSES 1024            /* wakes that found nobody before reap_sleepers */

static void wake(fmap_chanmap *m, uint32_t *seq, uint32_t *sleepers, uint32_t n)
{
    /* The stores that made the change (plain ones: store_word) are seen
       before the count is read; a sleeper counts itself before it looks. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(sleepers, __ATOMIC_SEQ_CST)) {
        __atomic_add_fetch(seq, 1, __ATOMIC_SEQ_CST);
        long woken = futex_wake(seq, n > INT_MAX ? INT_MAX : (int)n);
        /* Nobody asleep though counted: a sleeper is on its way in or out,
           or died counted.  Many times running, look for the dead. */
        if (woken == 0 && (++m->wake_misses >= WAKE_MISSES || settle_due(m))) {
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
    /* Our pid: us (another handle), or a process that had it before us
       and died holding the record (pids are reused, soon in a small pid
       namespace); only its start time tells, and no other process can
       free its slots for us if we are the only consumer (or producer). */
    if ((int)pid == fmap_getpid())
        return start && start != fmap_self_start();
    uint64_t now = fmap_proc_start((int)pid, &dead);
    if (dead)
        return 1;
    /* start 0: the record is being filled in, or its owner's start time
       could not be read; either way the pid alone says it lives. */
    return start && now && now != start;
}

/* Take n sleepers out of a side's total, never below 0: a dead record's
   count could have been written by any process holding the channel, and a
   wrapped total would make every publish pay for a futex_wake. */
static void uncount(uint32_t *sleepers, uint32_t n)
{
    uint32_t cur = __atomic_load_n(sleepers, __ATOMIC_SEQ_CST);
    while (n && !__atomic_compare_exchange_n(sleepers, &cur, cur > n ? cur - n : 0, 0,
                                             __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        ;
}

/* Record i's process is dead: give back every slot it claims and take its
   sleepers out of the counts (a sleeper killed while counted would otherwise
   make every later publish pay for a futex_wake).  The caller has moved the
   record's pid from the dead one to its own or to REAPING. */
static void reap(fmap_chanmap *m, uint32_t i)
{
    struct fmap_chan *h = m->h;
    /* Its newest claims may be still unnamed: name them first. */
    name_newest(m, HEAD);
    name_newest(m, TAIL);
    /* Only slots some claim has reached, all behind the head (consumers
       claim behind it, and the dead claim no more): reading the others
       would allocate them. */
    uint64_t end = C_POS(load64(&h->head));
    /* Past the first lap, or wrapped round at 2^54 positions (the last
       slot's raw word is 0 only until it is first used): every slot. */
    if (end > m->capacity || load64(&meta_at(m, m->capacity - 1)->word) != 0)
        end = m->capacity;
    for (uint64_t k = 0; k < end; k++) {
        uint64_t w = load_word(m, k);
        uint32_t st = W_STATE(w);
        if ((st == S_WRITING || st == S_READING) && W_OWNER(w) == i)
            free_dead(m, k, w);
    }
    uncount(&h->data.sleepers,
            __atomic_exchange_n(&h->parts[i].sleeping[0], 0, __ATOMIC_SEQ_CST));
    uncount(&h->space.sleepers,
            __atomic_exchange_n(&h->parts[i].sleeping[1], 0, __ATOMIC_SEQ_CST));
    fmap_chan_wake_consumers(m, INT_MAX);
    fmap_chan_wake_producers(m, INT_MAX);
}

/* How long one call goes on reaping dead sleepers' records, from its first
   reap (it reaps one at least): each reap walks the ring, with the caller's
   GIL held, and records written to look like dead sleepers (any process
   holding the channel can) made 1000 walks, 17 s at capacity 2^24.  The rest wait for a
   later call (the next 1024 wakes that find nobody, or stats()).  A budget,
   not a count: the 40 consumers of a killed process group, on a ring of a
   few thousand slots, go in one call (a count of 4 left stats() reading
   high for 10 calls, and publishers making futex_wake calls for nobody).
   One record at a time, each back to free as soon as it is reaped: a
   reaper killed meanwhile strands one record (left REAPING for good), not
   all it had taken. */
#define REAP_BUDGET_NS 1000000u

/* A side's total counts sleepers that no record counts: a sleeper killed
   between its two counts (see wait_claim), on the way in or out, or a total
   written by another process.  Nothing else would ever take them off, and
   every publish on that side would make a futex_wake call for nobody.
   Sleepers between their two counts look the same for an instant, so only
   an excess this handle saw between SETTLE_NS and SETTLE_MAX_NS ago and
   sees again comes off (the smaller of the two), by a CAS from the total
   it read; an older sighting counts as none.  After a first sighting, the
   first wake to miss in that window looks again (settle_due).  So a side
   published on less often than every SETTLE_MAX_NS keeps its excess: a
   futex_wake for nobody per publish, at a few publishes a second.
   Wrong when live sleepers sat between their counts at both looks (one
   stopped there, by SIGSTOP or a debugger; or two, one at each look), or
   when the total left the value read and came back to it before the CAS:
   the total is then low, and until the last sleeper of that side leaves
   (uncount stops at 0) a publish may skip a wake, which its sleeper makes
   up by itself within DEAD_CHECK_NS.  The sightings are this handle's,
   written under its reaping flag; settle_due reads them from any thread. */
#define SETTLE_NS (2 * (uint64_t)DEAD_CHECK_NS)
#define SETTLE_MAX_NS (20 * (uint64_t)DEAD_CHECK_NS)

static int settle_due(fmap_chanmap *m)
{
    uint64_t at[2] = {__atomic_load_n(&m->seen[0].at, __ATOMIC_RELAXED),
                      __atomic_load_n(&m->seen[1].at, __ATOMIC_RELAXED)};
    if (!(at[0] | at[1]))
        return 0;
    uint64_t now = fmap_clock_ns();
    for (int side = 0; side < 2; side++)
        if (at[side] && now - at[side] >= SETTLE_NS && now - at[side] <= SETTLE_MAX_NS)
            return 1;
    return 0;
}

/* One look's excess of a shared count over what is there (0: none, or a
   void look), seen over `count`: a first sighting is kept; the same count
   seen above again SETTLE_NS to SETTLE_MAX_NS later returns how much to
   take off (the smaller of the two excesses) and clears the sighting; an
   older sighting counts as none.  settle_totals and settle_holes. */
static uint32_t sighted(fmap_sighting *s, uint32_t excess, uint32_t count, uint64_t now)
{
    uint64_t at = s->at;
    if (excess && (!at || now - at > SETTLE_MAX_NS || s->count != count)) {
        s->excess = excess;                 /* a first sighting */
        s->count = count;
        __atomic_store_n(&s->at, now, __ATOMIC_RELAXED);
        return 0;
    }
    if (excess && now - at < SETTLE_NS)
        return 0;
    __atomic_store_n(&s->at, 0, __ATOMIC_RELAXED);
    return excess < s->excess ? excess : s->excess;
}

static void settle_totals(fmap_chanmap *m, uint64_t now)
{
    struct fmap_chan *h = m->h;
    for (int side = 0; side < 2; side++) {
        uint32_t *total = side ? &h->space.sleepers : &h->data.sleepers;
        uint32_t t = __atomic_load_n(total, __ATOMIC_SEQ_CST);
        uint64_t counted = 0;
        for (uint32_t i = 0; i < FMAP_CHAN_PARTS && counted < t; i++)
            counted += __atomic_load_n(&h->parts[i].sleeping[side], __ATOMIC_SEQ_CST);
        uint32_t drop = sighted(&m->seen[side], t > counted ? (uint32_t)(t - counted) : 0, 0,
                                now);
        if (drop)
            __atomic_compare_exchange_n(total, &t, t - drop, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST);
    }
}

/* Wakes found nobody asleep many times over: a sleeper may have died counted.
   Give back the records of dead processes that were sleeping; then settle a
   total that counts more than the records do. */
static void reap_sleepers(fmap_chanmap *m)
{
    struct fmap_chan *h = m->h;
    /* Not within itself: reap() wakes both sides, and wakes that find
       nobody call back here; nested, a reaper held two records (two to
       strand if killed) and spent two budgets.  Nor in two threads of ours
       at once: the second leaves it to the first.  By pid: a child forked
       while a thread of ours reaped finds the parent's, not its own. */
    uint32_t me = (uint32_t)fmap_getpid();
    if (__atomic_exchange_n(&m->reaping, me, __ATOMIC_ACQUIRE) == me)
        return;
    uint64_t until = 0;
    for (uint32_t i = 0; i < FMAP_CHAN_PARTS; i++) {
        /* The budget runs from the first reap: the scan before it (a /proc
           read per live sleeper) goes on, since records are looked at from
           the first each call and live sleepers ahead must not keep it from
           the dead ones; after it, the /proc reads count too. */
        if (until && i % 16 == 0 && fmap_clock_ns() >= until)
            break;
        uint32_t pid = __atomic_load_n(&h->parts[i].pid, __ATOMIC_SEQ_CST);
        if (pid == 0 || pid == REAPING ||
            !(__atomic_load_n(&h->parts[i].sleeping[0], __ATOMIC_SEQ_CST) |
              __atomic_load_n(&h->parts[i].sleeping[1], __ATOMIC_SEQ_CST)) ||
            !part_dead(h, i))
            continue;
        if (__atomic_compare_exchange_n(&h->parts[i].pid, &pid, REAPING, 0,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
            if (!until)
                until = fmap_clock_ns() + REAP_BUDGET_NS;
            reap(m, i);
            __atomic_store_n(&h->parts[i].start, 0, __ATOMIC_SEQ_CST);
            __atomic_store_n(&h->parts[i].pid, 0, __ATOMIC_SEQ_CST);
            if (fmap_clock_ns() >= until)
                break;
        }
    }
    settle_totals(m, fmap_clock_ns());
    __atomic_store_n(&m->reaping, 0, __ATOMIC_RELEASE);
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
            /* A dead process's record goes through REAPING: our pid beside
               its start time would read as a dead predecessor of ours
               (part_dead), to our own other handles too, until ours is in. */
            if (!__atomic_compare_exchange_n(&h->parts[i].pid, &pid, pass ? REAPING : me, 0,
                                             __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
                continue;
            __atomic_store_n(&h->parts[i].start, start, __ATOMIC_SEQ_CST);
            if (pass == 1) {
                reap(m, i);
                __atomic_store_n(&h->parts[i].pid, me, __ATOMIC_SEQ_CST);
            }
            m->part = i;
            m->pid = (int)me;
            return FMAP_OK;
        }
    }
    return fail(e, FMAP_EFULL, 0, "the channel's participant records (one per open handle)");
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
    if (m->pid) {
        /* A forked child: the parent's timing of its copies is not the
           child's (see fmap_chan_copy_in). */
        uint8_t force = m->cp.force;
        memset(&m->cp, 0, sizeof m->cp);
        m->cp.force = force;
    }
    return join(m, e);
}

/* ---- objects ------------------------------------------------------------ */

static uint64_t header_size(void)
{
    return round_up(sizeof(struct fmap_chan), fmap_page_size());
}

/* Bytes per slot: an odd number of cache lines.  Slots an even number of
   lines apart fall into fewer of the L1 cache's sets (384 bytes: half of
   them; 512: an eighth), and a batch's lines then evict each other.  In C,
   64-byte messages (stride 384 made 448): 28.8 M msg/s in batches against
   10.7 M. */
static uint64_t stride_of(uint64_t msg_size)
{
    uint64_t stride = round_up(msg_size + FMAP_CHAN_ROOM, 64);
    return stride / 64 % 2 ? stride : stride + 64;
}

static uint64_t meta_size(uint64_t capacity)
{
    return round_up(capacity * sizeof(struct meta), fmap_page_size());
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
    return round_up(header_size() + meta_size(capacity) + capacity * stride, fmap_page_size());
}

/* A channel's sizes as the opening process read them, once: any process
   holding the channel can rewrite its header, so what is checked is this
   copy, and the mapping is built from it alone (read again from the
   header, a size rewritten after the check sent slot_at out of the map). */
struct geometry {
    uint64_t capacity, msg_size, stride, meta_offset, slots_offset, total_size;
};

static int map_all(int fd, const struct geometry *g, fmap_chanmap *m, fmap_err *e)
{
    void *p = mmap(NULL, g->total_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        return fail(e, FMAP_ESYS, errno, "mmap");
    m->h = p;
    m->maplen = g->total_size;
    m->meta = (char *)p + g->meta_offset;
    m->slots = (char *)p + g->slots_offset;
    m->capacity = g->capacity;
    m->mask = g->capacity - 1;
    m->msg_size = g->msg_size;
    m->stride = g->stride;
    m->pid = 0;
    m->id = __atomic_add_fetch(&map_ids, 1, __ATOMIC_RELAXED);
    m->spin_cur = UINT64_MAX;   /* the first wait may spin for all of spin_max */
    m->spin_since = 0;
    m->wake_misses = 0;
    m->reaping = 0;
    memset(m->seen, 0, sizeof m->seen);
    m->hole_misses = m->settling = 0;
    m->holes_looked = 0;
    memset(&m->cp, 0, sizeof m->cp);
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
    h->meta_offset = header_size();
    h->slots_offset = header_size() + meta_size(sp->capacity);
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
    /* Each field read once (atomic loads: the compiler may not read one
       again), then only the copies are used. */
    char magic[8];
    memcpy(magic, h->magic, 8);
    uint32_t version = __atomic_load_n(&h->version, __ATOMIC_RELAXED);
    uint32_t hsize = __atomic_load_n(&h->header_size, __ATOMIC_RELAXED);
    uint32_t nparts = __atomic_load_n(&h->nparts, __ATOMIC_RELAXED);
    struct geometry g = {
        .capacity = __atomic_load_n(&h->capacity, __ATOMIC_RELAXED),
        .msg_size = __atomic_load_n(&h->msg_size, __ATOMIC_RELAXED),
        .stride = __atomic_load_n(&h->stride, __ATOMIC_RELAXED),
        .meta_offset = __atomic_load_n(&h->meta_offset, __ATOMIC_RELAXED),
        .slots_offset = __atomic_load_n(&h->slots_offset, __ATOMIC_RELAXED),
        .total_size = __atomic_load_n(&h->total_size, __ATOMIC_RELAXED),
    };
    munmap(h, header_size());
    /* fmap_chan_size first: it refuses a capacity that is not a power of
       two or too large, before meta_size multiplies it. */
    uint64_t size = fmap_chan_size(g.capacity, g.msg_size);
    int ok = memcmp(magic, CHAN_MAGIC, 8) == 0 && version == CHAN_VERSION &&
             hsize == sizeof(struct fmap_chan) && nparts == FMAP_CHAN_PARTS &&
             size != 0 && size == g.total_size && g.total_size == (uint64_t)st.st_size &&
             g.meta_offset == header_size() &&
             g.slots_offset == header_size() + meta_size(g.capacity) &&
             g.stride == stride_of(g.msg_size);
    if (!ok)
        return fail(e, FMAP_ECORRUPT, 0,
                    "the channel's header has a wrong magic, version or sizes");
    if (map_all(fd, &g, m, e) != FMAP_OK)
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
    st->tail = C_POS(load64(&h->tail));
    st->head = C_POS(load64(&h->head));
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
    /* The tail never passes the head: read first, it is behind the head
       read after it. */
    uint64_t tl = C_POS(load64(&m->h->tail)), hd = C_POS(load64(&m->h->head));
    return (hd - tl) & C_POS_MASK;
}

/* ---- claiming ----------------------------------------------------------- */

enum { EMPTY = -1 };   /* try_*: nothing to claim now */

/* Each retry of a try_* loop follows another party's progress (a cursor
   moved, a race lost), so a real ring needs few.  State words no ring
   writes (memory scribbled on by a process of the same user) could keep
   one looping for ever, holding the GIL: past this many retries the try
   reports "nothing now", and the caller's wait, with its timeout, goes on. */
#define RETRIES 4096u

/* How many of the n slots from `from` are `want` for their position
   (FREE(p): a producer may claim it; FULL(p): a consumer may), reading the
   first word of each run; *w is the word of the first slot that is not. */
static uint32_t run_of(fmap_chanmap *m, uint64_t from, uint32_t n, uint32_t want, uint64_t *w)
{
    uint32_t i = 0;
    while (i < n && W_BARE(*w = load_word(m, from + i)) == WORD(from + i, 0, want)) {
        uint32_t r = W_RUN(*w);
        i += r < n - i ? r : n - i;
    }
    return i;
}

/* Ask for the metadata and message start of slots pos..pos+n-1, to write:
   they were last written on another core, and a batch's lines fetched at
   once arrive in about the time of one, where lines fetched as the loop
   reaches them arrive one after the other.  Measured in C, 64-byte
   messages in batches of 64, CPUs close: 36-42 M msg/s with it on both
   sides, 24-30 M without. */
#define PREFETCH_SLOTS 64u

static void prefetch_batch(fmap_chanmap *m, uint64_t pos, uint32_t n, int to_write)
{
    if (n > PREFETCH_SLOTS)
        n = PREFETCH_SLOTS;
    for (uint32_t k = 0; k < n; k++) {
        const char *s = slot_at(m, pos + k);
        if (k == 0 || (pos + k) % (64 / sizeof(struct meta)) == 0)
            prefetch_w(meta_at(m, pos + k));  /* both sides write the words */
        if (to_write)
            prefetch_w(s);
        else
            __builtin_prefetch(s, 0, 3);
    }
}

/* try_* flags */
#define CHECK_DEAD 1    /* blocked long enough: look for a dead claimer */
#define UNNAMED 2       /* test hook: leave the claim unnamed, as a claimer killed
                           between the cursor's swap and the names would */
#define SPINNING 4      /* a producer's gated spin: see GATE_SLOTS */
#define RACE_CLOSE 8    /* test hook: see fmap_chan_send_racing_close */

/* A producer that finds the ring full waits, while it spins, until
   GATE_SLOTS slots are free, not one.  Claiming each slot as the consumer
   frees it keeps the two on the same metadata line (four slots to a line),
   which then moves between their cores at every message; GATE_SLOTS apart,
   each works on lines the other is done with.  Only when GATE_SLOTS
   messages or more are pending as the wait begins, so the consumer loses
   nothing: it has those to read meanwhile.  (Consumers that keep messages
   in hand, recv_array's arrays or a window of jobs, fill the ring with
   slots that are in use but not pending; gated then, each send waited out
   GATE_NS while the consumer waited for it: 23 k msg/s instead of 150 k,
   found in review.)  For GATE_NS at most, never once asleep (every freed
   slot would wake the producer to sleep again), nor in rings of fewer than
   4 * GATE_SLOTS slots (a quarter at most is held back).
   Measured with the benchmark, 4 KiB messages one at a time, interleaved:
   1.46 against 1.12 M msg/s with the CPUs far apart (with the prefetch in
   fmap_chan_release), 1.56 against 1.48 M close. */
#define GATE_SLOTS 16u
#define GATE_NS 50000u

/* Move a side's cursor from cur over the i slots from `from`, then name
   this process in each: 0 when another claimer moved the cursor first.
   UNNAMED leaves the names out. */
static int claim_run(fmap_chanmap *m, int side, uint64_t cur, uint64_t from, uint32_t i,
                     int flags)
{
    uint64_t to = CURSOR(from + i, m->part);
    if (!cas64(cursor_of(m, side), &cur, to))
        return 0;
    if (!(flags & UNNAMED)) {
        for (uint32_t k = 0; k < i; k++)
            store_word(m, from + k, WORD(from + k, m->part, claimed(side)));
        moved(m, side, to);
    }
    return 1;
}

static int try_take(fmap_chanmap *m, uint32_t n, int flags, uint64_t *pos, uint32_t *got);

/* RACE_CLOSE: whether the consumer race_close looked for found the end. */
static __thread int race_saw_end;

/* Another process closes the channel, and a consumer looks for the end,
   after a producer's read of `closed` and before its claim: the window that
   the producer's second read of `closed`, after its claim, covers. */
static void race_close(fmap_chanmap *m)
{
    uint64_t pos;
    uint32_t got;
    fmap_chan_close(m);
    race_saw_end = try_take(m, 1, 0, &pos, &got) == FMAP_CHAN_CLOSED;
}

/* Producer: claim up to n consecutive FREE slots at the head.  CHECK_DEAD:
   a full ring whose oldest slot is held by a dead process is freed. */
static int try_reserve(fmap_chanmap *m, uint32_t n, int flags, uint64_t *pos, uint32_t *got)
{
    struct fmap_chan *h = m->h;
    if (__atomic_load_n(&h->closed, __ATOMIC_SEQ_CST))
        return FMAP_CHAN_CLOSED;
    if (flags & SPINNING) {
        uint64_t gate = C_POS(load64(&h->head)) + GATE_SLOTS - 1;
        if (W_BARE(load_word(m, gate)) != WORD(gate, 0, S_FREE))
            return EMPTY;
    }
    for (uint32_t tries = 0; tries < RETRIES; tries++) {
        uint64_t cur = load64(&h->head), hd = C_POS(cur), w = 0;
        name_behind(m, HEAD, cur);
        uint32_t i = run_of(m, hd, n, S_FREE, &w);
        if (i > 1)
            prefetch_batch(m, hd, i, 1);
        if (i > 0) {
            if (flags & RACE_CLOSE)
                race_close(m);
            flags &= ~RACE_CLOSE;
            if (!claim_run(m, HEAD, cur, hd, i, flags))
                continue;                     /* another producer claimed first */
            *pos = hd;
            *got = i;
            if (flags & UNNAMED)
                return FMAP_OK;
            /* Closed after we looked: give the slots back (a consumer may
               have seen them free and the channel closed, and ended). */
            if (__atomic_load_n(&h->closed, __ATOMIC_SEQ_CST)) {
                for (uint32_t k = 0; k < i; k++)
                    fmap_chan_discard(m, hd + k);
                return FMAP_CHAN_CLOSED;
            }
            return FMAP_OK;
        }
        if (pos_diff(w, hd) != -(int64_t)m->capacity)
            continue;                         /* our head was stale: read it again */
        /* The previous lap still uses the slot: the ring is full. */
        if (flags & CHECK_DEAD) {
            uint32_t st = W_STATE(w);
            if ((st == S_READING || st == S_WRITING) && part_dead(h, W_OWNER(w))) {
                if (free_dead(m, hd, w))
                    fmap_chan_wake_consumers(m, INT_MAX);
                continue;
            }
            if (st == S_FULL) {
                /* Taken but not yet named, if behind the tail: name it, and
                   look at its taker. */
                uint64_t was = w;
                name_newest(m, TAIL);
                if (load_word(m, hd) != was)
                    continue;
            }
        }
        return EMPTY;
    }
    return EMPTY;
}

/* Nothing at position tl and nothing will come: the channel is closed and
   no producer has claimed tl.  `closed` is read first: a producer that
   claims tl after we read the head reads `closed` after its claim, and
   gives the slot back. */
static int ended_at(fmap_chanmap *m, uint64_t tl)
{
    if (!__atomic_load_n(&m->h->closed, __ATOMIC_SEQ_CST))
        return 0;
    return ((C_POS(load64(&m->h->head)) - tl) & C_POS_MASK) == 0;
}

static void skip_holes(fmap_chanmap *m);

/* Consumer: claim up to n consecutive published messages at the tail. */
static int try_take(fmap_chanmap *m, uint32_t n, int flags, uint64_t *pos, uint32_t *got)
{
    struct fmap_chan *h = m->h;
    for (uint32_t tries = 0; tries < RETRIES; tries++) {
        uint64_t cur = load64(&h->tail), tl = C_POS(cur), w = 0;
        name_behind(m, TAIL, cur);
        uint32_t i = run_of(m, tl, n, S_FULL, &w);
        if (i > 1)
            prefetch_batch(m, tl + 1, i - 1, 0);
        if (i > 0) {
            if (!claim_run(m, TAIL, cur, tl, i, flags))
                continue;                     /* another consumer took them first */
            *pos = tl;
            *got = i;
            if (flags & UNNAMED)
                return FMAP_OK;
            /* Slots given back unsent behind these are passed now: len()
               counts messages, and the next one may be one of them.  Only
               when there are any: reading the next slot's word takes its
               line from the producer about to write it. */
            if (__atomic_load_n(&h->holes, __ATOMIC_SEQ_CST) > 0)
                skip_holes(m);
            return FMAP_OK;
        }
        int64_t d = pos_diff(w, tl);
        uint32_t st = W_STATE(w);
        if (is_hole(w, tl)) {
            pass_hole(m, cur);
            continue;
        }
        if (d == 0 && st == S_WRITING) {
            if ((flags & CHECK_DEAD) && part_dead(h, W_OWNER(w))) {
                /* The producer died writing: its message is dropped. */
                if (free_dead(m, tl, w))
                    fmap_chan_wake_producers(m, 1);
                continue;
            }
            return EMPTY;                     /* being written: wait for it */
        }
        /* FREE(tl), or the last lap's consumer still reads it: nothing
           published at tl.  Claimed already (behind the head), its claimer
           may have died before naming it: name it, and look at its claimer. */
        if ((flags & CHECK_DEAD) && d == 0 && ((C_POS(load64(&h->head)) - tl - 1) & C_POS_MASK) < m->capacity) {
            name_newest(m, HEAD);
            if (load_word(m, tl) != w)
                continue;
        }
        if (ended_at(m, tl))
            return FMAP_CHAN_CLOSED;
        return EMPTY;
    }
    return EMPTY;
}

/* try_reserve (HEAD) or try_take (TAIL). */
static inline int try_side(fmap_chanmap *m, int side, uint32_t n, int flags, uint64_t *pos,
                           uint32_t *got)
{
    return side == HEAD ? try_reserve(m, n, flags, pos, got) : try_take(m, n, flags, pos, got);
}

/* A side's futex word and sleeper count: producers wait for space, consumers for data. */
static void wait_words(fmap_chanmap *m, int side, uint32_t **seq, uint32_t **sleepers)
{
    struct fmap_chan *h = m->h;
    *seq = side == HEAD ? &h->space.seq : &h->data.seq;
    *sleepers = side == HEAD ? &h->space.sleepers : &h->data.sleepers;
}

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

/* Whether a producer's wait starting now is gated (see GATE_SLOTS): asked
   once per wait, since the tail's line is the consumers', written at every
   take; read at every turn of the spin, it slowed them. */
static int gated(fmap_chanmap *m)
{
    if (m->capacity < 4 * GATE_SLOTS)
        return 0;
    uint64_t hd = C_POS(load64(&m->h->head)), tl = C_POS(load64(&m->h->tail));
    return ((hd - tl) & C_POS_MASK) >= GATE_SLOTS;
}

/* Whether a claim on `side` that found nothing should look for a dead
   claimer now: once this handle's claims there have found nothing for
   DEAD_CHECK_NS, across calls, and at most that often.  Across calls: a
   caller that polls (timeout 0, or shorter than DEAD_CHECK_NS) must free a
   dead process's slot too, not only one long wait. */
static int dead_check_due(fmap_chanmap *m, int side, uint64_t now)
{
    if (!m->stuck[side])
        m->stuck[side] = now;
    if (now - m->stuck[side] < DEAD_CHECK_NS || now - m->checked[side] < DEAD_CHECK_NS)
        return 0;
    m->checked[side] = now;
    return 1;
}

/* When dead_check_due will next say yes (a sleep's timeout).  Another
   thread on this handle may have just claimed and cleared stuck: then
   count from now (0 would make a timeout long past). */
static uint64_t dead_check_at(fmap_chanmap *m, int side, uint64_t now)
{
    uint64_t stuck = m->stuck[side];
    uint64_t a = (stuck ? stuck : now) + DEAD_CHECK_NS, b = m->checked[side] + DEAD_CHECK_NS;
    return a > b ? a : b;
}

/* A claim by a counted sleeper succeeded: wake one more sleeper of the
   same side if the slot at the side's cursor is claimable (or, for
   consumers, a hole to pass on the way to one).  Each publish or release
   wakes one sleeper only, and a woken one may find its slot not yet
   claimable (a run published out of order: p+1 before p) and sleep again;
   whoever is woken for p must pass the wake for p+1 on, or a sleeper waits
   out its dead check's timeout with a message there.  The cursor, not the
   slot after our claim: the tail may have moved past holes since, or a
   claimer that never counted itself (a spinner, a poller: they pass
   nothing on) may have taken that slot, and the one after it is still
   owed a wake; so while the cursor moves under us, look again.  (A claim
   that never counted itself took no wake and passes none on: on every
   claim, the read of the count cost 64-byte messages 10%.)  The count is
   read after the claim's locked instruction, as a publisher reads it after
   its change. */
#define PASS_ON_LOOKS 8u

static void pass_on(fmap_chanmap *m, int side)
{
    uint32_t *seq, *sleepers;
    wait_words(m, side, &seq, &sleepers);
    if (!__atomic_load_n(sleepers, __ATOMIC_SEQ_CST))
        return;
    uint64_t cur = C_POS(load64(cursor_of(m, side)));
    for (uint32_t k = 0; k < PASS_ON_LOOKS; k++) {
        uint64_t w = load_word(m, cur);
        if (W_BARE(w) == WORD(cur, 0, claimable(side)) || (side == TAIL && is_hole(w, cur)))
            break;                      /* someone asleep can go on from here */
        uint64_t now = C_POS(load64(cursor_of(m, side)));
        if (now == cur)
            return;                     /* not claimable: whoever makes it so wakes */
        cur = now;
    }
    wake(m, seq, sleepers, 1);
}

/* Spin (up to the adaptive budget), then sleep on the futex, until claimed,
   closed or the deadline.  The caller has tried already, at `start`. */
static int wait_claim(fmap_chanmap *m, int side, uint32_t n, uint64_t spin_max,
                      uint64_t start, uint64_t deadline, uint64_t *pos, uint32_t *got)
{
    uint32_t *seq, *sleepers;
    wait_words(m, side, &seq, &sleepers);
    uint32_t *mine = &m->h->parts[m->part].sleeping[side == HEAD];
    uint64_t now = start;
    uint64_t budget = m->spin_cur < spin_max ? m->spin_cur : spin_max;
    int rc;
    if (budget) {
        uint64_t spin_end = start + budget, next_yield = start + YIELD_NS;
        uint64_t gate_end = side == HEAD && gated(m) ? start + GATE_NS : 0;
        for (unsigned k = 1;; k++) {
            cpu_relax();
            rc = try_side(m, side, n, now < gate_end ? SPINNING : 0, pos, got);
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
    for (;;) {
        /* Counted in the channel's total before our record's, and out of
           it after: killed in between, the total is one too high, never
           one too low (reap takes the record's count off the total, and a
           low total lets publishers skip the wake a live sleeper needs).
           Too high, every publish (or release) on this side makes a
           futex_wake call that finds nobody, until settle_totals takes it
           off: it looks after WAKE_MISSES of them, and again at the first
           one SETTLE_NS later. */
        __atomic_add_fetch(sleepers, 1, __ATOMIC_SEQ_CST);
        __atomic_add_fetch(mine, 1, __ATOMIC_SEQ_CST);
        uint32_t v = __atomic_load_n(seq, __ATOMIC_SEQ_CST);
        rc = try_side(m, side, n, 0, pos, got);
        if (rc == EMPTY) {
            uint64_t check = dead_check_at(m, side, now);
            int err = futex_wait_until(seq, v, deadline < check ? deadline : check);
            __atomic_sub_fetch(mine, 1, __ATOMIC_SEQ_CST);
            uncount(sleepers, 1);       /* a forged dead record may have taken ours */
            now = fmap_clock_ns();
            if (err == EINTR) {
                adapt(m, now - start, now, spin_max);
                return FMAP_WAIT_INTR;
            }
            rc = try_side(m, side, n, dead_check_due(m, side, now) ? CHECK_DEAD : 0, pos, got);
            if (rc == EMPTY && now < deadline)
                continue;
        } else {
            __atomic_sub_fetch(mine, 1, __ATOMIC_SEQ_CST);
            uncount(sleepers, 1);
            now = fmap_clock_ns();
        }
        if (rc == FMAP_OK)
            pass_on(m, side);
        adapt(m, now - start, now, spin_max);
        return rc == EMPTY ? FMAP_WAIT_TIMEOUT : rc;
    }
}

/* A claim on `side`: try once; if nothing, try again looking for a dead
   claimer when one is due, then wait (deadline 0: no wait). */
static inline int claim(fmap_chanmap *m, int side, uint32_t n, uint64_t spin_max,
                        uint64_t deadline, uint64_t *pos, uint32_t *got)
{
    int rc = try_side(m, side, n, 0, pos, got);
    if (rc == EMPTY) {
        uint64_t now = fmap_clock_ns();
        if (dead_check_due(m, side, now))
            rc = try_side(m, side, n, CHECK_DEAD, pos, got);
        if (rc == EMPTY && deadline)
            rc = wait_claim(m, side, n, spin_max, now, deadline, pos, got);
        if (rc == EMPTY)
            return FMAP_WAIT_TIMEOUT;
    }
    if (rc == FMAP_OK && m->stuck[side])
        m->stuck[side] = 0;
    return rc;
}

int fmap_chan_reserve(fmap_chanmap *m, uint32_t n, uint64_t spin_max, uint64_t deadline,
                      uint64_t *pos, uint32_t *got, fmap_err *e)
{
    if (ensure_joined(m, e) != FMAP_OK)
        return e->status;
    return claim(m, HEAD, n, spin_max, deadline, pos, got);
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
    __builtin_prefetch(meta_at(m, pos), 0, 3);
    __builtin_prefetch(slot_at(m, pos), 0, 3);
}

int fmap_chan_take(fmap_chanmap *m, uint32_t n, uint64_t spin_max, uint64_t deadline,
                   uint64_t *pos, uint32_t *got, fmap_err *e)
{
    if (ensure_joined(m, e) != FMAP_OK)
        return e->status;
    int rc = claim(m, TAIL, n, spin_max, deadline, pos, got);
    /* Not in a small ring: there the slot ahead is soon the producers'
       next, and a shared copy of it here costs their write a round trip. */
    if (rc == FMAP_OK && m->capacity >= 4 * TAKE_AHEAD)
        prefetch_ahead(m, *pos + *got - 1 + TAKE_AHEAD);
    return rc;
}

int fmap_chan_claim_unnamed(fmap_chanmap *m, int producer, uint32_t n, uint64_t *pos,
                            uint32_t *got, fmap_err *e)
{
    if (ensure_joined(m, e) != FMAP_OK)
        return e->status;
    return producer ? try_reserve(m, n, UNNAMED, pos, got) : try_take(m, n, UNNAMED, pos, got);
}

int fmap_chan_send_racing_close(fmap_chanmap *m, int *saw_end, fmap_err *e)
{
    uint64_t pos;
    uint32_t got;
    if (ensure_joined(m, e) != FMAP_OK)
        return e->status;
    race_saw_end = 0;
    int rc = try_reserve(m, 1, RACE_CLOSE, &pos, &got);
    *saw_end = race_saw_end;
    if (rc == FMAP_OK)
        fmap_chan_commit(m, pos, 0, 0);
    return rc;
}

int fmap_chan_name_partly(fmap_chanmap *m, int producer, uint32_t k, fmap_err *e)
{
    if (ensure_joined(m, e) != FMAP_OK)
        return e->status;
    int side = producer ? HEAD : TAIL;
    mark_behind(m, side, load64(cursor_of(m, side)), k);
    return FMAP_OK;
}

/* ---- messages ----------------------------------------------------------- */

char *fmap_chan_payload(fmap_chanmap *m, uint64_t pos)
{
    return slot_at(m, pos);
}

uint64_t fmap_chan_length(fmap_chanmap *m, uint64_t pos, uint32_t *kind)
{
    uint64_t lk = meta_at(m, pos)->len_kind, len = lk & ((UINT64_C(1) << LEN_BITS) - 1);
    *kind = (uint32_t)(lk >> LEN_BITS);
    /* The producer wrote it; a length past the slot (only a process writing
       the memory directly could make one) is cut to the slot. */
    return len <= m->stride ? len : m->stride;
}

void fmap_chan_set_length(fmap_chanmap *m, uint64_t pos, uint64_t len, uint32_t kind)
{
    meta_at(m, pos)->len_kind = len | (uint64_t)kind << LEN_BITS;
}

void fmap_chan_publish(fmap_chanmap *m, uint64_t pos, uint32_t n)
{
    /* Last slot first: a consumer waiting at the first finds the whole
       batch published when it finds that one, and takes it in one claim
       (first slot first, it would take a few at a time, reading each word
       as it is written and moving its line back and forth).  Consumers
       take in position order, so each producer's order stands. */
    for (uint32_t k = n; k-- > 0;)
        store_word(m, pos + k, WORD(pos + k, run_len(n - k), S_FULL));
}

void fmap_chan_commit(fmap_chanmap *m, uint64_t pos, uint64_t len, uint32_t kind)
{
    fmap_chan_set_length(m, pos, len, kind);
    store_word(m, pos, WORD(pos, 0, S_FULL));
    /* No prefetch of the next slot here: measured once it really ran (see
       prefetch_w), it made in-place 4 KiB messages 7% slower and the rest
       no faster. */
}

/* ---- copying messages in ---------------------------------------------- */

/* A message copied in with plain stores is written in the producer's cache:
   each line is first fetched for ownership (from the consumer's cache, which
   read it a lap ago), then read from the producer's cache by the consumer.
   When the host runs the two processes on close cores (a cache line's round
   trip about 100 ns here) that is cheap; on far ones (400-800 ns; this
   machine's host moves its two CPUs between the two every few minutes) a
   4 KiB message's 64 lines wait for those trips, and it takes 2 us.
   Streaming stores write whole lines to memory without fetching them, and
   the consumer reads them from there.  Measured in C, 4 KiB messages, 256
   slots, in M msg/s:

                             plain      streaming
     close, consumer waiting  2.0-2.3    3.1-3.3
     close, consumer behind   1.6-1.9    1.6-1.8
     far, consumer waiting    0.5        2.7-3.2
     far, consumer behind     0.5        1.5-1.6

   Close, streaming loses for 1 KiB messages (5.0 against 7.6 M) and from
   16 KiB (0.5 against 0.8 M with the consumer behind), and for arrays the
   consumer does not read all of (they stay in the producer's cache: 1 MiB
   arrays, 25 k/s against 39 k/s); through Python, 4 KiB messages close lose
   9%.  Neither kind is right everywhere, and the placement changes while
   the processes run, so each handle measures.  It copies with one kind for
   CP_USE_EPOCHS epochs (an epoch: at least CP_EPOCH_BYTES and CP_EPOCH_MSGS
   messages), then with the other, first until the consumers read messages
   copied that way (a ring's worth), then for CP_TRY_EPOCHS epochs timed; it
   keeps the other kind if that copied 5% more bytes per second than the
   running average of the kind in use.  That is the producer's rate, which
   while the ring is full is the consumer's.  Each trial the kind in use wins
   by over 20% doubles the time to the next, up to 16 times, so that trials
   of a kind three times slower soon cost under 1%.  Through
   Python, 4 KiB messages far: 1.19 M msg/s, against 0.67 M plain and 1.21 M
   streaming; in batches 1.75 M against 0.60 M.

   Threads sharing a handle race on these counters: that can only skew a
   trial, never a message. */
#define CP_MIN 1024u                    /* smaller: plain (see above) */
#define CP_EPOCH_BYTES (UINT64_C(1) << 20)
#define CP_EPOCH_MSGS 16u
#define CP_USE_EPOCHS 30u
#define CP_FIRST 3u                     /* the first trial soon; the first epoch is not counted */
#define CP_TRY_EPOCHS 2u
#define CP_BACKOFF_MAX 4u
enum { CP_USE, CP_WARM, CP_TRY };

static void copy_streaming(char *dst, const char *src, size_t n)
{
#if defined(__x86_64__)
    size_t head = (size_t)(-(uintptr_t)dst & 63);
    if (head > n)
        head = n;
    memcpy(dst, src, head);             /* to the first line boundary */
    dst += head;
    src += head;
    n -= head;
    for (; n >= 64; dst += 64, src += 64, n -= 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)src);
        __m128i b = _mm_loadu_si128((const __m128i *)(src + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + 48));
        _mm_stream_si128((__m128i *)dst, a);
        _mm_stream_si128((__m128i *)(dst + 16), b);
        _mm_stream_si128((__m128i *)(dst + 32), c);
        _mm_stream_si128((__m128i *)(dst + 48), d);
    }
    /* Streaming stores are not ordered with later ones: the release store
       that publishes the message must not pass them. */
    _mm_sfence();
#endif
    memcpy(dst, src, n);
}

static void cp_begin(fmap_chanmap *m, uint64_t now)
{
    m->cp.start = now;
    m->cp.left = CP_FIRST;
    m->cp.first = 1;
}

/* An epoch ended at `now`: time it, and move through the trial. */
static void cp_epoch(fmap_chanmap *m, uint64_t now)
{
    uint64_t took = now - m->cp.start, bytes = m->cp.bytes;
    uint32_t msgs = m->cp.msgs;
    m->cp.start = now;
    m->cp.bytes = 0;
    m->cp.msgs = 0;
    /* Not timed: an epoch of no time (or of negative time, ended by two
       threads at once); rates then stay far from overflow (an epoch's bytes
       are under 2^45, times 1000). */
    if (took == 0 || took > INT64_MAX)
        return;
    uint64_t rate = bytes * 1000 / took;
    switch (m->cp.phase) {
    case CP_USE:
        /* One epoch is noisy (a pause of the caller's, a tick): the kind in
           use is judged by a running average.  Not from the first epoch,
           which pays the ring's first page faults and whatever the caller
           did before it sent (a fork, a consumer starting). */
        if (m->cp.first)
            m->cp.first = 0;
        else
            m->cp.avg = m->cp.avg ? (3 * m->cp.avg + rate) / 4 : rate;
        if (m->cp.left > 1) {
            m->cp.left--;
            break;
        }
        m->cp.left = 0;
        m->cp.nt ^= 1;
        m->cp.phase = CP_WARM;
        m->cp.count = 0;
        break;
    case CP_WARM:
        /* Until the consumers read messages copied the new way: while the
           ring is full they are a ring's worth behind. */
        m->cp.count += msgs;
        if (m->cp.count < m->capacity)
            break;
        m->cp.phase = CP_TRY;
        m->cp.count = 0;
        m->cp.tried_bytes = m->cp.tried_ns = 0;
        break;
    case CP_TRY:
        m->cp.tried_bytes += bytes;
        m->cp.tried_ns += took;
        if (++m->cp.count < CP_TRY_EPOCHS)
            break;
        rate = m->cp.tried_bytes * 1000 / m->cp.tried_ns;    /* each epoch took > 0 */
        if (rate > m->cp.avg + m->cp.avg / 20) {
            m->cp.avg = rate;           /* the other kind, 5% faster: keep it */
            m->cp.backoff = 0;
        } else {
            m->cp.nt ^= 1;              /* back to the kind in use */
            if (rate < m->cp.avg - m->cp.avg / 5 && m->cp.backoff < CP_BACKOFF_MAX)
                m->cp.backoff++;        /* which won by over 20%: try again later */
        }
        m->cp.left = CP_USE_EPOCHS << m->cp.backoff;
        m->cp.phase = CP_USE;
        break;
    }
}

void fmap_chan_copy_in(fmap_chanmap *m, char *dst, const void *src, size_t n)
{
    if (n < CP_MIN || m->cp.force == 1) {
        memcpy(dst, src, n);
        return;
    }
    if (m->cp.force == 2) {
        copy_streaming(dst, src, n);
        return;
    }
    if (!m->cp.start)
        cp_begin(m, fmap_clock_ns());
    if (m->cp.nt)
        copy_streaming(dst, src, n);
    else
        memcpy(dst, src, n);
    m->cp.bytes += n;
    if (++m->cp.msgs >= CP_EPOCH_MSGS && m->cp.bytes >= CP_EPOCH_BYTES)
        cp_epoch(m, fmap_clock_ns());
}

void fmap_chan_copy_force(fmap_chanmap *m, int how)
{
    m->cp.force = (uint8_t)how;
}

void fmap_chan_copy_state(fmap_chanmap *m, uint32_t out[4])
{
    out[0] = m->cp.nt;
    out[1] = m->cp.phase;
    out[2] = m->cp.left;
    out[3] = m->cp.backoff;
}

void fmap_chan_copy_epoch(fmap_chanmap *m, uint64_t bytes, uint64_t ns)
{
    if (!m->cp.start)
        cp_begin(m, 1);
    m->cp.start = 1;
    m->cp.bytes = bytes;
    m->cp.msgs = CP_EPOCH_MSGS;
    cp_epoch(m, 1 + ns);
}

/* The holes count above the holes there are: taken off, as settle_totals
   does for sleepers (sighted), when one handle sees it above by the same
   count twice, SETTLE_NS to SETTLE_MAX_NS apart.  A look walks the ring
   from the tail to the head and counts the holes the tail has not passed;
   a slot counts only if the tail, read after its word, is not past it (a
   consumed slot reads as a hole too).  It is void if the count, the tally
   of holes passed or that of make_hole calls finished changed meanwhile,
   and not made on a backlog over HOLE_WALK_MAX slots or a lap.  A handle
   looks after HOLE_MISSES takes that found no hole behind them (real holes
   passed in between do not reset the tally), at most once per SETTLE_NS.
   Wrong only when, at both looks, some process sat between a hole's count
   and its swap, or between a pass and its tally, for the whole of the look
   (stopped or preempted there; not necessarily the same one), or the count
   left the value read and came back before the CAS: the count is then
   low, and may go below zero.  Then takes stop looking for holes behind
   them: len() counts a hole, and a closed channel drained but for holes
   reads as ended, only once a consumer comes to it (every take passes the
   holes it finds first).  Nothing is lost. */
#define HOLE_MISSES 4096u
#define HOLES 2                     /* seen[]: after the two sides' sleeper totals */
#define HOLE_WALK_MAX 65536u        /* slots a look walks at most (about 0.1 ms) */

static void settle_holes(fmap_chanmap *m)
{
    struct fmap_chan *h = m->h;
    uint32_t me = (uint32_t)fmap_getpid();
    __atomic_store_n(&m->hole_misses, 0, __ATOMIC_RELAXED);
    if (__atomic_exchange_n(&m->settling, me, __ATOMIC_ACQUIRE) == me)
        return;             /* another thread of ours is at it */
    uint64_t now = fmap_clock_ns();
    if (now - m->holes_looked >= SETTLE_NS) {
        uint32_t passed = __atomic_load_n(&h->holes_passed, __ATOMIC_SEQ_CST);
        uint32_t made = __atomic_load_n(&h->holes_made, __ATOMIC_SEQ_CST);
        int32_t count = __atomic_load_n(&h->holes, __ATOMIC_SEQ_CST);
        uint64_t tl = C_POS(load64(&h->tail)), hd = C_POS(load64(&h->head));
        int32_t there = 0;
        /* Not on a long backlog (the walk's cost), nor past a lap (a slot
           would be two positions): the excess waits for the ring to drain. */
        int look = count > 0 && hd - tl <= m->capacity && hd - tl <= HOLE_WALK_MAX;
        for (uint64_t p = tl; look && p < hd && there < count; p += 64) {
            uint64_t seen = 0, n = hd - p < 64 ? hd - p : 64;
            for (uint64_t k = 0; k < n; k++)
                if (is_hole(load_word(m, p + k), p + k))
                    seen |= (uint64_t)1 << k;
            /* The tail once per 64 words, after them (it is the consumers'
               busiest line): a slot it has passed may have been consumed. */
            uint64_t now_tl = C_POS(load64(&h->tail));
            for (uint64_t k = 0; k < n; k++)
                if ((seen >> k & 1) && p + k >= now_tl)
                    there++;
        }
        /* Void if a hole was made or passed meanwhile (one passed under
           the walk reads as consumed; one counted before the look and
           swapped under it, as not there yet).  The count itself is read
           last, after the tallies: a pass tallies before its decrement. */
        int valid = look && count > there &&
                    __atomic_load_n(&h->holes_made, __ATOMIC_SEQ_CST) == made &&
                    __atomic_load_n(&h->holes_passed, __ATOMIC_SEQ_CST) == passed &&
                    __atomic_load_n(&h->holes, __ATOMIC_SEQ_CST) == count;
        int32_t drop = (int32_t)sighted(&m->seen[HOLES], valid ? (uint32_t)(count - there) : 0,
                                        (uint32_t)count, now);
        if (drop)
            __atomic_compare_exchange_n(&h->holes, &count, count - drop, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST);
        m->holes_looked = fmap_clock_ns();  /* from the walk's end */
    }
    __atomic_store_n(&m->settling, 0, __ATOMIC_RELEASE);
}

/* Move the consumers' cursor past slots that need no consumer (given back
   unsent, or withheld), as a consumer arriving there would: so len() does
   not count them and a drained, closed channel reads as ended. */
static void skip_holes(fmap_chanmap *m)
{
    struct fmap_chan *h = m->h;
    for (uint32_t tries = 0; tries < RETRIES; tries++) {
        uint64_t cur = load64(&h->tail), tl = C_POS(cur);
        if (!is_hole(load_word(m, tl), tl)) {
            /* The count says there are holes, and takes keep finding none:
               it may count some that a killed process never made. */
            if (tries == 0) {
                /* A tally, not a count: increments lost to a race matter
                   not, and a locked add would cost every take. */
                uint32_t misses = __atomic_load_n(&m->hole_misses, __ATOMIC_RELAXED) + 1;
                __atomic_store_n(&m->hole_misses, misses, __ATOMIC_RELAXED);
                if (misses >= HOLE_MISSES)
                    settle_holes(m);
            }
            return;
        }
        pass_hole(m, cur);
    }
}

void fmap_chan_discard(fmap_chanmap *m, uint64_t pos)
{
    if (make_hole(m, pos, WORD(pos, m->part, S_WRITING), WORD(pos + m->capacity, 0, S_FREE))) {
        skip_holes(m);
        fmap_chan_wake_consumers(m, INT_MAX);   /* the end of the stream may be here */
        fmap_chan_wake_producers(m, 1);
    }
}

void fmap_chan_withhold(fmap_chanmap *m, uint64_t pos)
{
    if (make_hole(m, pos, WORD(pos, m->part, S_WRITING), WORD(pos, m->part, S_READING))) {
        skip_holes(m);
        fmap_chan_wake_consumers(m, INT_MAX);
    }
}

/* Give a slot this process reads back to the producers, FREE for the next
   lap with the given run: 0 when it was no longer ours.  Only we write a
   slot we read, unless taken for dead: a plain store. */
static int give_back(fmap_chanmap *m, uint64_t pos, uint32_t run)
{
    if (load_word(m, pos) != WORD(pos, m->part, S_READING))
        return 0;
    store_word(m, pos, WORD(pos + m->capacity, run, S_FREE));
    return 1;
}

void fmap_chan_release_run(fmap_chanmap *m, uint64_t pos, uint32_t n)
{
    /* Last slot first, as a run: a producer claiming these slots reads one
       word for all of them. */
    for (uint32_t k = n; k-- > 0;)
        if (!give_back(m, pos + k, run_len(n - k)))
            n = k;          /* not ours (taken for dead): the run starts after it */
}

/* A consumer taking messages one at a time asks, as it gives one back, for
   all the lines of the next if that one is published: they travel while the
   caller handles this one, where the copy that reaches them would wait for
   them a few at a time (TAKE_AHEAD asks only for a message's first line).
   Not in channels of messages under NEXT_MIN bytes: reading the next word
   takes its line from the producer about to write it, which costs small
   messages 10% (see try_take).  Up to NEXT_MAX bytes: the cache keeps them
   until the copy.  4 KiB messages, interleaved: with GATE_SLOTS, 1.46
   against 1.37 M msg/s far, 1.58 against 1.55 M close. */
#define NEXT_MIN 1024u
#define NEXT_MAX 16384u

static void prefetch_next(fmap_chanmap *m, uint64_t pos)
{
    uint64_t next = pos + 1;
    if (W_BARE(load_word(m, next)) != WORD(next, 0, S_FULL))
        return;
    uint32_t kind;
    uint64_t len = fmap_chan_length(m, next, &kind);     /* within the slot */
    const char *p = slot_at(m, next);
    for (uint64_t k = 0; k < len && k < NEXT_MAX; k += 64)
        __builtin_prefetch(p + k, 0, 3);
}

int fmap_chan_release(fmap_chanmap *m, uint64_t pos)
{
    if (!give_back(m, pos, 0))
        return -1;
    if (m->msg_size >= NEXT_MIN)
        prefetch_next(m, pos);
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
