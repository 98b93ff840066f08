/*
 * gtool: the few system calls the guest test script needs and busybox lacks (or does not expose with the
 * exact arguments a test wants). Built with `gcc -static` by tests/guest/harness.py and put in the guest's
 * initramfs as /bin/gtool.
 *
 *   gtool setxattr PATH NAME VALUE        lsetxattr(PATH, NAME, VALUE, strlen(VALUE), 0)
 *   gtool getxattr PATH NAME              lgetxattr, prints the value and a newline
 *   gtool listxattr PATH                  llistxattr, prints one name a line
 *   gtool removexattr PATH NAME           lremovexattr
 *   gtool runas UID GID CMD [ARG...]      setgroups(0) + setgid + setuid, then execvp (no capabilities left)
 *   gtool mknod PATH TYPE MODE MAJ MIN    mknod(PATH, TYPE|MODE, makedev(MAJ, MIN)); TYPE c, b, p or s;
 *                                         MODE octal
 *   gtool utime PATH ATIME MTIME          utimensat(AT_FDCWD, PATH, {ATIME,0},{MTIME,0}, AT_SYMLINK_NOFOLLOW)
 *                                         (whole seconds: QEMU's 9p server drops nanoseconds anyway)
 *   gtool stat PATH                       lstat, prints "type=.. mode=OCTAL uid= gid= nlink= size= mtime=
 *                                         rdev=MAJ:MIN" on one line (type: reg dir lnk fifo chr blk sock)
 *   gtool cloop DIR N                     N times: open(DIR/cI, O_CREAT|O_EXCL|O_WRONLY, 0644), close, stat,
 *                                         unlink; prints "cloop iterations=N elapsed_ns=T" (CLOCK_MONOTONIC
 *                                         around the whole loop; stops at the first failing call)
 *   gtool timeit CMD [ARG...]             runs CMD (fork + execvp, output inherited), then prints
 *                                         "timeit rc=R elapsed_ns=T" (CLOCK_MONOTONIC from fork to reap)
 *                                         and exits with CMD's status (128+SIG when a signal ended it)
 *
 * On failure it prints "gtool: OP PATH: strerror (errno N NAME)" on stderr and exits 1, so a guest script
 * (and a test reading the console) can tell EPERM from EACCES from ENOENT.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

static const char *errname(int e)
{
    switch (e) {
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case EIO: return "EIO";
    case ENXIO: return "ENXIO";
    case EACCES: return "EACCES";
    case EEXIST: return "EEXIST";
    case ENOTDIR: return "ENOTDIR";
    case EISDIR: return "EISDIR";
    case EINVAL: return "EINVAL";
    case ENOSPC: return "ENOSPC";
    case EROFS: return "EROFS";
    case ERANGE: return "ERANGE";
    case ENOTSUP: return "EOPNOTSUPP";
    case ENODATA: return "ENODATA";
    case ENOTEMPTY: return "ENOTEMPTY";
    case ELOOP: return "ELOOP";
    case ENAMETOOLONG: return "ENAMETOOLONG";
    case EXDEV: return "EXDEV";
    case ENOSYS: return "ENOSYS";
    default: return "E?";
    }
}

static int fail(const char *op, const char *path)
{
    int e = errno;
    fprintf(stderr, "gtool: %s %s: %s (errno %d %s)\n", op, path, strerror(e), e, errname(e));
    return 1;
}

static int usage(void)
{
    fprintf(stderr, "usage: gtool setxattr|getxattr|listxattr|removexattr|runas|mknod|utime|stat|cloop|timeit ...\n");
    return 2;
}

static int do_stat(const char *path)
{
    struct stat st;
    const char *type = "?";

    if (lstat(path, &st) != 0)
        return fail("stat", path);
    switch (st.st_mode & S_IFMT) {
    case S_IFREG: type = "reg"; break;
    case S_IFDIR: type = "dir"; break;
    case S_IFLNK: type = "lnk"; break;
    case S_IFIFO: type = "fifo"; break;
    case S_IFCHR: type = "chr"; break;
    case S_IFBLK: type = "blk"; break;
    case S_IFSOCK: type = "sock"; break;
    }
    printf("type=%s mode=%04o uid=%u gid=%u nlink=%lu size=%lld mtime=%lld rdev=%u:%u\n", type,
           (unsigned)(st.st_mode & 07777), (unsigned)st.st_uid, (unsigned)st.st_gid,
           (unsigned long)st.st_nlink, (long long)st.st_size, (long long)st.st_mtim.tv_sec,
           major(st.st_rdev), minor(st.st_rdev));
    return 0;
}

static long long now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* The benchmark's create+stat+unlink loop: the three calls of a short-lived file, n times. */
static int do_cloop(const char *dir, long n)
{
    char path[4096];
    struct stat st;
    long long start, elapsed;

    if (n <= 0) {
        fprintf(stderr, "gtool: cloop: N must be positive\n");
        return 2;
    }
    start = now_ns();
    for (long i = 0; i < n; i++) {
        int fd;

        snprintf(path, sizeof(path), "%s/c%ld", dir, i);
        fd = open(path, O_CREAT | O_EXCL | O_WRONLY, 0644);
        if (fd < 0)
            return fail("open", path);
        if (close(fd) != 0)
            return fail("close", path);
        if (stat(path, &st) != 0)
            return fail("stat", path);
        if (unlink(path) != 0)
            return fail("unlink", path);
    }
    elapsed = now_ns() - start;
    printf("cloop iterations=%ld elapsed_ns=%lld\n", n, elapsed);
    return 0;
}

