#!/bin/sh
# deploy/image-rootfs.sh ROOTFS BINARY
#
# Assembles the image's whole file tree in ROOTFS (deploy/Dockerfile copies
# it onto an empty image): BINARY as /usr/local/bin/kube-uproxy, the
# programs it runs, every shared library they load (their `ldd` closure,
# with glibc's loader) and the few data files they read, copied from the
# machine this runs on, which must have them installed (Debian:
# nftables iproute2 iptables ipset ipvsadm netbase). Nothing else: no shell,
# no package manager, no CA bundle (in a pod the API server's CA is the
# mounted ServiceAccount's, or the kubeconfig's).
#
# Why these (docs/operations.md, "The image"):
# - nft and ip: the proxy's rules and its address on lo (src/rules/nft.rs,
#   src/rules/host.rs).
# - iptables-nft and iptables-legacy (save and restore, IPv4 and IPv6),
#   ipset, ipvsadm, ip: --cleanup-kube-proxy reads and removes kube-proxy's
#   iptables- and IPVS-mode rules with them (src/rules/kube_proxy.rs).
#   iptables loads its match and target modules from xtables/ with dlopen
#   (kube-proxy's rules use comment, mark, conntrack, statistic, recent,
#   set, addrtype, DNAT, MASQUERADE, REJECT, ...): `ldd` cannot see them, so
#   the whole directory comes along, with their own libraries.
# - /etc/iproute2 (ip's and nft's names of tables and protocols),
#   /etc/protocols and /etc/services (nft prints and parses protocol and
#   service names through them), a minimal /etc/nsswitch.conf (glibc 2.34+
#   has the files and dns lookups built in: no libnss_* to copy).
#
# The same script builds the image for amd64 and arm64: the library
# directory is the running machine's multiarch one (x86_64-linux-gnu,
# aarch64-linux-gnu), and `ldd` is that architecture's. Run as the target
# architecture (the Dockerfile's runtime stage is). tests/image_rootfs.rs
# runs it on the test machine and runs every program inside the tree
# (chroot), then measures the packed tree (< 30 MB compressed).
set -eu

if [ "$#" -ne 2 ]; then
  echo "usage: $0 ROOTFS BINARY" >&2
  exit 2
fi
ROOT=$1
BINARY=$2
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

die() {
  echo "image-rootfs.sh: $*" >&2
  exit 1
}

case "$(uname -m)" in
  x86_64) multiarch=x86_64-linux-gnu ;;
  aarch64) multiarch=aarch64-linux-gnu ;;
  *) die "unsupported machine $(uname -m) (x86_64, aarch64)" ;;
esac
XTABLES=/usr/lib/$multiarch/xtables

# (`local` is not POSIX but every /bin/sh of Debian has it: dash, bash,
# busybox.)
#
# Recreates, inside ROOT, the symbolic links among the directories of
# path $1 (e.g. Debian's merged /usr: /lib -> usr/lib), so that a file
# copied to its canonical place is also found under the name it was asked
# by. Never writes through a link: only canonical (link-free) paths are
# created as directories.
link_dirs() {
  local prefix rest part parent
  prefix=
  rest=${1#/}
  while [ -n "$rest" ]; do
    part=${rest%%/*}
    if [ "$part" = "$rest" ]; then rest=; else rest=${rest#*/}; fi
    prefix=$prefix/$part
    if [ -L "$prefix" ] && [ ! -L "$ROOT$prefix" ]; then
      parent=$(readlink -f "$(dirname "$prefix")")
      mkdir -p "$ROOT$parent"
      ln -s "$(readlink "$prefix")" "$ROOT$parent/$(basename "$prefix")"
      # The link's target, in its turn.
      link_dirs "$(readlink -f "$prefix")"
    fi
  done
  mkdir -p "$ROOT$(readlink -f "$1")"
}

# Copies file $1 into ROOT at the same path, with the links on the way
# (directory links and a chain of file links, e.g. libfoo.so.1 ->
# libfoo.so.1.2.3) recreated as links.
copy() {
  local dir real_dir dest target
  [ -e "$1" ] || die "$1 not found (is its package installed?)"
  dir=$(dirname "$1")
  link_dirs "$dir"
  real_dir=$(readlink -f "$dir")
  dest=$ROOT$real_dir/$(basename "$1")
  if [ -L "$1" ]; then
    target=$(readlink "$1")
    [ -L "$dest" ] || ln -s "$target" "$dest"
    case "$target" in
      /*) copy "$target" ;;
      *) copy "$real_dir/$target" ;;
    esac
  elif [ ! -e "$dest" ]; then
    cp -p "$1" "$dest"
  fi
}

# The shared libraries (and the loader) that ELF file $1 loads, one path a
# line. `ldd` fails on files that are not dynamic executables or libraries.
libraries() {
  out=$(ldd "$1") || die "ldd $1 failed: $out"
  echo "$out" | grep -q 'not found' && die "$1 needs a library that is not installed: $out"
  echo "$out" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
}

which_program() {
  command -v "$1" || die "$1 not found (is its package installed?)"
}

[ -f "$BINARY" ] || die "$BINARY: no such file"
mkdir -p "$ROOT"

# The proxy.
mkdir -p "$ROOT/usr/local/bin"
cp -p "$BINARY" "$ROOT/usr/local/bin/kube-uproxy"

# The programs it runs, by the names it runs them (Debian's iptables names
# are links to two multi-call programs, which they dispatch on).
programs="nft ip ipset ipvsadm"
for family in iptables ip6tables; do
  for backend in nft legacy; do
    programs="$programs $family-$backend $family-$backend-save $family-$backend-restore"
  done
done
elves="$BINARY"
for p in $programs; do
  path=$(which_program "$p")
  copy "$path"
  elves="$elves $(readlink -f "$path")"
done

# iptables' modules.
[ -d "$XTABLES" ] || die "$XTABLES not found (is iptables installed?)"
for m in "$XTABLES"/*.so; do
  copy "$m"
  elves="$elves $m"
done

# Every library of every program and module (once each).
for lib in $(for e in $elves; do libraries "$e"; done | sort -u); do
  copy "$lib"
done

# Data files.
if [ -d /etc/iproute2 ]; then
  link_dirs /etc
  cp -pR /etc/iproute2 "$ROOT/etc/"
fi
for f in /etc/protocols /etc/services; do
  copy "$f"
done
cat >"$ROOT/etc/nsswitch.conf" <<'EOF'
# glibc's built-in files and dns lookups (no libnss_* modules in the image).
hosts:     files dns
networks:  files
protocols: files
services:  files
EOF

# Mount points the runtime would create anyway, and a place for
# iptables-legacy's lock (/run/xtables.lock, the host's, mounted by the
# DaemonSet).
mkdir -p "$ROOT/tmp" "$ROOT/run" "$ROOT/proc" "$ROOT/sys" "$ROOT/dev"
chmod 1777 "$ROOT/tmp"
