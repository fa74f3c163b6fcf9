# Sourced by .ci/run and scripts/bench: install the Debian packages the tests
# and the benchmarks run (a fresh machine has none of them; apt-get only runs
# when one is missing).
#   qemu-system-x86 kexec-tools busybox-static: the kernel-VM tests (a real LUO kernel)
#   device-tree-compiler: dtc, to read handover images in tests
#   systemd: systemd-socket-activate, systemd-analyze (socket activation, the units)
#   memcached libmemcached-tools: the cache kvcache is measured and tested against
#   s6: s6-fdholder, the fd holder bench/holders.py compares with luod
system_packages=(qemu-system-x86 kexec-tools busybox-static device-tree-compiler systemd
                 memcached libmemcached-tools s6)
need=()
for pkg in "${system_packages[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
fi
