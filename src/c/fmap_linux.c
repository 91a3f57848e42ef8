/* fmap platform layer for Linux.
 *
 * Memory is a memfd: the kernel frees it when the last fd and the last mapping
 * are gone, in every process, crash or not.  Linux has no kernel object that is
 * named *and* freed at the last close, so names live in a per-user registry: one
 * shared file in a 0700 directory, mapped by every process of the user, holding
 *
 *   - a hash index of names (derived),
 *   - entries: name, type, protection, size, the identity (dev, ino) of the
 *     object's inode, and the head of its holder chain (derived),
 *   - holder records: (pid, start time, fd) of every process holding a handle.
 *
 * One robust lock of our own (rlock_linux.h) guards it.  A process killed
 * while holding it makes the next locker rebuild everything derived from the
 * entries and holder records, whose `state` words are always written last.
 * Opening a name opens /proc/<pid>/fd/<fd> of a live holder and checks the
 * inode, pruning dead holders on the way; a name with no live holder is free.
 * So create and open cost a few memory operations plus the object's own
 * system calls.
 */
#define _GNU_SOURCE
#include "fmap.h"
#include "rlock_linux.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 0x0001U
#define MFD_ALLOW_SEALING 0x0002U
#endif
#ifndef F_ADD_SEALS
#define F_ADD_SEALS 1033
#define F_SEAL_SEAL 0x0001
#define F_SEAL_SHRINK 0x0002
#define F_SEAL_GROW 0x0004
#endif
#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010
#endif
/* The top of the user address space with 4-level paging (x86_64 TASK_SIZE). */
#define USER_TOP (((uintptr_t)1 << 47) - 4096)

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif

/* ---- errors ---------------------------------------------------------- */

static int fail(fmap_err *e, int status, int sys, const char *call)
{
    e->status = status;
    e->sys = sys;
    e->call = call;
    return status;
}

static int sys_fail(fmap_err *e, const char *call)
{
    return fail(e, FMAP_ESYS, errno, call);
}

/* ---- process ----------------------------------------------------------- */

static volatile int g_pid;           /* cached getpid(); 0 = unknown */
static volatile uint64_t g_start;    /* our start time in clock ticks; 0 = unknown */
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void after_fork_child(void)
{
    g_pid = 0;
    g_start = 0;
}

static void process_init(void)
{
    pthread_atfork(NULL, NULL, after_fork_child);
}

size_t fmap_page_size(void)
{
    static size_t page;
    if (!page)
        page = (size_t)sysconf(_SC_PAGESIZE);
    return page;
}

int fmap_getpid(void)
{
    int pid = g_pid;
    if (!pid) {
        pthread_once(&g_once, process_init);
        pid = (int)getpid();
        g_pid = pid;
    }
    return pid;
}

int fmap_proc_stat(int pid, fmap_procstat *st)
{
    char buf[1024], path[32];
    memset(st, 0, sizeof *st);
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    int err = n < 0 ? errno : n == 0 ? ESRCH : 0;
    close(fd);
    if (err)
        return err;
    buf[n] = 0;
    char *p = strrchr(buf, ')');    /* the command name may hold anything but this last ')' */
    if (!p || p[1] != ' ')
        return EINVAL;
    /* field 3, the state: a zombie holds nothing any more */
    st->dead = p[2] == 'Z' || p[2] == 'X' || p[2] == 'x';
    /* after ") " come fields 3..: field 22 is the start time, 28 the stack's start */
    int field = 2;
    for (p++; *p; p++) {
        if (*p != ' ')
            continue;
        field++;
        if (field == 22)
            st->start = strtoull(p + 1, NULL, 10);
        else if (field == 28) {
            st->start_stack = strtoull(p + 1, NULL, 10);
            break;
        }
    }
    return 0;
}

/* Field 22 of /proc/<pid>/stat, the process's start time in clock ticks: with
   the pid it names one process for good (pids are reused, start times not).
   *dead is set when the process is gone or a zombie.  Returns 0 when it
   cannot be read (gone, or not ours to read: then *dead stays 0). */
uint64_t fmap_proc_start(int pid, int *dead)
{
    fmap_procstat st;
    int err = fmap_proc_stat(pid, &st);
    *dead = err ? err == ENOENT || err == ESRCH : st.dead;
    return st.start;
}

/* Our own start time, recorded with each holder and channel participant. */
static uint64_t start_time(void)
{
    uint64_t st = g_start;
    int dead;
    if (st)
        return st;
    st = fmap_proc_start(fmap_getpid(), &dead);
    g_start = st;
    return st;
}

