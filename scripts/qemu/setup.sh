#!/usr/bin/env bash
# Prepare the QEMU/TCG Linux NVMe/TCP initiator harness (idempotent).
#
#  1. installs the host tools it needs (qemu-system-x86, passt, cpio, kmod, binutils, zstd)
#  2. `apt-get download`s (never installs) Debian's current linux-image-amd64 kernel image
#     package, busybox-static, nvme-cli, fio, bash, kmod, cryptsetup and every package
#     providing a shared library those binaries load (found by walking ELF NEEDED entries)
#  3. builds $NVSEAL_QEMU_CACHE/initramfs.cpio (uncompressed) and unpacks the kernel's ELF
#     image to $NVSEAL_QEMU_CACHE/vmlinux (booted through its PVH entry point)
#
# Re-running it with nothing changed does nothing. Set NVSEAL_QEMU_REBUILD=1 to force the
# initramfs to be rebuilt from the cached packages. Must run as root on Debian 12 (apt-get,
# mknod, chroot check); only Debian's package mirror needs to be reachable.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

ARCH_DIR=x86_64-linux-gnu
# Root packages whose binaries go into the guest. kmod gives the guest a real modprobe
# (aliases, softdeps, request_module from the kernel); busybox provides everything else.
# cryptsetup opens an nvseal volume with dm-crypt (docs/on-disk-format.md §6) in the
# Linux-initiator test.
ROOT_BINS=(
    "bash:bin/bash"
    "nvme-cli:usr/sbin/nvme"
    "fio:usr/bin/fio"
    "kmod:bin/kmod"
    "cryptsetup-bin:sbin/cryptsetup"
)
# Modules the guest needs, dependencies are added by modprobe --show-depends.
# nvme-tcp pulls nvme-fabrics, nvme-core, t10-pi, crc-t10dif, crc64-rocksoft; the crypto
# drivers behind those (looked up by crypto API name at load time) and crc32c (NVMe/TCP
# header/data digests) are listed explicitly because they are not hard module deps.
GUEST_MODULES=(
    nvme-tcp
    virtio_pci virtio_net e1000
    crc32c_generic crc32c-intel
    crct10dif_generic crct10dif-pclmul
    crc64_rocksoft_generic
    # Not loaded by /init: the kernel's own NVMe/TCP target and a RAM disk, so a guest script
    # can stand up a reference target on 127.0.0.1 (the self-test does).
    nvmet-tcp brd
    # Not loaded by /init either: read-only virtio disks (a backing file the host attaches) and
    # dm-crypt with AES-XTS (aes_generic is built in; xts wraps ecb(aes)), plus the AF_ALG
    # socket cryptsetup checks a cipher with, for `cryptsetup open --type plain`.
    virtio_blk dm-crypt xts ecb aesni-intel algif_skcipher
    # Not loaded by /init either: the user-space I/O drivers SPDK's NVMe driver reaches an
    # emulated NVMe SSD through (tests/spdk_nvme.rs, scripts/qemu/guest/spdk-pcie.sh).
    uio_pci_generic vfio-pci
)

DEBS="$NVSEAL_QEMU_CACHE/debs"
PKGS="$NVSEAL_QEMU_CACHE/pkgs"
ROOTFS="$NVSEAL_QEMU_CACHE/rootfs"

[ "$(id -u)" = 0 ] || die "setup.sh must run as root (apt-get, mknod, chroot)"
mkdir -p "$DEBS" "$PKGS"

# ---------------------------------------------------------------- host tools and apt lists
# (Captured first: with pipefail, `grep -q` closing the pipe early fails the pipeline.)
apt_lists_ok() {
    local policy
    policy="$(apt-cache policy linux-image-amd64 2>/dev/null)"
    grep -q 'Candidate: [0-9]' <<<"$policy"
}
APT_UPDATED=0
apt_update() {
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update ($1)"
        apt-get update -qq
        APT_UPDATED=1
    fi
}
apt_lists_ok || apt_update "no package lists"

HOST_PKGS=(qemu-system-x86 passt cpio kmod binutils xz-utils zstd libc-bin python3)
missing_host=()
for p in "${HOST_PKGS[@]}"; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] ||
        missing_host+=("$p")
