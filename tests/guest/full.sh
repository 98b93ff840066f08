# The default guest script: touches every proxy request type through the 9p share mounted on $M.
# Sourced by /init (tests/guest/init.sh) in a subshell, with step/expect_fail/has_stat/same defined.
# The host checks the export afterwards (harness.verify_full_export), so the names and values here and
# there must agree. Which proxy request each step makes QEMU send is noted on the right.

# CREATE (open with O_CREAT as root) and the write goes through the fd the helper passed back.
step write eval 'echo hello-9p >"$M/file.txt"'
# OPEN of an existing file, read through the passed fd.
step read eval 'same content hello-9p "$(cat "$M/file.txt")"'
# LSTAT (getattr), and GETVERSION: the guest asks for P9_STATS_ALL, which includes the generation.
step stat has_stat "$M/file.txt" type=reg uid=0 gid=0 nlink=1 size=9
# MKDIR, and REMOVE of a directory.
step mkdir eval 'mkdir "$M/dir" && has_stat "$M/dir" type=dir'
step rmdir eval 'mkdir "$M/gone" && rmdir "$M/gone" && [ ! -e "$M/gone" ]'
# OPEN of a directory (O_DIRECTORY), readdir through the passed fd.
step readdir eval 'ls -la "$M" && ls "$M" | grep -qx file.txt && ls "$M" | grep -qx dir'
# CHMOD, including the setuid and setgid bits (no policy in the reference: they must stick).
step chmod eval 'chmod 0640 "$M/file.txt" && has_stat "$M/file.txt" mode=0640'
step chmod_setuid eval 'echo s >"$M/suid" && chmod 4755 "$M/suid" && has_stat "$M/suid" mode=4755'
step chmod_setgid eval 'echo s >"$M/sgid" && chmod 2755 "$M/sgid" && has_stat "$M/sgid" mode=2755'
# CHOWN as root to arbitrary ids.
step chown eval 'echo o >"$M/owned" && chown 1234:5678 "$M/owned" && has_stat "$M/owned" uid=1234 gid=5678'
# CREATE and MKDIR carrying a non-root uid/gid: the guest user 1000:1000 writes into a directory it owns.
step user_dir eval 'mkdir "$M/userdir" && chown 1000:1000 "$M/userdir" && has_stat "$M/userdir" uid=1000'
step user_create eval 'gtool runas 1000 1000 sh -c "echo user-data >$M/userdir/userfile" &&
    has_stat "$M/userdir/userfile" type=reg uid=1000 gid=1000'
step user_mkdir eval 'gtool runas 1000 1000 mkdir "$M/userdir/usersub" &&
    has_stat "$M/userdir/usersub" type=dir uid=1000 gid=1000'
# SYMLINK, then READLINK.
step symlink eval 'ln -s file.txt "$M/link" && has_stat "$M/link" type=lnk'
step readlink eval 'same target file.txt "$(readlink "$M/link")"'
# LINK (hard link): both names then show two links.
step hardlink eval 'ln "$M/file.txt" "$M/hard" && has_stat "$M/file.txt" nlink=2 && has_stat "$M/hard" nlink=2'
# RENAME.
step rename eval 'echo r >"$M/old" && mv "$M/old" "$M/new" && [ ! -e "$M/old" ] && same new r "$(cat "$M/new")"'
# REMOVE of a file.
step unlink eval 'echo d >"$M/del" && rm "$M/del" && [ ! -e "$M/del" ]'
# MKNOD of a FIFO and of a character device (1:3 is /dev/null's numbers).
step mkfifo eval 'mkfifo "$M/fifo" && has_stat "$M/fifo" type=fifo'
step mknod eval 'mknod -m 0600 "$M/null" c 1 3 && has_stat "$M/null" type=chr rdev=1:3 mode=0600'
# TRUNCATE (the guest's truncate(2) becomes a setattr with a size).
step truncate eval 'echo 0123456789 >"$M/trunc" && truncate -s 4 "$M/trunc" && has_stat "$M/trunc" size=4 &&
    same trunc 0123 "$(cat "$M/trunc")"'
# UTIME with whole seconds (QEMU drops nanoseconds).
step utime eval 'gtool utime "$M/file.txt" 1000000000 1234567890 && has_stat "$M/file.txt" mtime=1234567890'
# LSETXATTR, LGETXATTR, LLISTXATTR, LREMOVEXATTR on user.* names.
step xattr_set eval 'gtool setxattr "$M/file.txt" user.test hello-xattr &&
    gtool setxattr "$M/file.txt" user.gone bye'
step xattr_get eval 'same xattr hello-xattr "$(gtool getxattr "$M/file.txt" user.test)"'
step xattr_list eval 'gtool listxattr "$M/file.txt" | grep -qx user.test &&
    gtool listxattr "$M/file.txt" | grep -qx user.gone'
step xattr_remove eval 'gtool removexattr "$M/file.txt" user.gone &&
    ! gtool listxattr "$M/file.txt" | grep -qx user.gone'
# STATFS.
step statfs eval 'stat -f "$M" && df "$M"'