uint64_t fmap_self_start(void)
{
    return start_time();
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- objects ----------------------------------------------------------- */

void fmap_close_fd(int fd)
{
    if (fd >= 0)
        close(fd);
}

int fmap_memfd_new(const fmap_newobj *spec, int *out, fmap_err *e)
{
    int fd = (int)syscall(SYS_memfd_create, spec->label ? spec->label : "fmap",
                          MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        return sys_fail(e, "memfd_create");
    if (ftruncate(fd, (off_t)spec->size) != 0) {
        sys_fail(e, "ftruncate");
        close(fd);
        return e->status;
    }
    /* Fixed size: nobody, not even a same-user process reaching the fd through
       /proc, can shrink the memory under another process's view (SIGBUS). */
    int seals = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL;
    if (spec->protect != FMAP_A_WRITE) {
        /* PAGE_READONLY / PAGE_WRITECOPY: the shared object is never written. */
        if (fcntl(fd, F_ADD_SEALS, seals | F_SEAL_FUTURE_WRITE) == 0) {
            *out = fd;
            return FMAP_OK;
        }
        if (errno != EINVAL) {   /* EINVAL: a kernel before 5.1 */
            sys_fail(e, "fcntl(F_ADD_SEALS)");
            close(fd);
            return e->status;
        }
    }
    if (fcntl(fd, F_ADD_SEALS, seals) != 0) {
        sys_fail(e, "fcntl(F_ADD_SEALS)");
        close(fd);
        return e->status;
    }
    *out = fd;
    return FMAP_OK;
}

/* ---- committing memory -------------------------------------------------- */

/* A memfd lives on the kernel's internal tmpfs mount, which has no size limit:
   /dev/shm's size does not apply, and filling it with fallocate past what the
   machine has would summon the OOM killer (vm.overcommit_memory 0 and 1) or
   fail per page (2).  So fmap checks before each step.  Windows' test is the
   commit limit, RAM plus paging file; Linux's nearest is the memory that can
   still be had, MemAvailable plus free swap, within the memory cgroup. */
#define COMMIT_STEP_MAX ((uint64_t)256 << 20)
#define COMMIT_STEP_MIN ((uint64_t)1 << 20)

/* Read a small text file whole; its length, -1 on failure. */
static ssize_t read_text(const char *path, char *buf, size_t n)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    size_t len = 0;
    while (len < n - 1) {
        ssize_t k = read(fd, buf + len, n - 1 - len);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            break;
        len += (size_t)k;
    }
    close(fd);
    buf[len] = 0;
    return (ssize_t)len;
}

/* The number after `key` at the start of a line of buf (a "key value" or
   "key: value kB" file); -1 if absent.  "max" reads as INT64_MAX. */
static int64_t text_field(const char *buf, const char *key)
{
    size_t kl = strlen(key);
    const char *p = buf;
    while (*p) {
        if (strncmp(p, key, kl) == 0 && (p[kl] == ' ' || p[kl] == ':' || p[kl] == '\t')) {
            p += kl;
            while (*p == ' ' || *p == '\t' || *p == ':')
                p++;
            return strncmp(p, "max", 3) == 0 ? INT64_MAX : (int64_t)strtoll(p, NULL, 10);
        }
        const char *nl = strchr(p, '\n');
        if (!nl)
            break;
        p = nl + 1;
    }
    return -1;
}

/* One file's number (memory.max, memory.current...); -1 if unreadable. */
static int64_t file_number(const char *dir, const char *name)
{
    char path[4200], buf[64];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (read_text(path, buf, sizeof buf) <= 0)
        return -1;
    if (strncmp(buf, "max", 3) == 0)
        return INT64_MAX;
    return (int64_t)strtoll(buf, NULL, 10);
}

/* Is word one of the comma-separated items of list? */
static int in_list(const char *list, const char *word)
{
    size_t wl = strlen(word);
    for (const char *p = list; p; p = strchr(p, ','), p = p ? p + 1 : NULL)
        if (strncmp(p, word, wl) == 0 && (p[wl] == ',' || p[wl] == 0))
            return 1;
    return 0;
}

static uint64_t room_under(int64_t limit, int64_t usage, int64_t reclaimable)
{
    if (limit < 0 || usage < 0 || limit >= INT64_MAX / 2)
        return UINT64_MAX;           /* no limit, or none we can read */
    int64_t room = limit - usage + (reclaimable > 0 ? reclaimable : 0);
    return room > 0 ? (uint64_t)room : 0;
}

/* The room left in the caller's memory cgroup and its ancestors, counting
   inactive page cache as reclaimable; UINT64_MAX when unlimited. */
static uint64_t cgroup_room(void)
{
    char cg[4096], dir[4200], stat[8192];
    uint64_t room = UINT64_MAX;
    if (read_text("/proc/self/cgroup", cg, sizeof cg) <= 0)
        return room;
    for (char *line = cg; line && *line;) {
        char *next = strchr(line, '\n');
        if (next)
            *next++ = 0;
        char *c1 = strchr(line, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
        if (c2) {
            *c2 = 0;
            const char *ctrl = c1 + 1, *path = c2 + 1;
            if (*ctrl == 0 && line[0] == '0') {
                /* cgroup v2: every ancestor's memory.max binds; the root has none. */
                char p[4096];
                snprintf(p, sizeof p, "%s", path);
                for (;;) {
                    snprintf(dir, sizeof dir, "/sys/fs/cgroup%s", strcmp(p, "/") ? p : "");
                    int64_t lim = file_number(dir, "memory.max");
                    if (lim >= 0) {
                        int64_t use = file_number(dir, "memory.current"), rec = -1;
                        size_t dl = strlen(dir);
                        snprintf(dir + dl, sizeof dir - dl, "/memory.stat");
                        if (read_text(dir, stat, sizeof stat) > 0)
                            rec = text_field(stat, "inactive_file");
                        uint64_t r = room_under(lim, use, rec);
                        room = r < room ? r : room;
                    }
                    char *slash = strrchr(p, '/');
                    if (!slash || strcmp(p, "/") == 0)
                        break;
                    slash[slash == p] = 0;    /* "/a/b" -> "/a" -> "/" */
                }
            } else if (in_list(ctrl, "memory")) {
                /* cgroup v1: memory.stat has the limit of the whole hierarchy. */
                snprintf(dir, sizeof dir, "/sys/fs/cgroup/memory%s", strcmp(path, "/") ? path : "");
                int64_t use = file_number(dir, "memory.usage_in_bytes");
                size_t dl = strlen(dir);
                snprintf(dir + dl, sizeof dir - dl, "/memory.stat");
                if (use >= 0 && read_text(dir, stat, sizeof stat) > 0) {
                    uint64_t r = room_under(text_field(stat, "hierarchical_memory_limit"), use,
                                            text_field(stat, "total_inactive_file"));
                    room = r < room ? r : room;
                }
            }
        }
        line = next;
    }
    return room;
}

/* Memory that can still be had, in bytes, less a reserve of 1/64 of RAM so
   that committing never takes a machine to the last page. */
static uint64_t memory_available(void)
{
    char buf[8192];
    uint64_t avail = UINT64_MAX;
    if (read_text("/proc/meminfo", buf, sizeof buf) > 0) {
        int64_t a = text_field(buf, "MemAvailable"), sw = text_field(buf, "SwapFree");
        int64_t total = text_field(buf, "MemTotal");
        if (a >= 0 && total > 0) {
            uint64_t kb = (uint64_t)a + (sw > 0 ? (uint64_t)sw : 0), reserve = (uint64_t)total / 64;
            avail = (kb > reserve ? kb - reserve : 0) * 1024;
        }
    }
    uint64_t cg = cgroup_room();
    return cg < avail ? cg : avail;
}

int fmap_memfd_commit(int fd, uint64_t size, fmap_commit *c, fmap_err *e)
{
    uint64_t page = fmap_page_size();
    uint64_t total = (size + page - 1) / page * page;
    if (c->chunk == 0)
        c->chunk = COMMIT_STEP_MAX;
    if (c->done >= size)
        return FMAP_OK;
    /* What is still unallocated must fit: checked before every step, as other
       processes take memory while we fill ours (under a MiB left, as small as
       any other allocation, it is not worth the 50 us). */
    struct stat st;
    if (fstat(fd, &st) != 0)
        return sys_fail(e, "fstat");
    uint64_t have = (uint64_t)st.st_blocks * 512;
    uint64_t need = total > have ? total - have : 0;
    uint64_t avail = need < COMMIT_STEP_MIN ? need : memory_available();
    if (need > avail) {
        c->avail = avail;
        return fail(e, FMAP_ECOMMIT, ENOMEM, "commit");
    }
    uint64_t len = size - c->done < c->chunk ? size - c->done : c->chunk;
    if (fallocate(fd, 0, (off_t)c->done, (off_t)len) != 0) {
        if (errno == EINTR) {
            /* Kernels before 2024 stop a tmpfs fallocate at any signal, and
               undo the step: halve it, or signals coming faster than a step
               takes would stop all progress (later ones stop only when the
               process is killed). */
            if (c->chunk > COMMIT_STEP_MIN)
                c->chunk /= 2;
            return FMAP_WAIT_INTR;
        }
        if (errno == ENOSPC || errno == ENOMEM) {   /* overcommit 2, or a cgroup */
            c->avail = memory_available();
            return fail(e, FMAP_ECOMMIT, errno, "fallocate");
        }
        return sys_fail(e, "fallocate");
    }
    c->done += len;
    return FMAP_OK;
}

int fmap_file_open(const char *path, uint32_t protect, int create, int *out,
                   int *created, fmap_err *e)
{
    int flags = (protect == FMAP_A_WRITE ? O_RDWR : O_RDONLY) | O_CLOEXEC;
    *created = 0;
    int fd = open(path, flags);
    if (fd < 0 && errno == ENOENT && create && protect == FMAP_A_WRITE) {
        fd = open(path, flags | O_CREAT | O_EXCL, 0666);
        if (fd >= 0)
            *created = 1;
        else if (errno == EEXIST)   /* lost a race with another creator */
            fd = open(path, flags);
    }
    if (fd < 0)
        return sys_fail(e, "open");
    *out = fd;
    return FMAP_OK;
}

int fmap_fd_access(int fd, int *writable, fmap_err *e)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0)
        return sys_fail(e, "fcntl(F_GETFL)");
    if ((fl & O_ACCMODE) == O_WRONLY)
        return fail(e, FMAP_ESYS, EACCES, "file opened write-only");
    *writable = (fl & O_ACCMODE) == O_RDWR;
    return FMAP_OK;
}

