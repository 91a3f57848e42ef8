/* fmap platform layer: the one neutral header.
 *
 * Plain C, no Python.h.  Every function returns FMAP_OK (0) or a negative
 * fmap status, and on failure fills an fmap_err with the status, the errno
 * captured at the failing call and the name of that call, so the Cython core
 * can turn it into one exception in one place.  One .c file per OS implements
 * it; the build picks the file.
 */
#ifndef FMAP_H
#define FMAP_H

#include <stddef.h>
#include <stdint.h>

enum fmap_status {
    FMAP_OK = 0,
    FMAP_ESYS = -1,         /* a system call failed: err.sys holds errno */
    FMAP_ENOTFOUND = -2,    /* no live object of that name */
    FMAP_EEXIST = -3,       /* the name exists and exclusive was asked */
    FMAP_EWRONGTYPE = -4,   /* the name is held by an object of another type */
    FMAP_EACCESS = -5,      /* the object exists but cannot be reached by us */
    FMAP_EFULL = -6,        /* the registry has no free entry or holder record */
    FMAP_ECORRUPT = -7,     /* the registry file is not one this version reads */
    FMAP_EUNSAFE = -8,      /* the runtime directory has a wrong owner, mode or type */
    FMAP_ETIMEOUT = -9,     /* the registry lock was not free within its bound */
    FMAP_EADDRINUSE = -10,  /* map at a fixed address: the range is in use */
    FMAP_EGONE = -11,       /* a handle passed between processes no longer exists */
    FMAP_ENOTOWNER = -12,   /* release of a mutex the calling thread does not own */
    FMAP_ELIMIT = -13,      /* semaphore release past its maximum count */
    FMAP_EBADADDR = -14,    /* map at a fixed address outside the user address space */
    FMAP_ECOMMIT = -15      /* not enough memory to commit an object (ERROR_COMMITMENT_LIMIT) */
};

typedef struct {
    int status;             /* enum fmap_status */
    int sys;                /* errno at the failing call, 0 if none */
    const char *call;       /* the call or check that failed, for messages */
} fmap_err;

/* Object types share one namespace (DESIGN.md: one namespace). */
enum fmap_type {
    FMAP_T_MAPPING = 1,
    FMAP_T_MUTEX = 2,
    FMAP_T_SEMAPHORE = 3,
    FMAP_T_EVENT = 4,
    FMAP_T_CHANNEL = 5
};

/* One vocabulary for protection and access. */
enum fmap_access {
    FMAP_A_READ = 1,        /* PAGE_READONLY / FILE_MAP_READ */
    FMAP_A_WRITE = 2,       /* PAGE_READWRITE / FILE_MAP_WRITE */
    FMAP_A_COPY = 3         /* PAGE_WRITECOPY / FILE_MAP_COPY */
};

#define FMAP_F_FILE 1u      /* object flag: backed by a regular file */
#define FMAP_F_COMMITTED 2u /* object flag: paging-file memory allocated at creation */

/* Longest registry key: one namespace byte and up to 255 bytes of UTF-8. */
#define FMAP_KEY_MAX 256

typedef struct {
    uint32_t type;
    uint32_t protect;       /* the object's protection (enum fmap_access) */
    uint32_t flags;         /* FMAP_F_* */
    uint64_t size;          /* exact size, never page-rounded */
    uint64_t dev, ino;      /* identity of the backing inode */
} fmap_objinfo;

/* What create makes when the name is free. */
typedef struct {
    int fd;                 /* >= 0: register this fd (file backed); < 0: make a memfd */
    uint32_t flags;         /* FMAP_F_* of the new object */
    uint64_t size;
    uint32_t protect;
    const char *label;      /* memfd label, for /proc/<pid>/maps */
    /* Called with the new object's fd before its name is published (the
       registry lock is held): lays out the object's initial state, so no
       opener ever sees it half made.  NULL for none. */
    int (*init)(void *ctx, int fd, fmap_err *e);
    void *init_ctx;
} fmap_newobj;

typedef struct fmap_reg fmap_reg;

/* A holder record this process owns in a registry.  Lives in the handle object. */
typedef struct {
    fmap_reg *reg;
    uint32_t entry;         /* entry index */
    uint32_t slot;          /* holder record index */
    uint32_t pending;       /* fork-pending record index + 1, 0 = none */
    uint64_t gen;           /* generation of the entry: which incarnation of the name */
    int fd;                 /* the fd the record names */
} fmap_hold;

