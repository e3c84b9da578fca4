#!/usr/bin/env bash
# Runs a command on real KVM when this host has none: inside a machine emulated by QEMU (TCG),
# whose CPU has SVM, running Debian's kernel with kvm_amd. The command sees this host's files
# (the root filesystem shared over 9p, read-write), a fresh /tmp and /dev/shm, loopback up,
# and /dev/kvm. Its exit status is this script's.
#
#   scripts/kvm-emulated.sh make test
#
# What it is for: a host whose /dev/kvm is missing for a reason the session cannot change (the
# kernel's kvm_pvm refusing guests under page-table isolation, a VM without nested
# virtualisation). The tests then run real guests on the Linux KVM of the emulated machine
# ("hardware" flavour, shadow paging), not on PVM; every timing there is meaningless (the
# emulated CPU is 10-50x slower), so benchmarks are not run this way.
#
# Needs root (apt, and a 9p share of / with the files' owners kept), an x86-64 Debian host.
# Kernel and initramfs are cached in build/kvm-emulated/. Environment: HLPOOL_EMU_MEMORY
# (default: half of RAM, at most 8G), HLPOOL_EMU_CPUS (default 1: with two emulated CPUs its kernel
# stalled in 3 of 8 runs here, one CPU no longer taking timer interrupts while it ran guests),
# HLPOOL_EMU_TIMEOUT (seconds, default 5400).
set -euo pipefail
cd "$(dirname "$0")/.."
project=$(pwd)

