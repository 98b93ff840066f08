/* The system-call side of gateway/fastloop.pyx: small C helpers, each the C form of one step that
   gateway/core (resolve.py, executor.py, fsids.py) and gateway/audit/writer.py define in Python. */

#ifndef GATEWAY_FASTLOOP_C_H
#define GATEWAY_FASTLOOP_C_H

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/fsuid.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/vfs.h>
#include <linux/capability.h>
#include <linux/fs.h>
#include <linux/openat2.h>
#include <openssl/evp.h>

#define GW_RESOLVE_FAST (RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS)
#define GW_FD_VALID 0x7FFFFFFF

/* openat2 beneath the root, no symlink allowed on the way; EAGAIN (a rename racing the walk) is
   retried as gateway/syscalls.py retries it. */
static int gw_openat2(int dirfd, const char *path, uint64_t flags) {
    struct open_how how;
    memset(&how, 0, sizeof how);
    how.flags = flags | O_CLOEXEC;
    how.resolve = GW_RESOLVE_FAST;
    for (int i = 0; i < 16; i++) {
        long fd = syscall(SYS_openat2, dirfd, path, &how, sizeof how);
        if (fd >= 0 || errno != EAGAIN)
            return (int) fd;
    }
    return -1;
}

static void gw_put64(unsigned char *out, uint64_t v) { memcpy(out, &v, 8); }
static void gw_put32(unsigned char *out, uint32_t v) { memcpy(out, &v, 4); }
static void gw_put16(unsigned char *out, uint16_t v) { memcpy(out, &v, 2); }
static uint32_t gw_get32(const unsigned char *in) { uint32_t v; memcpy(&v, in, 4); return v; }
static uint64_t gw_get64(const unsigned char *in) { uint64_t v; memcpy(&v, in, 8); return v; }

/* The 116-byte LSTAT payload (protocol.stat_payload): little-endian, packed without padding. */
static void gw_stat_payload(const struct stat *st, unsigned char *out) {
    gw_put64(out, (uint64_t) st->st_dev);
    gw_put64(out + 8, (uint64_t) st->st_ino);
    gw_put64(out + 16, (uint64_t) st->st_nlink);
    gw_put32(out + 24, (uint32_t) st->st_mode);
    gw_put32(out + 28, (uint32_t) st->st_uid);
    gw_put32(out + 32, (uint32_t) st->st_gid);
    gw_put64(out + 36, (uint64_t) st->st_rdev);
    gw_put64(out + 44, (uint64_t) (int64_t) st->st_size);
    gw_put64(out + 52, (uint64_t) (int64_t) st->st_blksize);
    gw_put64(out + 60, (uint64_t) (int64_t) st->st_blocks);
    gw_put64(out + 68, (uint64_t) (int64_t) st->st_atim.tv_sec);
    gw_put64(out + 76, (uint64_t) st->st_atim.tv_nsec);
    gw_put64(out + 84, (uint64_t) (int64_t) st->st_mtim.tv_sec);
    gw_put64(out + 92, (uint64_t) st->st_mtim.tv_nsec);
    gw_put64(out + 100, (uint64_t) (int64_t) st->st_ctim.tv_sec);
    gw_put64(out + 108, (uint64_t) st->st_ctim.tv_nsec);
}