/* ---- process --------------------------------------------------------- */
size_t fmap_page_size(void);
int fmap_getpid(void);                    /* cached; reset in a forked child */
/* A process's start time (clock ticks): with its pid, it names one process
   for good.  *dead: gone or a zombie.  0 when it cannot be read. */
uint64_t fmap_proc_start(int pid, int *dead);
/* What /proc/<pid>/stat says (a thread's id works too): 0, or the errno of
   the failed open or read (ENOENT: gone, or hidden from us). */
typedef struct {
    int dead;               /* a zombie, or dead and not yet gone */
    uint64_t start;         /* start time, clock ticks since boot */
    uint64_t start_stack;   /* the stack's start: random, new at every exec
                               (0 when not ours to see: another user, not
                               dumpable) */
} fmap_procstat;
int fmap_proc_stat(int pid, fmap_procstat *st);
uint64_t fmap_self_start(void);           /* ours, cached */

/* ---- objects and views ----------------------------------------------- */
int fmap_memfd_new(const fmap_newobj *spec, int *fd, fmap_err *e);

/* Progress of fmap_memfd_commit, kept by the caller between calls. */
typedef struct {
    uint64_t done;          /* bytes from offset 0 allocated so far */
    uint64_t chunk;         /* bytes per allocation step; 0 = not started */
    uint64_t avail;         /* on FMAP_ECOMMIT: the memory there was room for */
} fmap_commit;

/* Commit a memfd's memory now, as Windows commits a paging-file section at
   creation: call until c->done reaches size; each call allocates one step
   (at most 256 MiB, so the caller can check for signals between steps),
   having checked that what is still unallocated fits in the memory the
   machine and the caller's memory cgroup can give, so that it ends in
   FMAP_ECOMMIT and never in the OOM killer.  Returns FMAP_OK; FMAP_WAIT_INTR
   when a signal stopped the step (check it, call again); FMAP_ECOMMIT; or an
   error.  A failed step is undone by the kernel; closing the memfd frees the
   rest. */
int fmap_memfd_commit(int fd, uint64_t size, fmap_commit *c, fmap_err *e);
/* Check a file fd against protect, grow it to *size if asked (0 = the file's
   size, returned in *size). */
int fmap_file_prepare(int fd, uint32_t protect, uint64_t *size, fmap_err *e);
/* Open a path for a file-backed mapping: read-write for protect "rw" (creating
   a missing file), read-only otherwise. */
int fmap_file_open(const char *path, uint32_t protect, int create, int *fd, int *created, fmap_err *e);
int fmap_fd_info(int fd, fmap_objinfo *info, fmap_err *e);
int fmap_fd_access(int fd, int *writable, fmap_err *e);
int fmap_dup(int fd, int *out, fmap_err *e);
void fmap_close_fd(int fd);
/* Reach another process's fd through /proc and check that it is the object
   (dev, ino); used to pass unnamed objects between processes. */
int fmap_reach(int pid, int fd, int writable, uint64_t dev, uint64_t ino, int *out, fmap_err *e);

int fmap_view_map(int fd, uint64_t offset, size_t length, uint32_t access,
                  int populate, void *fixed, void **out, fmap_err *e);
/* Replace a view with a private zero-filled placeholder of the same size, so
   stale pointers read zeros and write nowhere (DESIGN.md: views). */
int fmap_view_retire(void *addr, size_t length, fmap_err *e);
int fmap_view_unmap(void *addr, size_t length, fmap_err *e);
int fmap_view_flush(void *addr, size_t length, int wait, fmap_err *e);

/* ---- the registry of names ------------------------------------------- */
/* Attach (creating if needed) the registry in dir; one per dir per process. */
int fmap_reg_attach(const char *dir, int create_dir, fmap_reg **out, fmap_err *e);

/* Create-or-open, atomic per name.  When a live object of that name exists,
   open it through one of its holders (writable when asked and the object
   allows it), register the caller, *created = 0; else make spec's object
   (memfd or the given fd), register it, *created = 1.  exclusive turns the
   first case into FMAP_EEXIST.  *fd receives the caller's fd (spec->fd itself
   when created from a file). */
