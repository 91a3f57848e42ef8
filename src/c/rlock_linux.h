/* A robust lock in shared memory, of our own: the Mutex's and the registry's.
 * Private to the Linux platform files (fmap.h stays neutral).
 *
 * It replaces a robust pthread mutex, for what that mutex keeps in the shared
 * memory: glibc links the robust mutexes a thread owns into a list through the
 * mutexes themselves, and follows those links on unlock.  Any process that
 * can write the memory could forge them and so write anywhere in the owner's
 * address space.  This lock keeps nothing in shared memory but one word, and
 * nothing it reads there is ever used as an address, index or length.
 *
 * The word is 64 bits, 8-byte aligned, zero when free:
 *   low 32 bits:  the owner's thread id | RLOCK_WAITERS (the futex word)
 *   high 32 bits: 16 bits of the owner thread's start time, and 16 of where
 *                 its process's stack starts (random, new at every exec),
 *                 from /proc/<tid>/stat; 0 for what could not be read
 * and an owner is one CAS, so the two halves always name the same thread.
 * With no robust list, the kernel tells nobody that an owner died: a taker
 * finds out itself, by asking whether the owner's thread still exists and is
 * not a zombie, a newer thread with a reused id, or its process after an
 * exec, when it tries and now and then while it sleeps; it then takes
 * the lock over with one CAS from that exact word, so only one taker gets it.
 * Where the answer is unclear (no /proc, hidepid, an owner of another user
 * or not dumpable), the owner is taken to be alive: a dead one then keeps
 * the lock until its id is gone or its zombie reaped, never a live one loses
 * it.  An exec may go unnoticed the same way with address randomization off
 * (setarch -R), and 1 time in 65536 with it on.
 *
 * Thread ids and start times are read in one pid and time namespace:
 * processes sharing a lock must see each other's (as they must already, for
 * the registry to find a name's holders).
 */
#ifndef FMAP_RLOCK_LINUX_H
#define FMAP_RLOCK_LINUX_H

#include <stdint.h>

typedef struct {
    uint64_t word;
} fmap_rlock;

#define RLOCK_WAITERS 0x80000000u
#define RLOCK_TID_MASK 0x3fffffffu      /* the kernel's FUTEX_TID_MASK */

enum {
    RLOCK_OK = 0,           /* taken */
    RLOCK_ABANDONED,        /* taken from an owner that is gone */
    RLOCK_MINE,             /* the calling thread owns it already (not taken again) */
    RLOCK_BUSY,             /* another live thread owns it (try) */
    RLOCK_TIMEOUT,          /* the deadline passed */
    RLOCK_INTR,             /* a signal interrupted the sleep */
    RLOCK_ERROR             /* the futex call failed: errno */
};

/* Take the lock; deadline is an absolute CLOCK_MONOTONIC time in ns, or 0 to
   try once without sleeping (then RLOCK_BUSY instead of a wait).  ask: look
   at once whether a busy lock's owner is gone (a few µs); a sleeping taker
   looks again every poll_ns (0: not before the deadline). */
int fmap_rlock_take(fmap_rlock *l, uint64_t deadline, int ask, uint64_t poll_ns);
/* Give it back; -1 (and nothing done) when the caller does not own it. */
int fmap_rlock_give(fmap_rlock *l);
/* Make the calling thread its owner, for a lock no one else can see yet. */
void fmap_rlock_init_owned(fmap_rlock *l);
/* Does the calling thread own it? */
int fmap_rlock_mine(const fmap_rlock *l);
/* Its owner's thread id, 0 when free.  Unless gone is NULL, *gone is set
   when that owner no longer exists (the lock is then abandoned, for the next
   taker to take over): a few µs. */
int fmap_rlock_owner(const fmap_rlock *l, int *gone);
/* The calling thread's identity, as an owner word names it: for other
   records of who is doing what in shared memory (an event's wait slots). */
uint64_t fmap_rlock_self(void);
/* Is the thread that identity names clearly gone (as for an owner)?  Never
   for 0 or the caller.  A kill(2) and a /proc read, a few µs. */
int fmap_rlock_gone(uint64_t who);
/* The calling thread's id (cached; right in a forked child too). */
int fmap_tid(void);

#endif