static int gw_lstat_at(int dirfd, const char *name, unsigned char *payload) {
    struct stat st;
    if (fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
        return -1;
    gw_stat_payload(&st, payload);
    return 0;
}

/* The 88-byte STATFS payload (Executor.statfs): f_fsid's two ints sign-extended, as the reference. */
static int gw_statfs_payload(int fd, unsigned char *out) {
    struct statfs s;
    if (fstatfs(fd, &s) < 0)
        return -1;
    uint64_t v[11] = {
        (uint64_t) s.f_type, (uint64_t) s.f_bsize, (uint64_t) s.f_blocks, (uint64_t) s.f_bfree,
        (uint64_t) s.f_bavail, (uint64_t) s.f_files, (uint64_t) s.f_ffree,
        (uint64_t) (int64_t) s.f_fsid.__val[0], (uint64_t) (int64_t) s.f_fsid.__val[1],
        (uint64_t) s.f_namelen, (uint64_t) s.f_frsize,
    };
    memcpy(out, v, sizeof v);
    return 0;
}

/* The object's file type (S_IFMT bits), or -1 when fstat fails. */
static int gw_fd_type(int fd) {
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -1;
    return (int) (st.st_mode & S_IFMT);
}

/* 1 when an object of this type may be opened (a regular file or a directory: never a FIFO, a device
   or a socket), as Executor._openable. */
static int gw_openable_type(int type) { return type == S_IFREG || type == S_IFDIR; }

/* Reopen an O_PATH fd through /proc/self/fd (Executor.reopen): no name lookup. */
static int gw_reopen(int proc_fd, int fd, int flags) {
    char name[16];
    snprintf(name, sizeof name, "%d", fd);
    return openat(proc_fd, name, flags | O_CLOEXEC, 0);
}

static int gw_getversion(int proc_fd, int fd, uint64_t *out) {
    int rfd = gw_reopen(proc_fd, fd, O_RDONLY | O_NONBLOCK);
    if (rfd < 0)
        return -1;
    long v = 0;
    int r = ioctl(rfd, FS_IOC_GETVERSION, &v);
    int e = errno;
    close(rfd);
    if (r < 0) {
        errno = e;
        return -1;
    }
    *out = (uint64_t) v;
    return 0;
}

static int gw_chmod_fd(int proc_fd, int fd, unsigned int mode) {
    char name[16];
    snprintf(name, sizeof name, "%d", fd);
    return fchmodat(proc_fd, name, mode & 07777, 0);
}

/* UTIME of the final component itself, by name in its resolved parent, never followed. The
   pipeline acts through the object's O_PATH fd, since its rules may have looked at that object; the
   compiled loop serves only decisions that looked at nothing but the request (fastloop.pyx), and the
   name in this parent fd is the object those decisions are about: two calls fewer, the same answer. */
static int gw_utime_at(int dirfd, const char *name, const unsigned char *times) {
    struct timespec ts[2];
    ts[0].tv_sec = (time_t) (int64_t) gw_get64(times);
    ts[0].tv_nsec = (long) (int64_t) gw_get64(times + 8);
    ts[1].tv_sec = (time_t) (int64_t) gw_get64(times + 16);
    ts[1].tv_nsec = (long) (int64_t) gw_get64(times + 24);
    return utimensat(dirfd, name, ts, AT_SYMLINK_NOFOLLOW);
}

/* remove(3) on a name in its parent: unlink, and rmdir when it is a directory (Executor.remove). */
static int gw_remove_at(int dirfd, const char *name) {
    if (unlinkat(dirfd, name, 0) == 0)
        return 0;
    if (errno != EISDIR)
        return -1;
    return unlinkat(dirfd, name, AT_REMOVEDIR);
}

/* Acting as the guest's user (gateway/core/fsids.py, FsIds): the same calls in the same order. */
struct gw_fsids {
    struct __user_cap_header_struct header;
    struct __user_cap_data_struct caps[2];
    int have_caps;
    int cached;
    uint32_t saved0, saved1;
};

static int gw_capset_effective(struct gw_fsids *f, uint32_t low, uint32_t high) {
    f->caps[0].effective = low & f->caps[0].permitted;
    f->caps[1].effective = high & f->caps[1].permitted;
    f->header.version = _LINUX_CAPABILITY_VERSION_3;
    f->header.pid = 0;
    return (int) syscall(SYS_capset, &f->header, f->caps);
}

static void gw_fsids_exit(struct gw_fsids *f, uint32_t euid, uint32_t egid) {
    setfsuid(euid);
    setfsgid(egid);
    if (f->have_caps) {
        gw_capset_effective(f, f->saved0, f->saved1);
        f->have_caps = 0;
    }
}

/* f->cached: caps holds the sets as they are (the permitted and inheritable sets never change while
   serving, and every switch restores the effective set it found), so capget is not repeated; the loop
   clears it whenever Python code (the pipeline's own FsIds) may have run. */
static int gw_fsids_enter(struct gw_fsids *f, uint32_t uid, uint32_t gid, uint32_t euid, uint32_t egid) {
    f->have_caps = 0;
    if ((uid || gid) && !f->cached) {
        f->header.version = _LINUX_CAPABILITY_VERSION_3;
        f->header.pid = 0;
        if (syscall(SYS_capget, &f->header, f->caps) != 0)
            return -1;
        f->cached = 1;
    }
    setfsgid(gid);
    setfsuid(uid);
    if ((uint32_t) setfsuid((uid_t) -1) != uid || (uint32_t) setfsgid((gid_t) -1) != gid) {
        gw_fsids_exit(f, euid, egid);
        errno = EPERM;
        return -1;
    }
    if (uid || gid) {
        f->saved0 = f->caps[0].effective;
        f->saved1 = f->caps[1].effective;
        f->have_caps = 1;
        if (gw_capset_effective(f, 1u << CAP_DAC_OVERRIDE, 0) != 0) {
            int e = errno;
            gw_fsids_exit(f, euid, egid);
            errno = e;
            return -1;
        }
    }
    return 0;
}

/* Create exactly this name in exactly this parent (Executor._open_or_create's new-file branch):
   O_NOFOLLOW refuses a symlink planted since the resolution, O_NONBLOCK a FIFO; a special file made
   meanwhile is closed and answered ENXIO; O_NONBLOCK dropped again unless the guest asked for it. */
static int gw_create_at(int dirfd, const char *name, int flags, unsigned int mode) {
    if (flags & O_EXCL)
        /* O_CREAT|O_EXCL opens nothing that exists (not a symlink, dangling or not, not a FIFO, not a
           device: EEXIST): the fd is a regular file this call made, so the guards below have nothing
           to guard against. Three calls fewer for the common CREATE. */
        return openat(dirfd, name, flags | O_NOFOLLOW | O_CLOEXEC, mode);
    int fd = openat(dirfd, name, flags | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, mode);
    if (fd < 0)
        return -1;
    int type = gw_fd_type(fd);
    if (type < 0 || !gw_openable_type(type)) {
        int e = type < 0 ? errno : ENXIO;
        close(fd);
        errno = e;
        return -1;
    }
    if (!(flags & O_NONBLOCK)) {
        int fl = fcntl(fd, F_GETFL);
        if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0) {
            int e = errno;
            close(fd);
            errno = e;
            return -1;
        }
    }
    return fd;
}