int fmap_reg_create(fmap_reg *r, const char *key, size_t keylen, uint32_t type,
                    const fmap_newobj *spec, int exclusive, int writable,
                    int *fd, fmap_objinfo *info, fmap_hold *hold, int *created,
                    fmap_err *e);
int fmap_reg_open(fmap_reg *r, const char *key, size_t keylen, uint32_t type,
                  int writable, int *fd, fmap_objinfo *info, fmap_hold *hold,
                  fmap_err *e);
/* Register the caller as a holder of an object it already has an fd for
   (reached by fmap_reach), if the name still names that object. */
int fmap_reg_adopt(fmap_reg *r, const char *key, size_t keylen, uint32_t type,
                   int fd, const fmap_objinfo *info, fmap_hold *hold, fmap_err *e);
/* Remove the caller's holder record; the name goes with the last one.  Waits
   (bounded) for children forked with this hold to claim their records. */
int fmap_reg_release(fmap_hold *hold, fmap_err *e);

/* fork(): before, add a pending record for the child; in the child, claim it. */
int fmap_reg_fork_prepare(fmap_hold *hold, fmap_err *e);
void fmap_reg_fork_parent(fmap_hold *hold, int child);
int fmap_newest_child(void);
int fmap_reg_fork_child(fmap_hold *hold, fmap_err *e);

/* Diagnostics: visit every live name (dead holders pruned first). */
typedef int (*fmap_reg_visit)(void *ctx, const char *key, size_t keylen,
                              const fmap_objinfo *info, uint32_t nholders);
int fmap_reg_list(fmap_reg *r, fmap_reg_visit visit, void *ctx, fmap_err *e);
/* Test support: counts of live entries and holder records. */
int fmap_reg_counts(fmap_reg *r, uint32_t *entries, uint32_t *holders, fmap_err *e);

/* ---- synchronization objects (sync_linux.c) ------------------------- */
/* A Mutex, Semaphore or Event is one page of a memfd, registered under its
   type like a mapping and laid out by fmap_sync_init before its name is
   published: a header (magic, version, type, sizes) and the state.  Each
   handle maps the page once and keeps it mapped while it is open.

   Waits take an absolute CLOCK_MONOTONIC deadline in ns (fmap_clock_ns) and
   return FMAP_OK when the object was acquired (signalled), or one of: */
enum fmap_wait {
    FMAP_WAIT_TIMEOUT = 1,  /* the deadline passed, or a try found it busy */
    FMAP_WAIT_INTR = 2      /* a signal arrived: check it, then wait again */
};

#define FMAP_SYNC_OWNED 1u     /* mutex: the creating thread owns it */
#define FMAP_SYNC_MANUAL 2u    /* event: manual reset */
#define FMAP_WAIT_MAX 64       /* objects in one wait_any (MAXIMUM_WAIT_OBJECTS) */

typedef struct fmap_sync fmap_sync;   /* a handle: our mapping of the shared page, and the
                                         type, flags and maximum read when it was opened */

/* What create makes; fmap_sync_init's context. */
typedef struct {
    uint32_t type;          /* FMAP_T_MUTEX, FMAP_T_SEMAPHORE or FMAP_T_EVENT */
    uint32_t flags;         /* FMAP_SYNC_* */
    uint32_t initial;       /* semaphore: count; event: 1 = set */
    uint32_t maximum;       /* semaphore: maximum count */
    fmap_sync *page;        /* out: the new object's page, mapped (the handle keeps it) */
} fmap_syncspec;

/* A snapshot of an object's state, for repr and properties. */
typedef struct {
    uint32_t type;
    uint32_t count, maximum;    /* semaphore */
    uint32_t set, manual;       /* event */
    int32_t owner;              /* mutex: the owning thread's id, 0 = none */
    uint32_t depth;             /* mutex: recursion depth while owned */
    int mine;                   /* mutex: owned by the calling thread */
    int abandoned;              /* mutex: its owner died; the next acquirer is told */
} fmap_syncstate;

size_t fmap_sync_size(void);              /* the memfd size of one object */
uint64_t fmap_clock_ns(void);             /* CLOCK_MONOTONIC, ns */
/* fmap_newobj.init for sync objects (ctx: fmap_syncspec); also for unnamed ones. */
int fmap_sync_init(void *ctx, int fd, fmap_err *e);
/* Map an existing object's page and check its header against type. */
int fmap_sync_map(int fd, uint32_t type, fmap_sync **out, fmap_err *e);
/* A closing handle's page, unmapped (an owned mutex stays owned). */
void fmap_sync_unmap(fmap_sync *s);
/* A page from a create that failed after init: released by us, unmapped. */
void fmap_sync_discard(fmap_sync *s);
void fmap_sync_state(fmap_sync *s, fmap_syncstate *st);