die() { echo "kvm-emulated: $*" >&2; exit 2; }
(($#)) || die "usage: scripts/kvm-emulated.sh COMMAND [ARG...]"
[ "$(uname -m)" = x86_64 ] || die "needs an x86-64 host (it emulates an x86-64 machine with SVM)"
[ "$(id -u)" -eq 0 ] || die "needs root (installs packages, shares / with the emulated machine)"
command -v dpkg >/dev/null || die "needs a Debian host (it uses Debian's kernel package)"

missing=()
for pkg in qemu-system-x86 busybox-static cpio xz-utils kmod; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "kvm-emulated: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

cache=$project/build/kvm-emulated
mkdir -p "$cache"

# The kernel: Debian's current one, unpacked here (never installed into this host's /boot).
if [ ! -f "$cache/vmlinuz" ] || [ ! -f "$cache/initrd.gz" ]; then
    echo "kvm-emulated: fetching Debian's kernel package"
    rm -rf "$cache/kernel" && mkdir -p "$cache/kernel"
    package=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -1)
    if [ -z "$package" ]; then
        apt-get update -qq
        package=$(apt-cache depends linux-image-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -1)
    fi
    [ -n "$package" ] || die "no Debian kernel package found (apt-cache depends linux-image-amd64)"
    (cd "$cache/kernel" && apt-get download -qq -o APT::Sandbox::User=root "$package" && dpkg-deb -x ./*.deb root)
    release=$(ls "$cache/kernel/root/lib/modules" | head -1)
    modules=$cache/kernel/root/lib/modules/$release
    depmod -b "$cache/kernel/root" "$release"  # the package ships no modules.dep
    cp "$cache/kernel/root/boot/vmlinuz-$release" "$cache/vmlinuz.new"

    # The initramfs: busybox, the modules for virtio 9p and kvm_amd (with what they depend on,
    # in load order), and an init that mounts this host's / and runs the command there.
    initramfs=$cache/initramfs
    rm -rf "$initramfs" && mkdir -p "$initramfs"/{bin,proc,sys,dev,newroot,modules}
    cp /bin/busybox "$initramfs/bin/busybox"
    for tool in sh mount insmod switch_root cat echo sed; do ln -s busybox "$initramfs/bin/$tool"; done
    : >"$initramfs/modules/order"
    add_module() {  # add_module PATH-IN-modules.dep: its dependencies first, each once
        local path=$1 dep name
        name=$(basename "${path%.xz}" .ko)
        grep -qx "$name" "$initramfs/modules/order" && return 0
        for dep in $(sed -n "s|^$path: *||p" "$modules/modules.dep"); do add_module "$dep"; done
        case "$path" in
            *.xz) xz -dc "$modules/$path" >"$initramfs/modules/$name.ko" ;;
            *) cp "$modules/$path" "$initramfs/modules/$name.ko" ;;
        esac
        echo "$name" >>"$initramfs/modules/order"
    }
    for module in virtio_pci 9pnet_virtio 9p kvm-amd; do
        path=$(grep -o "^[^:]*/$module\.ko\(\.xz\)\?:" "$modules/modules.dep" | head -1 | tr -d :)
        [ -n "$path" ] || die "module $module is not in $package"
        add_module "$path"
    done
    cat >"$initramfs/init" <<'EOF'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for name in $(cat /modules/order); do
    options=""
    # Shadow paging: under QEMU 7.2's emulated nested paging the guests read wrong bytes from
    # read-only memory slots (hlpool's boot page); shadow paging is what PVM does too.
    [ "$name" = kvm-amd ] && options="npt=0"
    insmod "/modules/$name.ko" $options || echo "kvm-emulated: insmod $name failed"
done
mount -t 9p -o trans=virtio,version=9p2000.L,msize=1048576,cache=mmap,access=any hostroot /newroot \
    || { echo "kvm-emulated: cannot mount the host's root"; echo o >/proc/sysrq-trigger; }
run=$(sed -n 's/.*hlpool_emu_run=\([^ ]*\).*/\1/p' /proc/cmdline)
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
exec switch_root /newroot /bin/bash "$run/guest.sh"
EOF
    chmod +x "$initramfs/init"
    (cd "$initramfs" && find . | cpio -o -H newc 2>/dev/null | gzip -1 >"$cache/initrd.gz.new")
    mv "$cache/vmlinuz.new" "$cache/vmlinuz"
    mv "$cache/initrd.gz.new" "$cache/initrd.gz"
    rm -rf "$cache/kernel" "$initramfs"
fi

# One run's folder: the command, its environment, its exit status. Not under /tmp: the
# emulated machine mounts its own /tmp.
run=$(mktemp -d "$cache/run.XXXXXX")
trap 'rm -rf "$run"' EXIT
{
    printf 'cd %q\n' "$(pwd)"
    # What the command may need of this environment (PATH, HOME, locale, hlpool's and CI's variables).
    while IFS='=' read -r name _; do
        case "$name" in
            PATH|HOME|LANG|LC_*|CI|HLPOOL_*|PYTEST_*|PYTHON*) printf 'export %s=%q\n' "$name" "${!name}" ;;
        esac
    done < <(env)
    printf 'export HLPOOL_KVM_EMULATED=1\n'
    printf '%q ' "$@"
    echo
} >"$run/command.sh"
cat >"$run/guest.sh" <<EOF
#!/bin/bash
# In the emulated machine, as its init: a private /tmp and /dev/shm, loopback up, then the command.
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/shm /dev/pts && mount -t tmpfs tmpfs /dev/shm && mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
ip link set lo up
hostname localhost
bash "$run/command.sh" >"$run/output" 2>&1 </dev/null
echo \$? >"$run/status"
sync
echo o >/proc/sysrq-trigger
EOF
: >"$run/output"

memory=${HLPOOL_EMU_MEMORY:-$(awk '/MemTotal/ { m = int($2 / 2 / 1048576); if (m > 8) m = 8; if (m < 2) m = 2; print m "G" }' /proc/meminfo)}
cpus=${HLPOOL_EMU_CPUS:-1}
echo "kvm-emulated: running '$*' in an emulated machine ($cpus CPU(s), $memory, KVM: kvm_amd on QEMU TCG)"
tail -n +1 -f "$run/output" &
tailer=$!
status=0
timeout "${HLPOOL_EMU_TIMEOUT:-5400}" qemu-system-x86_64 \
    -accel tcg,thread=multi,tb-size=1024 -cpu max -smp "$cpus" -m "$memory" \
    -display none -serial "file:$run/console" -monitor none -no-reboot \
    -kernel "$cache/vmlinuz" -initrd "$cache/initrd.gz" \
    -append "console=ttyS0 quiet panic=-1 sysrq_always_enabled hlpool_emu_run=$run" \
    -fsdev local,id=root,path=/,security_model=passthrough,multidevs=remap \
    -device virtio-9p-pci,fsdev=root,mount_tag=hostroot || status=$?
sleep 0.5
kill "$tailer" 2>/dev/null || true
wait "$tailer" 2>/dev/null || true
if [ -s "$run/status" ]; then
    exit "$(cat "$run/status")"
fi
echo "kvm-emulated: the emulated machine stopped without the command's exit status (qemu: $status); its console:" >&2
tail -n 40 "$run/console" >&2 || true
exit 2