/* The OPEN/CREATE success reply: FD_VALID with the fd over SCM_RIGHTS. */
static ssize_t gw_send_fd(int sock, int fd) {
    unsigned char data[4];
    char control[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {data, 4};
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    memset(control, 0, sizeof control);
    gw_put32(data, GW_FD_VALID);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof(int));
    ssize_t n;
    do {
        n = sendmsg(sock, &msg, 0);
    } while (n < 0 && errno == EINTR);
    return n;
}

static const char gw_hexdigits[] = "0123456789abcdef";

static int gw_sha256_hex(const unsigned char *data, size_t n, char *hex) {
    unsigned char md[32];
    unsigned int len = 0;
    if (!EVP_Digest(data, n, md, &len, EVP_sha256(), NULL) || len != 32)
        return -1;
    for (int i = 0; i < 32; i++) {
        hex[2 * i] = gw_hexdigits[md[i] >> 4];
        hex[2 * i + 1] = gw_hexdigits[md[i] & 15];
    }
    return 0;
}

static int64_t gw_mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t gw_real_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ((int64_t) ts.tv_sec * 1000000000 + ts.tv_nsec) / 1000;
}

/* "%Y-%m-%dT%H:%M:%S." of a second, as writer._now's strftime of gmtime. */
static int gw_time_prefix(int64_t sec, char *out, size_t cap) {
    time_t t = (time_t) sec;
    struct tm tm;
    if (!gmtime_r(&t, &tm))
        return -1;
    return (int) strftime(out, cap, "%Y-%m-%dT%H:%M:%S.", &tm);
}