/* One object's part in one wait, from its first try to its end, kept by the
   caller (across the slices in which it lets signals in).  Events need it:
   on Windows, SetEvent itself releases the threads waiting at that moment,
   so a reset() or a second set() right after cannot undo or merge it.
   fmap_wait_begin opens it before the first try; fmap_wait_end closes it
   when the wait is over, or abandoned (an exception between slices). */
typedef struct {
    uint32_t mark;          /* manual-reset event: its state when the wait began */
    int32_t slot;           /* auto-reset event: our wait slot in its page, -1 = none */
    uint32_t counted;       /* wait_any: counted among the object's sleepers (seq_waiters) */
} fmap_waiter;

void fmap_wait_begin(fmap_sync *s, fmap_waiter *w);
/* 1 when a set() had released this waiter into its slot: kept (the wait
   succeeded after all) when keep, else passed on to the next waiter. */
int fmap_wait_end(fmap_sync *s, fmap_waiter *w, int keep);

/* Acquire (mutex, semaphore) or wait for (event) one object.  *depth: the
   mutex's recursion depth after acquiring (1 = this call made the caller the
   owner); *abandoned: the owner died holding it (WAIT_ABANDONED).
   Nothing tells a mutex's waiters that its owner died: they ask whether it
   is gone (a few µs), where `ask` says: a try that is the whole wait must,
   one followed by a wait need not. */
int fmap_sync_trywait(fmap_sync *s, fmap_waiter *w, int ask, int *depth, int *abandoned,
                      fmap_err *e);
/* Spin up to spin_ns trying, then sleep until deadline.  A mutex's waiter
   asks after the owner when it goes to sleep if `ask`, and every ask_ns
   while asleep. */
int fmap_sync_wait(fmap_sync *s, fmap_waiter *w, uint64_t spin_ns, uint64_t deadline, int ask,
                   uint64_t ask_ns, int *depth, int *abandoned, fmap_err *e);
/* The object that released this wait first, else the first of n (in order)
   that can be acquired: *index.  Sleeps on every object's change counter or
   wait slot (futex_waitv) until deadline; asks after owners (as trywait) on
   its first try when `ask`.  w: one per object. */
int fmap_sync_try_any(fmap_sync *const *v, fmap_waiter *w, int n, int ask, int *index,
                      int *depth, int *abandoned, fmap_err *e);
int fmap_sync_wait_any(fmap_sync *const *v, fmap_waiter *w, int n, uint64_t spin_ns,
                       uint64_t deadline, int ask, int *index, int *depth, int *abandoned,
                       fmap_err *e);

int fmap_mutex_release(fmap_sync *s, fmap_err *e);           /* FMAP_ENOTOWNER */
int fmap_sem_release(fmap_sync *s, uint32_t n, uint32_t *prev, fmap_err *e);   /* FMAP_ELIMIT */
void fmap_event_set(fmap_sync *s);
void fmap_event_reset(fmap_sync *s);

/* ---- channels (channel_linux.c) -------------------------------------- */
/* A Channel is a memfd registered under FMAP_T_CHANNEL: a header (magic,
   version, sizes, cursors, futex words, participant records) and a ring of
   `capacity` slots, each carrying one message of up to `msg_size` bytes.
   Producers and consumers claim runs of slots with one compare-and-swap on
   a cursor, then name themselves in each slot's state word, so a process
   that dies holding a slot is found and its slot given back (see
   channel_linux.c). */
#define FMAP_CHAN_PARTS 1024        /* handles open at once, in all processes */
#define FMAP_CHAN_MAX_CAPACITY (1u << 24)
#define FMAP_CHAN_CLOSED 3          /* wait result: closed (send), closed and drained (receive) */
/* Each slot holds msg_size bytes and this much more: room for the
   description of an array (dtype, shape) in front of msg_size bytes of its
   data, so a channel made for N-byte frames carries N-byte arrays. */
#define FMAP_CHAN_ROOM 320