int fmap_file_prepare(int fd, uint32_t protect, uint64_t *size, fmap_err *e)
{
    struct stat st;
    int writable;
    if (fstat(fd, &st) != 0)
        return sys_fail(e, "fstat");
    if (!S_ISREG(st.st_mode))
        return fail(e, FMAP_ESYS, EINVAL, "not a regular file");
    if (fmap_fd_access(fd, &writable, e) != FMAP_OK)
        return e->status;
    if (protect == FMAP_A_WRITE && !writable)
        return fail(e, FMAP_ESYS, EACCES, "file opened read-only");
    if (*size == 0) {
        if (st.st_size == 0)
            return fail(e, FMAP_ESYS, EINVAL, "empty file");
        *size = (uint64_t)st.st_size;
        return FMAP_OK;
    }
    if (*size > (uint64_t)st.st_size) {
        /* Windows grows the file only for a read-write section. */
        if (protect != FMAP_A_WRITE)
            return fail(e, FMAP_ESYS, EINVAL, "file smaller than size");
        if (ftruncate(fd, (off_t)*size) != 0)
            return sys_fail(e, "ftruncate");
    }
    return FMAP_OK;
}

int fmap_fd_info(int fd, fmap_objinfo *info, fmap_err *e)
{
    struct stat st;
    if (fstat(fd, &st) != 0)
        return sys_fail(e, "fstat");
    info->dev = (uint64_t)st.st_dev;
    info->ino = (uint64_t)st.st_ino;
    info->size = (uint64_t)st.st_size;
    return FMAP_OK;
}

int fmap_dup(int fd, int *out, fmap_err *e)
{
    int d = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (d < 0)
        return sys_fail(e, "dup");
    *out = d;
    return FMAP_OK;
}

static char *put_uint(char *p, unsigned v)
{
    char tmp[12];
    int k = 0;
    do
        tmp[k++] = (char)('0' + v % 10);
    while ((v /= 10) != 0);
    while (k)
        *p++ = tmp[--k];
    return p;
}

/* "/proc/<pid>/fd/<fd>" into buf (64 bytes): by hand, as snprintf cost a
   tenth of a microsecond on every open. */
static void proc_fd_path(char buf[64], int pid, int fd)
{
    char *p = buf;
    memcpy(p, "/proc/", 6);
    p = put_uint(p + 6, (unsigned)pid);
    memcpy(p, "/fd/", 4);
    p = put_uint(p + 4, (unsigned)fd);
    *p = 0;
}

/* Another fd for an object this process holds at fd: a dup, as DuplicateHandle
   makes, rather than a reopen through /proc (a path walk and a new open file,
   3 us).  Only when fd has exactly the access wanted (a read-only handle must
   not share a writable file) and is still the object; -1 otherwise. */
static int dup_own(int fd, int oflags, uint64_t dev, uint64_t ino)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || (fl & O_ACCMODE) != (oflags & O_ACCMODE))
        return -1;
    int f = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (f < 0)
        return -1;
    struct stat st;
    if (fstat(f, &st) == 0 && (uint64_t)st.st_dev == dev && (uint64_t)st.st_ino == ino)
        return f;
    close(f);
    return -1;
}

