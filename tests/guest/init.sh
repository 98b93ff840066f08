#!/bin/busybox sh
# /init of the test guest (see tests/guest/harness.py, which packs this file into the initramfs).
#
# It loads the 9p/virtio modules, mounts the proxy-backed share on /mnt, runs /guest/script.sh (the
# pluggable part: the full default script or a test's own snippet) in a subshell, unmounts, prints
# GUEST-DONE and powers off. Everything the host judges is a console line:
#   GUEST-BOOTED                     /init started
#   STEP name OK [detail]            a step passed
#   STEP name FAIL rc=N output...    a step failed (the command's output, joined on one line)
#   OUT name| line                   each output line of a step's command
#   GUEST-DONE                       the script finished (whatever its steps said)
# No `set -e`: one failing step must not hide the others.

/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /mnt /tmp
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
# Keep kernel chatter (e.g. 9p warnings) off the console so it cannot split our lines; it is still in dmesg,
# which is dumped at the end when a step failed.
echo 1 >/proc/sys/kernel/printk

echo "GUEST-BOOTED"

# step NAME CMD [ARG...]: run CMD (a builtin, a function or `eval 'shell text'` work too) and report.
step() {
    _name=$1
    shift
    _out=$("$@" 2>&1)
    _rc=$?
    if [ -n "$_out" ]; then
        echo "$_out" | while IFS= read -r _line; do echo "OUT $_name| $_line"; done
    fi
    if [ "$_rc" -eq 0 ]; then
        echo "STEP $_name OK"
    else
        : >/tmp/step-failed
        echo "STEP $_name FAIL rc=$_rc $(echo "$_out" | tr '\n' ' ')"
    fi
    return "$_rc"
}

# expect_fail NAME CMD [ARG...]: like step, but OK means the command FAILED (a policy denial, say); the
# detail carries the command's error output so a test can look for "Operation not permitted".
expect_fail() {
    _name=$1
    shift
    _out=$("$@" 2>&1)
    _rc=$?
    if [ -n "$_out" ]; then
        echo "$_out" | while IFS= read -r _line; do echo "OUT $_name| $_line"; done
    fi
    if [ "$_rc" -ne 0 ]; then
        echo "STEP $_name OK rc=$_rc $(echo "$_out" | tr '\n' ' ')"
    else
        : >/tmp/step-failed
        echo "STEP $_name FAIL rc=0 unexpectedly succeeded $(echo "$_out" | tr '\n' ' ')"
    fi
    return 0
}

# has_stat PATH key=value...: succeeds when `gtool stat PATH` shows every key=value given.
has_stat() {
    _p=$1
    shift
    _s=$(gtool stat "$_p") || return 1
    echo "$_s"
    for _kv in "$@"; do
        case " $_s " in
            *" $_kv "*) ;;
            *) echo "want $_kv"; return 1 ;;
        esac
    done
    return 0
}

# same NAME EXPECTED ACTUAL: succeeds when the two strings are equal, says both when not.
same() {
    if [ "$2" = "$3" ]; then
        return 0
    fi
    echo "$1: expected [$2] got [$3]"
    return 1
}

# A file, not a variable: steps run inside the script's subshell, whose variables do not come back.
rm -f /tmp/step-failed
for _m in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$_m" || { echo "GUEST-ERROR insmod $_m"; : >/tmp/step-failed; }
done

M=/mnt
export M
if step mount mount -t 9p -o trans=virtio,version=9p2000.L share "$M"; then
    # A subshell, so that `exit` or `cd` in the script cannot skip the unmount and power-off below.
    # The functions above are inherited by the subshell.
    ( . /guest/script.sh )
    cd /
    step umount umount "$M"
fi

if [ -e /tmp/step-failed ]; then
    dmesg | tail -n 20 | while IFS= read -r _line; do echo "DMESG $_line"; done
fi
echo "GUEST-DONE"
poweroff -f
# Not reached unless poweroff fails; the host's timeout then ends QEMU.
sleep 5