typedef struct fmap_chan fmap_chan;   /* the shared header */

typedef struct {
    uint64_t capacity;      /* slots, a power of two */
    uint64_t msg_size;      /* largest message, bytes */
} fmap_chanspec;

/* A shared count seen above what is there (channel_linux.c: sighted). */
typedef struct {
    uint32_t excess;        /* by how much */
    uint32_t count;         /* over which value of the count (0 where any will do) */
    uint64_t at;            /* when, 0 for none */
} fmap_sighting;

/* One process's view of a channel; lives in the core's ChanMap object. */
typedef struct {
    fmap_chan *h;           /* owned: the whole object, mapped */
    char *meta;             /* the slots' metadata (state words, lengths) */
    char *slots;            /* first slot's message */
    size_t maplen;
    uint64_t capacity, mask, msg_size, stride;
    uint32_t part;          /* our participant record */
    int pid;                /* the process that holds `part` (a forked child rejoins) */
    uint64_t id;            /* this map's number in this process, never reused */
    uint64_t spin_cur;      /* adaptive spin budget, ns */
    uint64_t spin_since;    /* when spin_cur was last raised or decayed (fmap_clock_ns) */
    uint32_t wake_misses;   /* wakes in a row that found nobody asleep */
    uint32_t reaping;       /* the pid whose reap_sleepers call is running, or 0 (a
                               forked child's copy names the parent: not the child's) */
    fmap_sighting seen[3];  /* this handle's first sightings of a shared count above
                               what is there: the sleeper totals of each side
                               (settle_totals), then the holes count (settle_holes) */
    uint32_t hole_misses;   /* looks for holes after a take that found none (settle_holes) */
    uint32_t settling;      /* the pid whose settle_holes call is running, or 0 (as reaping) */
    uint64_t holes_looked;  /* when this handle last looked (one look per SETTLE_NS) */
    uint64_t stuck[2];      /* per side (producers, consumers): since when this handle's
                               claims have found nothing, across calls; 0 after one succeeds */
    uint64_t checked[2];    /* per side: when this handle last looked for a dead claimer */
    struct {                /* fmap_chan_copy_in's choice of stores (channel_linux.c) */
        uint64_t start;     /* when this epoch began (fmap_clock_ns), 0 before the first */
        uint64_t bytes;     /* copied so far in this epoch */
        uint64_t avg;       /* the kind in use: its epochs' running average, bytes/us */
        uint64_t tried_bytes, tried_ns;     /* the trial of the other kind */
        uint32_t msgs;      /* copied so far in this epoch */
        uint32_t left;      /* epochs until the next trial of the other kind */
        uint32_t count;     /* messages settling, then epochs timed, in a trial */
        uint8_t nt;         /* streaming stores in use */
        uint8_t phase;      /* CP_USE, CP_WARM, CP_TRY */
        uint8_t backoff;    /* trials in a row that the kind in use won by far */
        uint8_t force;      /* test hook: 0 choose, 1 plain, 2 streaming */
        uint8_t first;      /* the first epoch, not counted */
    } cp;
} fmap_chanmap;

typedef struct {
    uint64_t head, tail;    /* positions: messages claimed by producers, by consumers */
    uint32_t closed;
    uint32_t parts;         /* processes attached (records of live processes) */
    uint32_t consumers_sleeping, producers_sleeping;
} fmap_chanstate;

/* The object's size; 0 when capacity or msg_size is out of range. */
uint64_t fmap_chan_size(uint64_t capacity, uint64_t msg_size);
/* fmap_newobj.init for channels (ctx: fmap_chanspec). */
int fmap_chan_init(void *ctx, int fd, fmap_err *e);
/* Map a channel, check its header, take a participant record. */
int fmap_chan_map(int fd, fmap_chanmap *m, fmap_err *e);
/* Give the record back and unmap. */
void fmap_chan_unmap(fmap_chanmap *m);
/* A snapshot; `parts` counts live processes (a /proc read for each other one). */
void fmap_chan_state(fmap_chanmap *m, fmap_chanstate *st);
uint64_t fmap_chan_pending(fmap_chanmap *m);   /* claimed by producers, not yet by consumers */
int fmap_chan_ended(fmap_chanmap *m);          /* closed: the end of the stream */