int fmap_reach(int pid, int fd, int writable, uint64_t dev, uint64_t ino, int *out,
               fmap_err *e)
{
    char path[64];
    struct stat st;
    int oflags = (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC;
    if (pid == fmap_getpid() && (*out = dup_own(fd, oflags, dev, ino)) >= 0)
        return FMAP_OK;
    proc_fd_path(path, pid, fd);
    int f = open(path, oflags);
    if (f < 0) {
        int err = errno;
        /* ENXIO, EISDIR...: the fd number now names another file (a socket,
           a directory), so the sender closed ours. */
        if (err == ENOENT || err == ESRCH ||
            (stat(path, &st) == 0 && ((uint64_t)st.st_dev != dev || (uint64_t)st.st_ino != ino)))
            return fail(e, FMAP_EGONE, err, "open /proc/<pid>/fd");
        errno = err;
        return sys_fail(e, "open /proc/<pid>/fd");
    }
    if (fstat(f, &st) != 0 || (uint64_t)st.st_dev != dev || (uint64_t)st.st_ino != ino) {
        close(f);
        return fail(e, FMAP_EGONE, 0, "inode check");
    }
    *out = f;
    return FMAP_OK;
}

/* ---- views ------------------------------------------------------------- */

int fmap_view_map(int fd, uint64_t offset, size_t length, uint32_t access,
                  int populate, void *fixed, void **out, fmap_err *e)
{
    int prot = access == FMAP_A_READ ? PROT_READ : PROT_READ | PROT_WRITE;
    int flags = access == FMAP_A_COPY ? MAP_PRIVATE : MAP_SHARED;
    /* MAP_POPULATE write-faults a private writable mapping: it would copy
       every page of a copy-on-write view.  Those are read-faulted below. */
    if (populate && access != FMAP_A_COPY)
        flags |= MAP_POPULATE;
    if (fixed)
        flags |= MAP_FIXED_NOREPLACE;
    void *p = mmap(fixed, length, prot, flags, fd, (off_t)offset);
    if (p == MAP_FAILED) {
        if (fixed && errno == EEXIST)
            return fail(e, FMAP_EADDRINUSE, EEXIST, "mmap");
        /* ENOMEM for a fixed range past the top of the (4-level paging) user
           address space is a bad address, not a lack of memory.  With 5-level
           paging such a range maps and never gets here. */
        if (fixed && errno == ENOMEM &&
            ((uintptr_t)fixed + length < (uintptr_t)fixed || (uintptr_t)fixed + length > USER_TOP))
            return fail(e, FMAP_EBADADDR, ENOMEM, "mmap");
        return sys_fail(e, "mmap");
    }
    if (fixed && p != fixed) {   /* a kernel before 4.17 took the address as a hint */
        munmap(p, length);
        return fail(e, FMAP_EADDRINUSE, EEXIST, "mmap");
    }
    if (populate && access == FMAP_A_COPY)
        madvise(p, length, MADV_POPULATE_READ);   /* best effort; EINVAL before 5.14 */
    *out = p;
    return FMAP_OK;
}

int fmap_view_retire(void *addr, size_t length, fmap_err *e)
{
    /* MAP_FIXED replaces the shared pages atomically: no instant where the
       range is unmapped and another mapping could take the address. */
    void *p = mmap(addr, length, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        return sys_fail(e, "mmap placeholder");
    return FMAP_OK;
}

int fmap_view_unmap(void *addr, size_t length, fmap_err *e)
{
    if (munmap(addr, length) != 0)
        return sys_fail(e, "munmap");
    return FMAP_OK;
}

int fmap_view_flush(void *addr, size_t length, int wait, fmap_err *e)
{
    size_t page = fmap_page_size();
    uintptr_t a = (uintptr_t)addr;
    uintptr_t start = a & ~(uintptr_t)(page - 1);
    /* MS_SYNC on a shared file mapping ends in vfs_fsync_range(datasync):
       the pages are on the device when it returns. */
    if (msync((void *)start, length + (a - start), wait ? MS_SYNC : MS_ASYNC) != 0)
        return sys_fail(e, "msync");
    return FMAP_OK;
}

/* ---- the registry: layout ------------------------------------------------ */

#define REG_MAGIC "FMAPREG\x01"
#define REG_VERSION 2u            /* 2: the lock is an fmap_rlock, not a pthread mutex */
#define REG_FILE "registry.v2"
#define REG_NENTRIES 16384u
#define REG_NINDEX 32768u            /* power of two, twice the entries */
#define REG_NHOLDERS 65536u
#define REG_HEADER_SIZE 4096u
#define IDX_EMPTY 0u
#define IDX_TOMB 0xffffffffu
/* A fork-pending record is claimed by the child within its first
   microseconds; past this it is taken for a child that died or a failed fork. */
#define PENDING_NS 2000000000ull
#define LOCK_TIMEOUT_S 10
#define REG_POLL_NS 10000000u     /* a registry lock waiter asks after the owner */

enum { H_FREE = 0, H_LIVE = 1, H_PENDING = 2 };
enum { E_FREE = 0, E_LIVE = 1 };

typedef struct {
    char magic[8];
    uint32_t version, header_size, entry_size, nentries, nindex, holder_size, nholders;
    uint32_t lock_size;
    fmap_rlock lock;        /* robust; guards all below and the tables */
    uint64_t generation;    /* bumped for every new incarnation of a name */
    uint32_t tombstones;    /* index slots marked deleted */
    uint32_t entry_hint, holder_hint;
    uint32_t entries_used, holders_used;
    uint32_t repairs;       /* times a dead owner's lock was recovered */
} reg_header;

typedef struct {
    uint32_t state;         /* E_*: written last on create, first on free */
    uint32_t type, protect, flags;
    uint64_t gen;
    uint64_t size, dev, ino;
    uint32_t head;          /* derived: first holder record + 1 */
    uint32_t nholders;      /* derived */
    uint32_t hash;
    uint32_t keylen;
    char key[FMAP_KEY_MAX];
} reg_entry;

typedef struct {
    uint32_t state;         /* H_*: written last */
    uint32_t entry;
    uint32_t next;          /* derived: next holder of the same entry + 1 */
    int32_t pid;            /* holder; for H_PENDING, the parent that forked */
    int32_t fd;
    int32_t child;          /* H_PENDING: the child, once the parent knows it; else 0 */
    uint64_t start;         /* H_LIVE: process start time; H_PENDING: fork time (ns) */
    uint64_t gen;           /* the entry incarnation it holds */
} reg_holder;

struct fmap_reg {
    struct fmap_reg *next;
    char *dir;
    size_t maplen;
    reg_header *h;
    uint32_t *index;
    reg_entry *entries;
    reg_holder *holders;
};

static fmap_reg *g_regs;
static pthread_mutex_t g_regs_lock = PTHREAD_MUTEX_INITIALIZER;

static size_t reg_size(void)
{
    return REG_HEADER_SIZE + REG_NINDEX * sizeof(uint32_t) +
           REG_NENTRIES * sizeof(reg_entry) + REG_NHOLDERS * sizeof(reg_holder);
}

static void reg_layout(fmap_reg *r, void *base)
{
    char *p = base;
    r->h = (reg_header *)p;
    r->index = (uint32_t *)(p + REG_HEADER_SIZE);
    r->entries = (reg_entry *)(p + REG_HEADER_SIZE + REG_NINDEX * sizeof(uint32_t));
    r->holders = (reg_holder *)((char *)r->entries + REG_NENTRIES * sizeof(reg_entry));
}

static void set_state(uint32_t *word, uint32_t v)
{
    __atomic_store_n(word, v, __ATOMIC_RELEASE);
}

static uint32_t key_hash(const char *key, size_t len)
{
    uint32_t h = 2166136261u;   /* FNV-1a */
    for (size_t i = 0; i < len; i++)
        h = (h ^ (unsigned char)key[i]) * 16777619u;
    return h;
}

/* ---- the registry: index and chains (all derived data) --------------------- */

/* Index values and chain links are read from the file, which any process of
   the user can write.  A link that does not name a holder of the entry in
   hand (out of range, a free record, another entry's or another
   incarnation's) ends the chain, and an index value out of range ends
   nothing but is skipped: the names behind a bad one may be lost, as if
   their holders were gone, but no memory outside the tables is touched and
   no entry's chain runs into another's.  No walk takes more steps than
   there are records, so a forged cycle cannot hold the lock for good. */
static int link_ok(fmap_reg *r, uint32_t ei, uint32_t link)
{
    if (link == 0 || link > REG_NHOLDERS)
        return 0;
    const reg_holder *ho = &r->holders[link - 1];
    return ho->state != H_FREE && ho->entry == ei && ho->gen == r->entries[ei].gen;
}

static int64_t idx_lookup(fmap_reg *r, const char *key, size_t len, uint32_t hash)
{
    uint32_t mask = REG_NINDEX - 1;
    for (uint32_t i = 0, s = hash & mask; i < REG_NINDEX; i++, s = (s + 1) & mask) {
        uint32_t v = r->index[s];
        if (v == IDX_EMPTY)
            return -1;
        if (v == IDX_TOMB || v > REG_NENTRIES)
            continue;
        reg_entry *en = &r->entries[v - 1];
        if (en->state == E_LIVE && en->hash == hash && en->keylen == len &&
            memcmp(en->key, key, len) == 0)
            return (int64_t)(v - 1);
    }
    return -1;
}

static void idx_rebuild(fmap_reg *r);

static void idx_insert(fmap_reg *r, uint32_t ei)
{
    uint32_t mask = REG_NINDEX - 1;
    for (uint32_t i = 0, s = r->entries[ei].hash & mask; i < REG_NINDEX; i++, s = (s + 1) & mask) {
        uint32_t v = r->index[s];
        if (v == IDX_EMPTY || v == IDX_TOMB) {
            if (v == IDX_TOMB)
                r->h->tombstones--;
            r->index[s] = ei + 1;
            return;
        }
    }
    /* No free slot: the index was overwritten (it holds twice the entries).
       Rebuilt from the entries, it has room, and ei if it is live. */
    idx_rebuild(r);
}

static void idx_rebuild(fmap_reg *r)
{
    memset(r->index, 0, REG_NINDEX * sizeof(uint32_t));
    r->h->tombstones = 0;
    for (uint32_t i = 0; i < REG_NENTRIES; i++)
        if (r->entries[i].state == E_LIVE)
            idx_insert(r, i);
}

static void idx_delete(fmap_reg *r, uint32_t ei)
{
    uint32_t mask = REG_NINDEX - 1;
    for (uint32_t i = 0, s = r->entries[ei].hash & mask; i < REG_NINDEX; i++, s = (s + 1) & mask) {
        uint32_t v = r->index[s];
        if (v == IDX_EMPTY)
            return;
        if (v == ei + 1) {
            r->index[s] = IDX_TOMB;
            /* Tombstones lengthen probes; past a quarter, start afresh. */
            if (++r->h->tombstones > REG_NINDEX / 4)
                idx_rebuild(r);
            return;
        }
    }
}

static void chain_add(fmap_reg *r, uint32_t ei, uint32_t hi)
{
    r->holders[hi].next = r->entries[ei].head;
    r->entries[ei].head = hi + 1;
    r->entries[ei].nholders++;
}

static void chain_remove(fmap_reg *r, uint32_t ei, uint32_t hi)
{
    uint32_t *link = &r->entries[ei].head;
    for (uint32_t steps = 0; link_ok(r, ei, *link) && steps < REG_NHOLDERS; steps++) {
        if (*link == hi + 1) {
            *link = r->holders[hi].next;
            r->entries[ei].nholders--;
            return;
        }
        link = &r->holders[*link - 1].next;
    }
}

static void holder_drop(fmap_reg *r, uint32_t ei, uint32_t hi)
{
    chain_remove(r, ei, hi);
    set_state(&r->holders[hi].state, H_FREE);
    r->holders[hi].child = 0;   /* as builds that knew no child left it */
    r->h->holders_used--;
}

static void entry_drop(fmap_reg *r, uint32_t ei)
{
    set_state(&r->entries[ei].state, E_FREE);
    idx_delete(r, ei);
    r->h->entries_used--;
}

/* Rebuild what a process killed inside the lock may have left half done:
   everything derived from the entries' and holders' state words. */
static void reg_repair(fmap_reg *r)
{
    reg_header *h = r->h;
    h->entries_used = 0;
    h->holders_used = 0;
    for (uint32_t i = 0; i < REG_NENTRIES; i++) {
        r->entries[i].head = 0;
        r->entries[i].nholders = 0;
    }
    for (uint32_t i = 0; i < REG_NHOLDERS; i++) {
        reg_holder *ho = &r->holders[i];
        if (ho->state == H_FREE)
            continue;
        if (ho->entry < REG_NENTRIES && r->entries[ho->entry].state == E_LIVE &&
            r->entries[ho->entry].gen == ho->gen) {
            chain_add(r, ho->entry, i);
            h->holders_used++;
        } else {
            ho->state = H_FREE;
            ho->child = 0;
        }
    }
    for (uint32_t i = 0; i < REG_NENTRIES; i++) {
        reg_entry *en = &r->entries[i];
        if (en->state != E_LIVE)
            continue;
        if (!en->head || en->keylen > FMAP_KEY_MAX)
            en->state = E_FREE;
        else
            h->entries_used++;
    }
    idx_rebuild(r);
    h->repairs++;
}

/* ---- the registry: lock ------------------------------------------------- */

static int reg_lock(fmap_reg *r, fmap_err *e)
{
    uint64_t deadline = fmap_clock_ns() + LOCK_TIMEOUT_S * 1000000000ull;
    for (;;) {
        switch (fmap_rlock_take(&r->h->lock, deadline, 1, REG_POLL_NS)) {
        case RLOCK_OK:
            return FMAP_OK;
        case RLOCK_MINE:
            /* No thread takes it twice, so a word naming this one was
               written by another process: taken over like a dead owner's. */
        case RLOCK_ABANDONED:
            /* Its owner died inside: rebuild what it may have left half done. */
            reg_repair(r);
            return FMAP_OK;
        case RLOCK_INTR:
            continue;       /* held for microseconds: wait on, to the deadline */
        case RLOCK_TIMEOUT:
            return fail(e, FMAP_ETIMEOUT, ETIMEDOUT, "registry lock");
        default:
            return fail(e, FMAP_ESYS, errno, "registry lock");
        }
    }
}

static void reg_unlock(fmap_reg *r)
{
    fmap_rlock_give(&r->h->lock);
}

/* ---- the registry: attach ----------------------------------------------- */

static int check_dir(const char *dir, int create, int *dirfd, fmap_err *e)
{
    struct stat st, st2;
    if (lstat(dir, &st) != 0) {
        if (errno != ENOENT || !create)
            return sys_fail(e, "runtime directory");
        if (mkdir(dir, 0700) != 0 && errno != EEXIST)
            return sys_fail(e, "mkdir runtime directory");
        if (lstat(dir, &st) != 0)
            return sys_fail(e, "runtime directory");
    }
    if (S_ISLNK(st.st_mode))
        return fail(e, FMAP_EUNSAFE, ELOOP, "runtime directory is a symbolic link");
    if (!S_ISDIR(st.st_mode))
        return fail(e, FMAP_EUNSAFE, ENOTDIR, "runtime directory is not a directory");
    if (st.st_uid != geteuid())
        return fail(e, FMAP_EUNSAFE, EPERM, "runtime directory owned by another user");
    if (st.st_mode & 077)
        return fail(e, FMAP_EUNSAFE, EPERM, "runtime directory open to other users");
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return sys_fail(e, "open runtime directory");
    /* The directory opened is the one checked, not one swapped in since. */
    if (fstat(fd, &st2) != 0 || st2.st_dev != st.st_dev || st2.st_ino != st.st_ino) {
        close(fd);
        return fail(e, FMAP_EUNSAFE, EPERM, "runtime directory changed while opened");
    }
    *dirfd = fd;
    return FMAP_OK;
}

static int reg_init_file(int dirfd, fmap_err *e)
{
    char tmp[64];
    snprintf(tmp, sizeof tmp, ".registry.%d.tmp", fmap_getpid());
    unlinkat(dirfd, tmp, 0);
    int fd = openat(dirfd, tmp, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        return sys_fail(e, "create registry");
    size_t len = reg_size();
    void *base = MAP_FAILED;
    if (ftruncate(fd, (off_t)len) != 0 ||
        (base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)) == MAP_FAILED) {
        sys_fail(e, "create registry");
        close(fd);
        unlinkat(dirfd, tmp, 0);
        return e->status;
    }
    close(fd);
    reg_header *h = base;
    h->version = REG_VERSION;
    h->header_size = REG_HEADER_SIZE;
    h->entry_size = sizeof(reg_entry);
    h->nentries = REG_NENTRIES;
    h->nindex = REG_NINDEX;
    h->holder_size = sizeof(reg_holder);
    h->nholders = REG_NHOLDERS;
    h->lock_size = sizeof(fmap_rlock);     /* the lock: all zero, free */
    memcpy(h->magic, REG_MAGIC, 8);
    munmap(base, len);
    /* Published whole or not at all: link fails if another process won. */
    int rc = linkat(dirfd, tmp, dirfd, REG_FILE, 0);
    int err = errno;
    unlinkat(dirfd, tmp, 0);
    if (rc != 0 && err != EEXIST)
        return fail(e, FMAP_ESYS, err, "publish registry");
    return FMAP_OK;
}

static int reg_map(int dirfd, fmap_reg *r, fmap_err *e)
{
    int fd = openat(dirfd, REG_FILE, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) {
        if (reg_init_file(dirfd, e) != FMAP_OK)
            return e->status;
        fd = openat(dirfd, REG_FILE, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
    }
    if (fd < 0)
        return sys_fail(e, "open registry");
    struct stat st;
    size_t len = reg_size();
    if (fstat(fd, &st) != 0) {
        sys_fail(e, "open registry");
        close(fd);
        return e->status;
    }
    if (!S_ISREG(st.st_mode) || st.st_uid != geteuid() || (st.st_mode & 077)) {
        close(fd);
        return fail(e, FMAP_EUNSAFE, EPERM, "registry file has a wrong type, owner or mode");
    }
    if ((size_t)st.st_size != len) {
        close(fd);
        return fail(e, FMAP_ECORRUPT, 0, "registry file has a wrong size");
    }
    void *base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (base == MAP_FAILED)
        return sys_fail(e, "map registry");
    reg_header *h = base;
    if (memcmp(h->magic, REG_MAGIC, 8) != 0 || h->version != REG_VERSION ||
        h->header_size != REG_HEADER_SIZE || h->entry_size != sizeof(reg_entry) ||
        h->nentries != REG_NENTRIES || h->nindex != REG_NINDEX ||
        h->holder_size != sizeof(reg_holder) || h->nholders != REG_NHOLDERS ||
        h->lock_size != sizeof(fmap_rlock)) {
        munmap(base, len);
        return fail(e, FMAP_ECORRUPT, 0, "registry file has a wrong magic, version or layout");
    }
    r->maplen = len;
    reg_layout(r, base);
    return FMAP_OK;
}

int fmap_reg_attach(const char *dir, int create_dir, fmap_reg **out, fmap_err *e)
{
    pthread_mutex_lock(&g_regs_lock);
    for (fmap_reg *r = g_regs; r; r = r->next) {
        if (strcmp(r->dir, dir) == 0) {
            pthread_mutex_unlock(&g_regs_lock);
            *out = r;
            return FMAP_OK;
        }
    }
    int dirfd = -1;
    fmap_reg *r = calloc(1, sizeof *r);
    if (!r) {
        pthread_mutex_unlock(&g_regs_lock);
        return fail(e, FMAP_ESYS, ENOMEM, "malloc");
    }
    if (check_dir(dir, create_dir, &dirfd, e) != FMAP_OK || reg_map(dirfd, r, e) != FMAP_OK ||
        !(r->dir = strdup(dir))) {
        if (r->dir == NULL && e->status == FMAP_OK)
            fail(e, FMAP_ESYS, ENOMEM, "malloc");
        if (r->h)
            munmap(r->h, r->maplen);
        free(r);
        if (dirfd >= 0)
            close(dirfd);
        pthread_mutex_unlock(&g_regs_lock);
        return e->status;
    }
    close(dirfd);
    /* Registries stay mapped for the life of the process: holds point into them. */
    r->next = g_regs;
    g_regs = r;
    pthread_mutex_unlock(&g_regs_lock);
    *out = r;
    return FMAP_OK;
}

/* ---- the registry: holders ----------------------------------------------- */

static int64_t holder_alloc(fmap_reg *r)
{
    uint32_t n = REG_NHOLDERS, s = r->h->holder_hint % n;
    for (uint32_t i = 0; i < n; i++, s = (s + 1) % n) {
        if (r->holders[s].state == H_FREE) {
            r->h->holder_hint = s + 1;
            return s;
        }
    }
    return -1;
}

static int64_t entry_alloc(fmap_reg *r)
{
    uint32_t n = REG_NENTRIES, s = r->h->entry_hint % n;
    for (uint32_t i = 0; i < n; i++, s = (s + 1) % n) {
        if (r->entries[s].state == E_FREE) {
            r->h->entry_hint = s + 1;
            return s;
        }
    }
    return -1;
}

/* A pending record is over when its time is up, or at once when the parent
   named its child and that child is gone (killed before it could claim the
   record): a close() in the parent waited for it, and the name stayed, for
   the whole PENDING_NS. */
static int pending_expired(const reg_holder *ho)
{
    if (now_ns() - ho->start > PENDING_NS)
        return 1;
    int dead = 0;
    if (ho->child > 0)
        fmap_proc_start(ho->child, &dead);
    return dead;
}

/* Does holder record hi still name a live fd of the entry's object?  A stat
   through /proc follows the fd to its inode without opening anything.
   Returns 1 alive, 0 dead, -1 cannot tell (permission): kept as alive. */
static int holder_alive(fmap_reg *r, uint32_t ei, uint32_t hi)
{
    reg_holder *ho = &r->holders[hi];
    reg_entry *en = &r->entries[ei];
    if (ho->state == H_PENDING)
        return !pending_expired(ho);
    char path[64];
    struct stat st;
    proc_fd_path(path, ho->pid, ho->fd);
    if (stat(path, &st) == 0)
        return (uint64_t)st.st_dev == en->dev && (uint64_t)st.st_ino == en->ino;
    return (errno == EACCES || errno == EPERM) ? -1 : 0;
}

/* Is any holder of entry ei alive?  Prunes the dead, frees a dead entry. */
static int entry_alive(fmap_reg *r, uint32_t ei)
{
    uint32_t link = r->entries[ei].head;
    for (uint32_t steps = 0; link_ok(r, ei, link) && steps < REG_NHOLDERS; steps++) {
        uint32_t hi = link - 1;
        link = r->holders[hi].next;
        if (holder_alive(r, ei, hi))
            return 1;
        holder_drop(r, ei, hi);
    }
    entry_drop(r, ei);
    return 0;
}

static void prune_all(fmap_reg *r)
{
    for (uint32_t i = 0; i < REG_NENTRIES; i++)
        if (r->entries[i].state == E_LIVE)
            entry_alive(r, i);
}

/* Open entry ei's object through a live holder, pruning dead ones on the way.
   FMAP_OK with *fd; FMAP_ENOTFOUND (the entry is freed); FMAP_EACCESS when the
   only live holders cannot be reached by us; 1 when only a just-forked child
   holds it and has not claimed its record yet (try again shortly). */
static int reach_entry(fmap_reg *r, uint32_t ei, int writable, int *fd, fmap_err *e)
{
    reg_entry *en = &r->entries[ei];
    int oflags = (writable && en->protect == FMAP_A_WRITE ? O_RDWR : O_RDONLY) | O_CLOEXEC;
    int denied = 0, pending = 0;
    int me = fmap_getpid();
    uint32_t link;
    /* A handle of our own, when there is one, is the cheapest way in. */
    uint32_t steps = 0;
    for (link = en->head; link_ok(r, ei, link) && steps < REG_NHOLDERS;
         link = r->holders[link - 1].next, steps++) {
        reg_holder *ho = &r->holders[link - 1];
        if (ho->state == H_LIVE && ho->pid == me &&
            (*fd = dup_own(ho->fd, oflags, en->dev, en->ino)) >= 0)
            return FMAP_OK;
    }
    link = en->head;
    for (steps = 0; link_ok(r, ei, link) && steps < REG_NHOLDERS; steps++) {
        uint32_t hi = link - 1;
        reg_holder *ho = &r->holders[hi];
        link = ho->next;
        if (ho->state == H_PENDING) {
            if (pending_expired(ho))
                holder_drop(r, ei, hi);
            else
                pending = 1;
            continue;
        }
        char path[64];
        proc_fd_path(path, ho->pid, ho->fd);
        int f = open(path, oflags);
        if (f >= 0) {
            struct stat st;
            if (fstat(f, &st) == 0 && (uint64_t)st.st_dev == en->dev &&
                (uint64_t)st.st_ino == en->ino) {
                *fd = f;
                return FMAP_OK;
            }
            close(f);                 /* the fd number was reused: stale record */
            holder_drop(r, ei, hi);
        } else if (errno == ENOENT || errno == ESRCH || errno == ENOTDIR) {
            holder_drop(r, ei, hi);   /* the process or its fd is gone */
        } else {
            /* EACCES: another user's process.  ENXIO, EISDIR...: the fd
               number names another file now (a socket, a directory), as in
               a child that exec'd after fork: a stale record, not an error. */
            int err = errno;
            int alive = holder_alive(r, ei, hi);
            if (!alive) {
                holder_drop(r, ei, hi);
            } else if (alive < 0 || err == EACCES || err == EPERM) {
                denied = 1;
            } else {
                errno = err;
                return sys_fail(e, "open /proc/<pid>/fd");
            }
        }
    }
    if (denied)
        return fail(e, FMAP_EACCESS, EACCES, "open /proc/<pid>/fd");
    if (pending)
        return 1;
    entry_drop(r, ei);
    return fail(e, FMAP_ENOTFOUND, ENOENT, "lookup");
}

static int add_holder(fmap_reg *r, uint32_t ei, int fd, fmap_hold *hold, fmap_err *e)
{
    int64_t hi = holder_alloc(r);
    if (hi < 0) {
        prune_all(r);
        if (r->entries[ei].state != E_LIVE)  /* cannot happen: we hold it open */
            return fail(e, FMAP_ENOTFOUND, ENOENT, "lookup");
        hi = holder_alloc(r);
        if (hi < 0)
            return fail(e, FMAP_EFULL, ENOSPC, "the registry's holder records");
    }
    reg_holder *ho = &r->holders[hi];
    ho->entry = ei;
    ho->pid = fmap_getpid();
    ho->fd = fd;
    ho->start = start_time();
    ho->gen = r->entries[ei].gen;
    set_state(&ho->state, H_LIVE);
    chain_add(r, ei, (uint32_t)hi);
    r->h->holders_used++;
    hold->reg = r;
    hold->entry = ei;
    hold->slot = (uint32_t)hi;
    hold->pending = 0;
    hold->gen = ho->gen;
    hold->fd = fd;
    return FMAP_OK;
}

static void entry_info(const reg_entry *en, fmap_objinfo *info)
{
    info->type = en->type;
    info->protect = en->protect;
    info->flags = en->flags;
    info->size = en->size;
    info->dev = en->dev;
    info->ino = en->ino;
}

/* Look up and open an existing name; the lock is held.  Returns FMAP_OK,
   FMAP_ENOTFOUND when the name is free, or an error.  Waits (lock dropped) while
   only a just-forked child holds the object. */
static int open_locked(fmap_reg *r, const char *key, size_t len, uint32_t hash,
                       uint32_t type, int exclusive, int writable, int *fd,
                       fmap_objinfo *info, fmap_hold *hold, fmap_err *e)
{
    for (;;) {
        int64_t ei = idx_lookup(r, key, len, hash);
        if (ei < 0)
            return fail(e, FMAP_ENOTFOUND, ENOENT, "lookup");
        reg_entry *en = &r->entries[ei];
        if (en->type != type || exclusive) {
            if (!entry_alive(r, (uint32_t)ei))
                return fail(e, FMAP_ENOTFOUND, ENOENT, "lookup");
            return en->type != type ? fail(e, FMAP_EWRONGTYPE, 0, "lookup")
                                    : fail(e, FMAP_EEXIST, EEXIST, "lookup");
        }
        int rc = reach_entry(r, (uint32_t)ei, writable, fd, e);
        if (rc == 1) {   /* a forked child is about to claim its record */
            reg_unlock(r);
            struct timespec ts = {0, 200000};
            nanosleep(&ts, NULL);
            if (reg_lock(r, e) != FMAP_OK)
                return e->status;
            continue;
        }
        if (rc != FMAP_OK)
            return rc;
        rc = add_holder(r, (uint32_t)ei, *fd, hold, e);
        if (rc != FMAP_OK) {
            close(*fd);
            return rc;
        }
        entry_info(en, info);
        return FMAP_OK;
    }
}

int fmap_reg_open(fmap_reg *r, const char *key, size_t keylen, uint32_t type,
                  int writable, int *fd, fmap_objinfo *info, fmap_hold *hold,
                  fmap_err *e)
{
    if (keylen == 0 || keylen > FMAP_KEY_MAX)
        return fail(e, FMAP_ESYS, EINVAL, "name length");
    if (reg_lock(r, e) != FMAP_OK)
        return e->status;
    int rc = open_locked(r, key, keylen, key_hash(key, keylen), type, 0, writable, fd,
                         info, hold, e);
    reg_unlock(r);
    return rc;
}

int fmap_reg_create(fmap_reg *r, const char *key, size_t keylen, uint32_t type,
                    const fmap_newobj *spec, int exclusive, int writable,
                    int *fd, fmap_objinfo *info, fmap_hold *hold, int *created,
                    fmap_err *e)
{
    if (keylen == 0 || keylen > FMAP_KEY_MAX)
        return fail(e, FMAP_ESYS, EINVAL, "name length");
    uint32_t hash = key_hash(key, keylen);
    *created = 0;
    if (reg_lock(r, e) != FMAP_OK)
        return e->status;
    int rc = open_locked(r, key, keylen, hash, type, exclusive, writable, fd, info, hold, e);
    if (rc != FMAP_ENOTFOUND) {
        reg_unlock(r);
        return rc;
    }
    /* The name is free: make the object and publish it, still under the lock,
       so that of many racing creators exactly one creates. */
    int64_t ei = entry_alloc(r);
    if (ei < 0) {
        prune_all(r);
        ei = entry_alloc(r);
        if (ei < 0) {
            reg_unlock(r);
            return fail(e, FMAP_EFULL, ENOSPC, "the registry's name entries");
        }
    }
    int ofd = spec->fd;
    if (ofd < 0 && fmap_memfd_new(spec, &ofd, e) != FMAP_OK) {
        reg_unlock(r);
        return e->status;
    }
    fmap_objinfo oi;
    if ((spec->init && spec->init(spec->init_ctx, ofd, e) != FMAP_OK) ||
        fmap_fd_info(ofd, &oi, e) != FMAP_OK) {
        if (spec->fd < 0)
            close(ofd);
        reg_unlock(r);
        return e->status;
    }
    reg_entry *en = &r->entries[ei];
    en->type = type;
    en->protect = spec->protect;
    en->flags = spec->flags;
    en->gen = ++r->h->generation;
    en->size = spec->size;
    en->dev = oi.dev;
    en->ino = oi.ino;
    en->head = 0;
    en->nholders = 0;
    en->hash = hash;
    en->keylen = (uint32_t)keylen;
    memcpy(en->key, key, keylen);
    /* The holder record first: a crash before the entry's state word leaves a
       record that repair frees, never a live name without holders. */
    int64_t hi = holder_alloc(r);
    if (hi < 0) {
        prune_all(r);
        hi = holder_alloc(r);
    }
    if (hi < 0) {
        if (spec->fd < 0)
            close(ofd);
        reg_unlock(r);
        return fail(e, FMAP_EFULL, ENOSPC, "the registry's holder records");
    }
    reg_holder *ho = &r->holders[hi];
    ho->entry = (uint32_t)ei;
    ho->pid = fmap_getpid();
    ho->fd = ofd;
    ho->start = start_time();
    ho->gen = en->gen;
    set_state(&ho->state, H_LIVE);
    set_state(&en->state, E_LIVE);
    idx_insert(r, (uint32_t)ei);
    chain_add(r, (uint32_t)ei, (uint32_t)hi);
    r->h->entries_used++;
    r->h->holders_used++;
    entry_info(en, info);
    hold->reg = r;
    hold->entry = (uint32_t)ei;
    hold->slot = (uint32_t)hi;
    hold->pending = 0;
    hold->gen = en->gen;
    hold->fd = ofd;
    reg_unlock(r);
    *fd = ofd;
    *created = 1;
    return FMAP_OK;
}

/* Is hold's record still ours (not pruned, not reused)? */
static int hold_valid(fmap_reg *r, const fmap_hold *hold)
{
    if (hold->slot >= REG_NHOLDERS || hold->entry >= REG_NENTRIES)
        return 0;
    reg_holder *ho = &r->holders[hold->slot];
    return ho->state == H_LIVE && ho->entry == hold->entry && ho->gen == hold->gen &&
           ho->pid == fmap_getpid() && ho->fd == hold->fd &&
           r->entries[hold->entry].state == E_LIVE && r->entries[hold->entry].gen == hold->gen;
}

/* Records added for children forked with this hold that have not claimed them. */
static int unclaimed_children(fmap_reg *r, const fmap_hold *hold)
{
    uint32_t link = r->entries[hold->entry].head;
    for (uint32_t steps = 0; link_ok(r, hold->entry, link) && steps < REG_NHOLDERS; steps++) {
        reg_holder *ho = &r->holders[link - 1];
        if (ho->state == H_PENDING && ho->pid == fmap_getpid() && ho->fd == hold->fd &&
            !pending_expired(ho))
            return 1;
        link = ho->next;
    }
    return 0;
}

int fmap_reg_release(fmap_hold *hold, fmap_err *e)
{
    fmap_reg *r = hold->reg;
    if (!r)
        return FMAP_OK;
    if (reg_lock(r, e) != FMAP_OK)
        return e->status;
    if (hold_valid(r, hold)) {
        /* A child forked an instant ago holds the object through this very
           handle; let it register before the name can go with our record. */
        while (unclaimed_children(r, hold)) {
            reg_unlock(r);
            struct timespec ts = {0, 100000};
            nanosleep(&ts, NULL);
            if (reg_lock(r, e) != FMAP_OK)
                return e->status;
            if (!hold_valid(r, hold))
                break;
        }
        if (hold_valid(r, hold)) {
            holder_drop(r, hold->entry, hold->slot);
            if (!r->entries[hold->entry].head)
                entry_drop(r, hold->entry);
        }
    }
    reg_unlock(r);
    hold->reg = NULL;
    return FMAP_OK;
}

int fmap_reg_fork_prepare(fmap_hold *hold, fmap_err *e)
{
    fmap_reg *r = hold->reg;
    hold->pending = 0;
    if (!r)
        return FMAP_OK;
    if (reg_lock(r, e) != FMAP_OK)
        return e->status;
    if (hold_valid(r, hold)) {
        int64_t hi = holder_alloc(r);
        if (hi >= 0) {
            reg_holder *ho = &r->holders[hi];
            ho->entry = hold->entry;
            ho->pid = fmap_getpid();
            ho->fd = hold->fd;
            ho->start = now_ns();
            ho->gen = hold->gen;
            ho->child = 0;
            set_state(&ho->state, H_PENDING);
            chain_add(r, hold->entry, (uint32_t)hi);
            r->h->holders_used++;
            hold->pending = (uint32_t)hi + 1;
        }
    }
    reg_unlock(r);
    return FMAP_OK;
}

/* The child this thread forked last: the last pid of its children file (the
   kernel appends each new child), or 0.  Called in the parent right after
   fork().  The file is read to its end (one read stops at a page's worth of
   whole pids).  A candidate that is already dead, or that started more than
   a second ago, is refused (0: the record waits out PENDING_NS): it is not
   the child just forked but an older one, moved to the end of the list (the
   children of a thread that exited are handed to a sibling) or left last
   when another thread's wait for any child reaped ours. */
int fmap_newest_child(void)
{
    char buf[4096];
    int fd = open("/proc/thread-self/children", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    long cur = -1, last = 0;
    ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) > 0) {
        for (ssize_t k = 0; k < n; k++) {
            if (buf[k] >= '0' && buf[k] <= '9') {
                cur = (cur < 0 ? 0 : cur) * 10 + (buf[k] - '0');
                if (cur > INT_MAX)
                    cur = INT_MAX;
            } else if (cur >= 0) {
                last = cur;
                cur = -1;
            }
        }
    }
    close(fd);
    if (n < 0)
        return 0;
    if (cur >= 0)
        last = cur;
    if (last <= 0 || last >= INT_MAX)
        return 0;
    fmap_procstat st;
    struct timespec ts;
    long tick = sysconf(_SC_CLK_TCK);
    if (fmap_proc_stat((int)last, &st) != 0 || st.dead || tick <= 0 ||
        clock_gettime(CLOCK_BOOTTIME, &ts) != 0)
        return 0;
    uint64_t now_ticks = (uint64_t)ts.tv_sec * (uint64_t)tick +
                         (uint64_t)ts.tv_nsec / (1000000000u / (uint64_t)tick);
    if (st.start + (uint64_t)tick < now_ticks)
        return 0;
    return (int)last;
}

void fmap_reg_fork_parent(fmap_hold *hold, int child)
{
    fmap_reg *r = hold->reg;
    uint32_t p = hold->pending;
    hold->pending = 0;   /* the record is the child's to claim */
    fmap_err e;
    if (!r || !p || child <= 0 || reg_lock(r, &e) != FMAP_OK)
        return;
    reg_holder *ho = &r->holders[p - 1];
    if (ho->state == H_PENDING && ho->pid == fmap_getpid() && ho->entry == hold->entry &&
        ho->gen == hold->gen && ho->fd == hold->fd)
        ho->child = child;  /* not claimed yet: now a dead child frees it at once */
    reg_unlock(r);
}

int fmap_reg_fork_child(fmap_hold *hold, fmap_err *e)
{
    fmap_reg *r = hold->reg;
    uint32_t p = hold->pending;
    hold->pending = 0;
    if (!r)
        return FMAP_OK;
    if (!p) {
        hold->reg = NULL;   /* the parent's record is not ours to release */
        return FMAP_OK;
    }
    if (reg_lock(r, e) != FMAP_OK)
        return e->status;
    reg_holder *ho = &r->holders[p - 1];
    if (ho->state == H_PENDING && ho->entry == hold->entry && ho->gen == hold->gen &&
        ho->fd == hold->fd) {
        ho->pid = fmap_getpid();
        ho->start = start_time();
        ho->child = 0;
        set_state(&ho->state, H_LIVE);
        hold->slot = p - 1;
    } else {
        hold->reg = NULL;   /* expired and pruned: the handle works, unnamed */
    }
    reg_unlock(r);
    return FMAP_OK;
}

int fmap_reg_list(fmap_reg *r, fmap_reg_visit visit, void *ctx, fmap_err *e)
{
    if (reg_lock(r, e) != FMAP_OK)
        return e->status;
    prune_all(r);
    int rc = 0;
    for (uint32_t i = 0; i < REG_NENTRIES && rc == 0; i++) {
        reg_entry *en = &r->entries[i];
        if (en->state != E_LIVE || en->keylen > FMAP_KEY_MAX)
            continue;           /* a length past the key: not one we wrote */
        fmap_objinfo info;
        entry_info(en, &info);
        rc = visit(ctx, en->key, en->keylen, &info, en->nholders);
    }
    reg_unlock(r);
    return rc ? fail(e, FMAP_ESYS, 0, "visit") : FMAP_OK;
}

int fmap_reg_counts(fmap_reg *r, uint32_t *entries, uint32_t *holders, fmap_err *e)
{
    if (reg_lock(r, e) != FMAP_OK)
        return e->status;
    *entries = r->h->entries_used;
    *holders = r->h->holders_used;
    reg_unlock(r);
    return FMAP_OK;
}
