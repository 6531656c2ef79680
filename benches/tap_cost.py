#!/usr/bin/env python3
"""What the kernel charges for a TAP device's life, the figures behind wsnic's TAP reaper and
spare TAPs (docs/design.md, "Why a reaper"). Run it as root inside a namespace of its own:

    ip netns add tapcost && ip netns exec tapcost python3 benches/tap_cost.py; ip netns del tapcost

It creates N TAPs (TUNSETIFF), attaches them to a bridge and sets them up (one `ip -batch`),
then removes them three ways: by closing each descriptor (what a plain close on the event loop
costs), and by deleting a whole device group with one request before closing (the reaper's way).
"""
import fcntl
import os
import struct
import subprocess
import time

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
N = 50


def create(n):
    fds = []
    for i in range(n):
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", b"tc%d" % i, IFF_TAP | IFF_NO_PI))
        fds.append(fd)
    return fds


def attach(n, group=None):
    extra = " group %d" % group if group else ""
    with open("/tmp/tap_cost.batch", "w") as f:
        f.write("".join("link set tc%d master tcbr0%s up\n" % (i, extra) for i in range(n)))
    subprocess.run(["ip", "-batch", "/tmp/tap_cost.batch"], check=True)


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