/* Claim a slot to write (producer) or a message to read (consumer).
   spin_max: ns of adaptive spinning before sleeping; deadline: absolute
   CLOCK_MONOTONIC ns (0 = try once).  FMAP_OK, FMAP_WAIT_TIMEOUT,
   FMAP_WAIT_INTR, FMAP_CHAN_CLOSED, or an error.  n: how many consecutive
   slots or messages to claim at most; *got: how many were. */
int fmap_chan_reserve(fmap_chanmap *m, uint32_t n, uint64_t spin_max, uint64_t deadline,
                      uint64_t *pos, uint32_t *got, fmap_err *e);
int fmap_chan_take(fmap_chanmap *m, uint32_t n, uint64_t spin_max, uint64_t deadline,
                   uint64_t *pos, uint32_t *got, fmap_err *e);
/* A slot's payload, and its message's length and kind (consumer side). */
char *fmap_chan_payload(fmap_chanmap *m, uint64_t pos);
uint64_t fmap_chan_length(fmap_chanmap *m, uint64_t pos, uint32_t *kind);
/* Publish a reserved slot's message of len bytes (and kind). */
void fmap_chan_commit(fmap_chanmap *m, uint64_t pos, uint64_t len, uint32_t kind);
/* A batch: set each slot's length and kind, then publish pos..pos+n-1 at once. */
void fmap_chan_set_length(fmap_chanmap *m, uint64_t pos, uint64_t len, uint32_t kind);
void fmap_chan_publish(fmap_chanmap *m, uint64_t pos, uint32_t n);
/* Copy n bytes of a message into its slot at dst, with whichever kind of
   stores has been the faster on this handle (see channel_linux.c); before
   the message is committed or published. */
void fmap_chan_copy_in(fmap_chanmap *m, char *dst, const void *src, size_t n);
/* Test hooks for that choice: fix it (how: 0 choose, 1 plain stores, 2
   streaming); read it (nt, phase, epochs left, backoff); end an epoch as if
   `bytes` had been copied in `ns` nanoseconds. */
void fmap_chan_copy_force(fmap_chanmap *m, int how);
void fmap_chan_copy_state(fmap_chanmap *m, uint32_t out[4]);
void fmap_chan_copy_epoch(fmap_chanmap *m, uint64_t bytes, uint64_t ns);
void fmap_chan_wake_consumers(fmap_chanmap *m, uint32_t n);
/* Give a reserved slot back unsent (consumers skip it). */
void fmap_chan_discard(fmap_chanmap *m, uint64_t pos);
/* Drop a reserved slot unsent but keep it from producers (something may
   still write into it): consumers skip it as if it had been taken, and
   fmap_chan_release() gives it back. */
void fmap_chan_withhold(fmap_chanmap *m, uint64_t pos);
/* Give a read slot back to the producers.  0, or -1 when the slot was no
   longer ours (this process was taken for dead: never, while it lives). */
int fmap_chan_release(fmap_chanmap *m, uint64_t pos);
/* Give back read slots pos..pos+n-1 at once (a producer then claims them
   reading one word). */
void fmap_chan_release_run(fmap_chanmap *m, uint64_t pos, uint32_t n);
void fmap_chan_wake_producers(fmap_chanmap *m, uint32_t n);
/* End of stream: senders fail from now on, receivers drain and then fail. */
void fmap_chan_close(fmap_chanmap *m);
/* Test hook: claim (producer or consumer) without naming the claimer in the
   slots, as a claimer killed between the cursor's swap and the names leaves
   the ring.  Only for tests that then kill the caller. */
int fmap_chan_claim_unnamed(fmap_chanmap *m, int producer, uint32_t n, uint64_t *pos,
                            uint32_t *got, fmap_err *e);
/* Test hook: name at most k slots of the newest claim on one side still
   unnamed, as a process killed part-way through doing so leaves them. */
int fmap_chan_name_partly(fmap_chanmap *m, int producer, uint32_t k, fmap_err *e);
/* Test hook: send an empty message while, between the producer's read of
   `closed` and its claim, another process closes the channel and a consumer
   looks for the end (*saw_end: it found it).  FMAP_CHAN_CLOSED when the
   send failed; FMAP_OK when it went out, as send would (after an end seen,
   a message no consumer takes); negative when the ring was full. */
int fmap_chan_send_racing_close(fmap_chanmap *m, int *saw_end, fmap_err *e);

#endif
