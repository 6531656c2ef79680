#!/usr/bin/env python3
"""What the kernel charges for a TAP device's life, the figures behind wsnic's TAP reaper and
spare TAPs (docs/design.md, "Why a reaper"). Run it as root inside a namespace of its own:

    ip netns add tapcost && ip netns exec tapcost python3 benches/tap_cost.py; ip netns del tapcost

It creates N TAPs (TUNSETIFF), attaches them to a bridge and sets them up (one `ip -batch`),
then removes them three ways: by closing each descriptor (what a plain close on the event loop
costs), and by deleting a whole device group with one request before closing (the reaper's way).
Last, the kernel memory of a busy client's NAPI thread (`tap_threads`, docs/design.md): N TAPs
opened with IFF_NAPI, then each given its thread through sysfs (`ip netns exec` mounts the
namespace's own /sys); the growth of KernelStack and Slab in /proc/meminfo, per TAP (the rest
of the machine moves these too: read it on a quiet machine, and more than once).
"""
import fcntl
import os
import struct
import subprocess
import time

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_NAPI = 0x0002, 0x1000, 0x0010
N = 50


def create(n, flags=0):
    fds = []
    for i in range(n):
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", b"tc%d" % i, IFF_TAP | IFF_NO_PI | flags))
        fds.append(fd)
    return fds


def attach(n, group=None):
    extra = " group %d" % group if group else ""
    with open("/tmp/tap_cost.batch", "w") as f:
        f.write("".join("link set tc%d master tcbr0%s up\n" % (i, extra) for i in range(n)))
    subprocess.run(["ip", "-batch", "/tmp/tap_cost.batch"], check=True)


def meminfo_kib(keys):
    d = {}
    for line in open("/proc/meminfo"):
        k, v = line.split(":")
        d[k] = int(v.split()[0])
    return [d[k] for k in keys]


def each_us(t0, t1, n):
    return (t1 - t0) / n * 1e6


subprocess.run("ip link add tcbr0 type bridge && ip link set tcbr0 up", shell=True, check=True)

t0 = time.perf_counter()
fds = create(N)
t1 = time.perf_counter()
attach(N)
t2 = time.perf_counter()
for fd in fds:
    os.close(fd)
t3 = time.perf_counter()
print("create: %.0f us per TAP; attach + up (ip -batch): %.0f us per TAP" % (each_us(t0, t1, N), each_us(t1, t2, N)))
print("close, attached and up: %.0f us per TAP" % each_us(t2, t3, N))

fds = create(N)
t0 = time.perf_counter()
for fd in fds:
    os.close(fd)
print("close, never attached: %.0f us per TAP" % each_us(t0, time.perf_counter(), N))

fds = create(N)
attach(N, group=77)
t0 = time.perf_counter()
subprocess.run(["ip", "link", "delete", "group", "77"], check=True)
t1 = time.perf_counter()
for fd in fds:
    os.close(fd)
t2 = time.perf_counter()
print("delete group of %d: %.0f us in all (%.0f us per TAP), then close: %.0f us per TAP"
      % (N, (t1 - t0) * 1e6, each_us(t0, t1, N), each_us(t1, t2, N)))
subprocess.run(["ip", "link", "delete", "tcbr0"], check=True)

KEYS = ["KernelStack", "Slab"]
fds = create(N, IFF_NAPI)
time.sleep(0.5)
before = meminfo_kib(KEYS)
for i in range(N):
    with open("/sys/class/net/tc%d/threaded" % i, "w") as f:
        f.write("1")
time.sleep(0.5)
after = meminfo_kib(KEYS)
print("NAPI thread per TAP: " + ", ".join("%s +%.1f KiB" % (k, (b - a) / N) for k, a, b in zip(KEYS, before, after)))
for fd in fds:
    os.close(fd)