/* One decimal, as writer._number ("%.1f"). */
static int gw_us_text(int64_t ns, char *out, size_t cap) {
    return snprintf(out, cap, "%.1f", (double) ns / 1000.0);
}

static uint64_t gw_fnv1a(const unsigned char *s, size_t n, uint64_t h) {
    for (size_t i = 0; i < n; i++) {
        h ^= s[i];
        h *= 1099511628211ULL;
    }
    return h;
}

/* Signals while the loop waits in recv. Python's handlers (installed without SA_RESTART) interrupt a
   recv that is blocked already; what no check can close is a signal that lands after the loop looked
   and before its recv blocks. So the handler is wrapped: before Python's own handler runs, it sets a
   1 us receive timeout on the socket (setsockopt is a plain system call, safe in a handler), so such a
   recv returns at once (EAGAIN) and the loop acts; gw_signals_seen() puts the timeout back. Sends are
   not affected, and nothing is done per request. */
static volatile sig_atomic_t gw_signal_sock = -1;
static struct sigaction gw_chained[NSIG];
static unsigned char gw_wrapped[NSIG];

static void gw_signal_wrapper(int sig, siginfo_t *info, void *ctx) {
    int saved = errno;
    int fd = gw_signal_sock;
    if (fd >= 0) {
        struct timeval tv = {0, 1};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    }
    errno = saved;
    struct sigaction *old = &gw_chained[sig];
    if (old->sa_flags & SA_SIGINFO)
        old->sa_sigaction(sig, info, ctx);
    else if (old->sa_handler != SIG_DFL && old->sa_handler != SIG_IGN)
        old->sa_handler(sig);
}

/* Wrap sig's handler, if it has one (a default or ignored signal is left alone). */
static int gw_wrap_signal(int sig, int sock) {
    struct sigaction sa;
    if (sig <= 0 || sig >= NSIG)
        return -1;
    gw_signal_sock = sock;
    if (gw_wrapped[sig])
        return 0;
    if (sigaction(sig, NULL, &gw_chained[sig]) < 0)
        return -1;
    if (!(gw_chained[sig].sa_flags & SA_SIGINFO)
        && (gw_chained[sig].sa_handler == SIG_DFL || gw_chained[sig].sa_handler == SIG_IGN))
        return 0;
    sa = gw_chained[sig];
    sa.sa_sigaction = gw_signal_wrapper;
    sa.sa_flags = (sa.sa_flags | SA_SIGINFO) & ~SA_RESTART;
    if (sigaction(sig, &sa, NULL) < 0)
        return -1;
    gw_wrapped[sig] = 1;
    return 0;
}

static void gw_unwrap_signal(int sig) {
    if (sig > 0 && sig < NSIG && gw_wrapped[sig]) {
        sigaction(sig, &gw_chained[sig], NULL);
        gw_wrapped[sig] = 0;
    }
    gw_signal_sock = -1;
}

/* Called by the loop before it acts on signals: the socket's receive wait is unbounded again. */
/* idle_ms: the receive timeout the loop waits with otherwise (0: none), so that an idle loop wakes to
   write a checkpoint that has come due (the trail's checkpoint_seconds). */
static int gw_signals_seen(int sock, long idle_ms) {
    struct timeval tv = {idle_ms / 1000, (idle_ms % 1000) * 1000};
    return setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
}

#endif