done
if [ ${#missing_host[@]} -gt 0 ]; then
    log "installing host packages: ${missing_host[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing_host[@]}" >/dev/null ||
        { apt_update "install failed"; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "${missing_host[@]}" >/dev/null; }
fi

# ---------------------------------------------------------------- package download/extract
# The image package linux-image-amd64 points at (e.g. linux-image-6.1.0-56-amd64).
resolve_kpkg() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        awk '/^ *Depends: linux-image-[0-9]/ {print $2; exit}'
}

declare -A FETCHED=()
# deb_file PKG -> file name apt would download for the candidate version.
deb_file() {
    apt-get download --print-uris "$1" 2>/dev/null | awk 'NR==1 {print $2}'
}
# fetch PKG [root]: download (once) and extract into $PKGS/PKG/. Returns 1 for a name that
# has no downloadable candidate even after the package lists were refreshed.
fetch() {
    local pkg="$1" file
    [ -n "${FETCHED[$pkg]:-}" ] && return 0
    file="$(deb_file "$pkg")"
    if [ -z "$file" ]; then
        # A stale package list can name a version the mirror dropped (a security update of a
        # library replaced it): refresh the lists once (apt_update runs at most once) for any
        # package, dependency or root, before deciding it has no candidate.
        apt_update "no candidate for $pkg"
        file="$(deb_file "$pkg")"
        [ -n "$file" ] || return 1
    fi
    if [ ! -s "$DEBS/$file" ]; then
        log "download $file"
        (cd "$DEBS" && apt-get download -qq "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
        if [ ! -s "$DEBS/$file" ]; then
            # A stale package list names a version the mirror dropped: refresh once, retry.
            apt_update "download of $file failed"
            file="$(deb_file "$pkg")"
            [ -n "$file" ] || return 1
            (cd "$DEBS" && apt-get download -qq "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
            [ -s "$DEBS/$file" ] || return 1
        fi
    fi
    extract "$pkg" "$file"
}
# extract PKG FILE: unpack debs/FILE into pkgs/PKG/ unless that version is already there.
extract() {
    local pkg="$1" file="$2"
    if [ "$(cat "$PKGS/$pkg/.deb" 2>/dev/null)" != "$file" ]; then
        rm -rf "${PKGS:?}/$pkg"
        mkdir -p "$PKGS/$pkg"
        dpkg-deb -x "$DEBS/$file" "$PKGS/$pkg"
        echo "$file" >"$PKGS/$pkg/.deb"
    fi
    FETCHED[$pkg]=1
}
# Hard dependencies (Depends/PreDepends) of PKG's candidate, virtual names skipped.
hard_deps() {
    apt-cache depends --important "$1" 2>/dev/null |
        awk '/^ *\|?(Pre)?Depends: [^<]/ {print $2}' | sed 's/:any$//' | sort -u
}
# fetch_deps PKG: fetch every hard dependency of PKG (once per PKG). Batched: one apt call
# names all the files and one downloads the missing ones, since each apt start costs ~1 s
# here; any package the batch could not handle goes through fetch() on its own.
declare -A DEPS_DONE=()
fetch_deps() {
    local owner="$1" d f uris
    local -a want=() missing=()
    local -A file_of=()
    [ -n "${DEPS_DONE[$owner]:-}" ] && return 0
    DEPS_DONE[$owner]=1
    for d in $(hard_deps "$owner"); do
        [ -z "${FETCHED[$d]:-}" ] && want+=("$d")
    done
    [ ${#want[@]} -gt 0 ] || return 0
    if uris="$(apt-get download --print-uris "${want[@]}" 2>/dev/null)"; then
        # Lines are: 'URI' FILE SIZE HASH; FILE starts with "<package>_".
        while read -r _ f _; do
            [ -n "$f" ] && file_of[${f%%_*}]="$f"
        done <<<"$uris"
        for d in "${want[@]}"; do
            f="${file_of[$d]:-}"
            [ -n "$f" ] && [ ! -s "$DEBS/$f" ] && missing+=("$d")
        done
        if [ ${#missing[@]} -gt 0 ]; then
            log "download ${missing[*]}"
            (cd "$DEBS" && apt-get download -qq "${missing[@]}" 2>&1 |
                grep -v '^W: Download is performed unsandboxed' >&2 || true)
        fi
        for d in "${want[@]}"; do
            f="${file_of[$d]:-}"
            [ -n "$f" ] && [ -s "$DEBS/$f" ] && extract "$d" "$f"
        done
    fi
    for d in "${want[@]}"; do fetch "$d" || true; done
}

KPKG="$(resolve_kpkg)"
if [ -z "$KPKG" ] || ! fetch "$KPKG" root; then
    # Stale lists can name an ABI the mirror no longer has: refresh and resolve again.
    apt_update "kernel package ${KPKG:-unresolved}"
    KPKG="$(resolve_kpkg)"
    [ -n "$KPKG" ] || die "cannot resolve linux-image-amd64 to an image package"
    fetch "$KPKG" root || die "cannot download $KPKG"
fi
fetch busybox-static root || die "cannot download busybox-static"
for rb in "${ROOT_BINS[@]}"; do fetch "${rb%%:*}" root || die "cannot download ${rb%%:*}"; done
fetch libc6 root || die "cannot download libc6"

KVER="$(ls "$PKGS/$KPKG/lib/modules")"
[ -d "$PKGS/$KPKG/lib/modules/$KVER/kernel" ] || die "no modules in $KPKG"

# ---------------------------------------------------------------- up-to-date check
fingerprint() {
    {
        cat "$QEMU_DIR/setup.sh" "$QEMU_DIR/init" "$QEMU_DIR/common.sh"
        for p in $(printf '%s\n' "${!FETCHED[@]}" | sort); do echo "$p $(cat "$PKGS/$p/.deb")"; done
    } | sha256sum | cut -d' ' -f1
}
FP="$(fingerprint)"
if [ "${NVSEAL_QEMU_REBUILD:-0}" != 1 ] && [ -s "$INITRAMFS_IMG" ] && [ -s "$KERNEL_IMG" ] &&
    grep -qx "fingerprint=$FP" "$BUILD_INFO" 2>/dev/null; then
    log "up to date: $(grep '^kernel=' "$BUILD_INFO"), $INITRAMFS_IMG"
    exit 0
fi

# ---------------------------------------------------------------- build the guest root
log "building guest root in $ROOTFS (kernel $KVER)"
rm -rf "$ROOTFS"
mkdir -p "$ROOTFS"/{usr/bin,usr/sbin,usr/lib/$ARCH_DIR,usr/lib64,dev,proc,sys,tmp,run,root,etc/nvme,mnt,var/tmp}
# Merged /usr, as on a Debian 12 host: every /bin, /sbin, /lib, /lib64 path resolves.
ln -s usr/bin "$ROOTFS/bin"
ln -s usr/sbin "$ROOTFS/sbin"
ln -s usr/lib "$ROOTFS/lib"
ln -s usr/lib64 "$ROOTFS/lib64"
chmod 1777 "$ROOTFS/tmp" "$ROOTFS/var/tmp"

# Path inside a package -> path inside the merged-/usr guest root.
merged() {
    local p="${1#./}"
    p="${p#/}"
    case "$p" in
        bin/* | sbin/* | lib/* | lib64/*) echo "usr/$p" ;;
        *) echo "$p" ;;
    esac
}

# copy_from PKG RELPATH: copy a file (following symlink chains, keeping each link) from the
# extracted package into the guest root at its merged path. Echoes the final real file.
copy_from() {
    local pkg="$1" rel="${2#/}" src dst tgt
    while :; do
        src="$PKGS/$pkg/$rel"
        dst="$ROOTFS/$(merged "$rel")"
        if [ ! -e "$dst" ] && [ ! -L "$dst" ]; then
            mkdir -p "$(dirname "$dst")"
            cp -a "$src" "$dst"
        fi
        if [ -L "$src" ]; then
            tgt="$(readlink "$src")"
            case "$tgt" in
                /*) rel="${tgt#/}" ;;
                *) rel="$(dirname "$rel")/$tgt" ;;
            esac
            # The link target may live in another package (e.g. libc6's /lib64 ld.so link).
            if [ ! -e "$PKGS/$pkg/$rel" ] && [ ! -L "$PKGS/$pkg/$rel" ]; then
                pkg="$(owner_of "$rel")" || die "dangling link $src -> $tgt"
            fi
        else
            echo "$pkg:$rel"
            return 0
        fi
    done
}
owner_of() {
    local p
    for p in "${!FETCHED[@]}"; do
        if [ -e "$PKGS/$p/$1" ] || [ -L "$PKGS/$p/$1" ]; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

LIB_DIRS=("lib/$ARCH_DIR" "usr/lib/$ARCH_DIR" lib64 usr/lib64 lib usr/lib)
# find_lib SONAME [RUNPATH-DIRS...] -> "pkg:relpath" of the first fetched package holding it.
find_lib() {
    local so="$1" d p
    shift
    for d in "$@" "${LIB_DIRS[@]}"; do
        d="${d#/}"
        for p in "${!FETCHED[@]}"; do
            if [ -e "$PKGS/$p/$d/$so" ]; then
                echo "$p:$d/$so"
                return 0
            fi
        done
    done
    return 1
}

# Walk the ELF dependency graph from the root binaries. When a library is not in any fetched
# package, fetch the hard dependencies of the package that owns the binary asking for it
# (Debian's shlibs make every NEEDED library come from a direct dependency), then retry.
declare -A SEEN=()
queue=()
for rb in "${ROOT_BINS[@]}"; do queue+=("${rb%%:*}:${rb#*:}"); done
while [ ${#queue[@]} -gt 0 ]; do
    item="${queue[0]}"
    queue=("${queue[@]:1}")
    [ -n "${SEEN[$item]:-}" ] && continue
    SEEN[$item]=1
    pkg="${item%%:*}"
    real="$(copy_from "$pkg" "${item#*:}")"
    rpkg="${real%%:*}"
    file="$PKGS/$rpkg/${real#*:}"
    dyn="$(readelf -d "$file" 2>/dev/null || true)"
    interp="$(readelf -l "$file" 2>/dev/null | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')"
    if [ -n "$interp" ]; then
        owner="$(owner_of "${interp#/}")" || die "interpreter $interp not found"
        queue+=("$owner:${interp#/}")
    fi
    mapfile -t runpath < <(sed -n 's/.*Library \(runpath\|rpath\): \[\(.*\)\]/\2/p' <<<"$dyn" | tr ':' '\n')
    # shellcheck disable=SC2013  # sonames contain no spaces
    for so in $(sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' <<<"$dyn"); do
        if ! hit="$(find_lib "$so" "${runpath[@]}")"; then
            fetch_deps "$rpkg"
            hit="$(find_lib "$so" "${runpath[@]}")" ||
                die "$so (needed by ${real#*:} from $rpkg) not found in $rpkg's dependencies"
        fi
        queue+=("$hit")
    done
done

# ld.so cache so the loader finds the multiarch directories without relying on defaults.
printf 'include /etc/ld.so.conf.d/*.conf\n' >"$ROOTFS/etc/ld.so.conf"
mkdir -p "$ROOTFS/etc/ld.so.conf.d"
printf '/usr/lib/%s\n/usr/local/lib\n' "$ARCH_DIR" >"$ROOTFS/etc/ld.so.conf.d/$ARCH_DIR.conf"
ldconfig -r "$ROOTFS"

# kmod's modprobe/insmod/lsmod/modinfo are links to kmod.
for t in usr/sbin/modprobe usr/sbin/insmod usr/sbin/rmmod usr/sbin/lsmod usr/sbin/modinfo usr/sbin/depmod; do
    ln -sf /usr/bin/kmod "$ROOTFS/$t"
done

# busybox: every applet whose name is not already a real binary.
cp "$PKGS/busybox-static/bin/busybox" "$ROOTFS/usr/bin/busybox"
for a in $("$ROOTFS/usr/bin/busybox" --list-full); do
    dst="$ROOTFS/$(merged "$a")"
    [ -e "$dst" ] || [ -L "$dst" ] && continue
    mkdir -p "$(dirname "$dst")"
    ln -s /usr/bin/busybox "$dst"
done

# Minimal /etc so tools that look up users, hosts or protocols behave.
printf 'root:x:0:0:root:/root:/bin/bash\n' >"$ROOTFS/etc/passwd"
printf 'root:x:0:\n' >"$ROOTFS/etc/group"
printf '127.0.0.1 localhost\n10.0.2.2 host\n' >"$ROOTFS/etc/hosts"
echo nvseal-guest >"$ROOTFS/etc/hostname"

# Kernel modules: the closure of GUEST_MODULES, then depmod inside the guest root.
KSRC="$PKGS/$KPKG"
if [ ! -s "$KSRC/lib/modules/$KVER/modules.dep" ]; then
    log "depmod for the staged $KVER tree"
    depmod -b "$KSRC" "$KVER"
fi
modlist="$(for m in "${GUEST_MODULES[@]}"; do
    modprobe -d "$KSRC" -S "$KVER" --show-depends "$m" || die "module $m not found in $KVER"
done | awk '$1 == "insmod" {print $2}' | sort -u)"
for ko in $modlist; do
    rel="lib/modules/${ko#*/lib/modules/}"
    mkdir -p "$ROOTFS/$(dirname "$(merged "$rel")")"
    case "$ko" in
        # Debian 12 ships plain .ko files; later kernels compress them. Store them plain so
        # the guest needs no decompressor and depmod sees the same names.
        *.ko.xz) xz -dc "$ko" >"$ROOTFS/$(merged "${rel%.xz}")" ;;
        *.ko.zst) zstd -qdc "$ko" >"$ROOTFS/$(merged "${rel%.zst}")" ;;
        *) cp "$ko" "$ROOTFS/$(merged "$rel")" ;;
    esac
done
for f in modules.order modules.builtin modules.builtin.modinfo; do
    [ -f "$KSRC/lib/modules/$KVER/$f" ] && cp "$KSRC/lib/modules/$KVER/$f" "$ROOTFS/usr/lib/modules/$KVER/"
done
depmod -b "$ROOTFS" "$KVER"

# /init and a console node (devtmpfs is mounted by /init, but the kernel opens
# /dev/console before that).
install -m 0755 "$QEMU_DIR/init" "$ROOTFS/init"
mknod -m 600 "$ROOTFS/dev/console" c 5 1
mknod -m 666 "$ROOTFS/dev/null" c 1 3

# Prove the user space loads before paying for a boot: run the binaries in a chroot.
for cmd in "/bin/bash -c true" "/usr/sbin/nvme version" "/usr/bin/fio --version" \
    "/sbin/modprobe --version" "/sbin/cryptsetup --version" "/bin/busybox true"; do
    # shellcheck disable=SC2086
    chroot "$ROOTFS" $cmd >/dev/null || die "chroot check failed: $cmd"
done

# ---------------------------------------------------------------- pack
# Uncompressed on purpose: under TCG the guest kernel needs ~2.5 s to unzstd 32 MiB of
# initramfs, while QEMU hands it 95 MiB of plain cpio almost for free.
tmp="$INITRAMFS_IMG.tmp"
(cd "$ROOTFS" && find . -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc --owner=0:0 --quiet) >"$tmp"
mv -f "$tmp" "$INITRAMFS_IMG"

# Kernel: Debian's bzImage decompresses itself (xz), which takes seconds under TCG. QEMU can
# instead load the plain ELF vmlinux through its PVH entry point (CONFIG_PVH=y), so unpack
# the payload here once. Falls back to the bzImage if no PVH-capable ELF comes out.
extract_vmlinux() {
    local img="$1" out="$2" magic off
    for magic in $'\xfd7zXZ\x00' $'\x28\xb5\x2f\xfd' $'\x1f\x8b\x08'; do
        for off in $(LC_ALL=C grep -abo "$magic" "$img" 2>/dev/null | cut -d: -f1 | head -5); do
            case "$magic" in
                *7zXZ*) tail -c +$((off + 1)) "$img" | xz -dc --single-stream >"$out" 2>/dev/null ;;
                $'\x28'*) tail -c +$((off + 1)) "$img" | zstd -qdc >"$out" 2>/dev/null ;;
                *) tail -c +$((off + 1)) "$img" | gzip -dc >"$out" 2>/dev/null ;;
            esac
            # XEN_ELFNOTE_PHYS32_ENTRY (type 0x12) marks the PVH entry point.
            if [ "$(head -c 4 "$out" | od -An -c | tr -d ' ')" = '177ELF' ] &&
                [[ "$(readelf -n "$out" 2>/dev/null)" == *Xen*0x00000012* ]]; then
                return 0
            fi
        done
    done
    return 1
}
if extract_vmlinux "$KSRC/boot/vmlinuz-$KVER" "$KERNEL_IMG.tmp"; then
    KERNEL_KIND="vmlinux (PVH entry)"
else
    log "no PVH ELF inside vmlinuz-$KVER; booting the bzImage (slower under TCG)"
    cp -f "$KSRC/boot/vmlinuz-$KVER" "$KERNEL_IMG.tmp"
    KERNEL_KIND=bzImage
fi
mv -f "$KERNEL_IMG.tmp" "$KERNEL_IMG"
{
    echo "fingerprint=$FP"
    echo "kernel=$KVER"
    echo "kernel_package=$KPKG $(cat "$KSRC/.deb")"
    echo "kernel_image=$KERNEL_KIND"
    echo "initramfs_bytes=$(stat -c %s "$INITRAMFS_IMG")"
    echo "rootfs_bytes=$(du -sb "$ROOTFS" | cut -f1)"
    echo "packages:"
    for p in $(printf '%s\n' "${!FETCHED[@]}" | sort); do echo "  $(cat "$PKGS/$p/.deb")"; done
} >"$BUILD_INFO"
log "built $INITRAMFS_IMG ($(numfmt --to=iec "$(stat -c %s "$INITRAMFS_IMG")")), kernel $KVER"