static int do_timeit(char **argv)
{
    long long start, elapsed;
    int status, rc;
    pid_t pid;

    fflush(stdout);
    start = now_ns();
    pid = fork();
    if (pid < 0)
        return fail("fork", argv[0]);
    if (pid == 0) {
        execvp(argv[0], argv);
        fail("exec", argv[0]);
        _exit(127);
    }
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR)
            return fail("waitpid", argv[0]);
    }
    elapsed = now_ns() - start;
    rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    printf("timeit rc=%d elapsed_ns=%lld\n", rc, elapsed);
    return rc;
}

int main(int argc, char **argv)
{
    const char *cmd;

    if (argc < 2)
        return usage();
    cmd = argv[1];

    if (strcmp(cmd, "setxattr") == 0 && argc == 5) {
        if (lsetxattr(argv[2], argv[3], argv[4], strlen(argv[4]), 0) != 0)
            return fail("setxattr", argv[2]);
        return 0;
    }
    if (strcmp(cmd, "getxattr") == 0 && argc == 4) {
        char buf[65536];
        ssize_t n = lgetxattr(argv[2], argv[3], buf, sizeof(buf) - 1);
        if (n < 0)
            return fail("getxattr", argv[2]);
        buf[n] = '\0';
        printf("%s\n", buf);
        return 0;
    }
    if (strcmp(cmd, "listxattr") == 0 && argc == 3) {
        char buf[65536];
        ssize_t n = llistxattr(argv[2], buf, sizeof(buf));
        if (n < 0)
            return fail("listxattr", argv[2]);
        /* The list is NUL-separated names; print one a line. */
        for (ssize_t i = 0; i < n; i += (ssize_t)strlen(buf + i) + 1)
            printf("%s\n", buf + i);
        return 0;
    }
    if (strcmp(cmd, "removexattr") == 0 && argc == 4) {
        if (lremovexattr(argv[2], argv[3]) != 0)
            return fail("removexattr", argv[2]);
        return 0;
    }
    if (strcmp(cmd, "runas") == 0 && argc >= 5) {
        uid_t uid = (uid_t)strtoul(argv[2], NULL, 10);
        gid_t gid = (gid_t)strtoul(argv[3], NULL, 10);
        /* Order matters: drop supplementary groups and the gid while still root, then the uid. */
        if (setgroups(0, NULL) != 0)
            return fail("setgroups", argv[3]);
        if (setgid(gid) != 0)
            return fail("setgid", argv[3]);
        if (setuid(uid) != 0)
            return fail("setuid", argv[2]);
        execvp(argv[4], argv + 4);
        return fail("exec", argv[4]);
    }
    if (strcmp(cmd, "mknod") == 0 && argc == 7) {
        mode_t type;
        mode_t mode = (mode_t)strtoul(argv[4], NULL, 8);
        switch (argv[3][0]) {
        case 'c': type = S_IFCHR; break;
        case 'b': type = S_IFBLK; break;
        case 'p': type = S_IFIFO; break;
        case 's': type = S_IFSOCK; break;
        default: return usage();
        }
        if (mknod(argv[2], type | mode, makedev(strtoul(argv[5], NULL, 10), strtoul(argv[6], NULL, 10))) != 0)
            return fail("mknod", argv[2]);
        return 0;
    }
    if (strcmp(cmd, "utime") == 0 && argc == 5) {
        struct timespec ts[2];
        ts[0].tv_sec = (time_t)strtoll(argv[3], NULL, 10);
        ts[0].tv_nsec = 0;
        ts[1].tv_sec = (time_t)strtoll(argv[4], NULL, 10);
        ts[1].tv_nsec = 0;
        if (utimensat(AT_FDCWD, argv[2], ts, AT_SYMLINK_NOFOLLOW) != 0)
            return fail("utime", argv[2]);
        return 0;
    }
    if (strcmp(cmd, "stat") == 0 && argc == 3)
        return do_stat(argv[2]);
    if (strcmp(cmd, "cloop") == 0 && argc == 4)
        return do_cloop(argv[2], strtol(argv[3], NULL, 10));
    if (strcmp(cmd, "timeit") == 0 && argc >= 3)
        return do_timeit(argv + 2);
    return usage();
}
