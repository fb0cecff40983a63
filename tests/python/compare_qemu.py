#!/usr/bin/env python3
"""Send the same QMP command sequence to our vmm and to QEMU 7.2, and check that every
reply has the same shape: the same keys and JSON types, recursively (lists compare their
first elements). Values may differ (pids, addresses, device lists).

Usage: compare_qemu.py VMM_SOCKET QEMU_SOCKET WORKDIR
Error replies must be identical (class and desc). Prints one line per command and
SHAPES-OK at the end; exits 1 on a mismatch.
"""
import json
import os
import socket
import sys

# Commands both implement, with arguments; errors are compared as well (their class and
# the presence of desc).
SEQUENCE = [
    ("query-version", None),
    ("query-status", None),
    ("query-kvm", None),
    ("query-name", None),
    ("query-uuid", None),
    ("query-cpus-fast", None),
    ("query-mice", None),
    ("human-monitor-command", {"command-line": "info mice"}),
    ("stop", None),
    ("query-status", None),
    ("cont", None),
    ("query-status", None),
    ("human-monitor-command", {"command-line": "info status"}),
    ("human-monitor-command", {"command-line": "info name"}),
    ("human-monitor-command", {"command-line": "no-such-command"}),
    ("memsave", {"val": 0, "size": 16, "filename": "@WORKDIR@/mem.bin"}),
    ("pmemsave", {"val": 0, "size": 16, "filename": "@WORKDIR@/pmem.bin"}),
    ("getfd", {"fdname": "x"}),
    ("closefd", {"fdname": "x"}),
    ("no-such-command", None),
    ("query-status", {"bogus": 1}),
    ("memsave", {"val": "zero", "size": 1, "filename": "@WORKDIR@/x"}),
    ("query-status", []),
    ("stop", None),
    ("system_reset", None),
    ("cont", None),
    ("query-block", None),
    ("block_resize", {"device": "d0", "size": 2097152}),
    ("block_resize", {"device": "nope", "size": 2097152}),
    ("block_resize", {"device": "d0", "size": -1}),
    ("block_resize", {"device": "d1", "size": 2097152}),
    ("query-block", None),
    # Networking: user netdevs (no host device needed), a card, the link, the filter.
    ("netdev_add", {"type": "user", "id": "n1"}),
    ("netdev_add", {"type": "user", "id": "n1"}),
    ("netdev_add", {"type": "foo", "id": "n2"}),
    ("netdev_add", {"type": "user"}),
    ("netdev_add", {"id": "n2"}),
    ("netdev_add", {"type": "user", "id": "1x"}),
    ("netdev_add", {"type": "user", "id": "n2", "bogus": 1}),
    ("netdev_add", {"type": "user", "id": "n2", "restrict": "on"}),
    ("netdev_add", {"type": "user", "id": "n2", "hostfwd": [{"str": "bogus"}]}),
    ("netdev_add", {"type": "user", "id": "n2", "net": "bogus"}),
    ("netdev_add", {"type": "user", "id": "n2", "net": "10.0.2.0/24", "host": "10.9.9.9"}),
    ("netdev_add", {"type": "tap", "id": "t1", "fd": "nosuch"}),
    ("netdev_add", {"type": "tap", "id": "t1", "fd": "nosuch", "vnet_hdr": True}),
    ("netdev_add", {"type": "socket", "id": "s1"}),
    ("netdev_add", {"type": "socket", "id": "s1", "listen": "bad"}),
    ("netdev_add", {"type": "socket", "id": "s1", "udp": "127.0.0.1:1"}),
    ("netdev_add", {"type": "stream", "id": "s1", "server": True}),
    ("netdev_add", {"type": "user", "id": "n2", "restrict": True}),
    ("device_add", {"driver": "virtio-net-pci", "netdev": "nosuch", "id": "x"}),
    ("device_add", {"driver": "virtio-net-pci", "netdev": "n1", "id": "nic1"}),
    ("device_add", {"driver": "virtio-net-pci", "netdev": "n1", "id": "nic2"}),
    ("device_add", {"driver": "virtio-net-pci", "netdev": "n2", "id": "nic1"}),
    ("device_add", {"driver": "virtio-net-pci", "netdev": "n2", "id": "nic2",
                    "mac": "zz:00:00:00:00:00"}),
    ("device_add", {"driver": "virtio-net-pci", "netdev": "n2", "id": "nic2",
                    "mac": "52:54:00:ab:cd:ef"}),
    ("human-monitor-command", {"command-line": "info network"}),
    ("set_link", {"name": "nic1", "up": False}),
    ("set_link", {"name": "n2", "up": False}),
    ("set_link", {"name": "nosuch", "up": True}),
    ("set_link", {"name": "nic1"}),
    ("set_link", {"name": "nic1", "up": "yes"}),
    ("query-rx-filter", {"name": "nic1"}),
    ("query-rx-filter", None),
    ("query-rx-filter", {"name": "nosuch"}),
    ("query-rx-filter", {"name": "n1"}),
    ("netdev_del", {"id": "n1"}),
    ("netdev_del", {"id": "n1"}),
    ("netdev_del", {}),
    ("human-monitor-command", {"command-line": "info network"}),
    ("human-monitor-command", {"command-line": "netdev_add user,id=h1"}),
    ("human-monitor-command", {"command-line": "netdev_add user,id=h1"}),
    ("human-monitor-command", {"command-line": "netdev_add user,id=h2,restrict=maybe"}),
    ("human-monitor-command", {"command-line": "set_link h1 off"}),
    ("human-monitor-command", {"command-line": "set_link nosuch off"}),
    ("human-monitor-command", {"command-line": "netdev_del h1"}),
    ("human-monitor-command", {"command-line": "netdev_del h1"}),
    ("human-monitor-command", {"command-line": "info network"}),
    # Display: a bochs-display and a VNC server with password authentication on both.
    ("query-vnc", None),
    ("query-spice", None),
    ("set_password", {"protocol": "vnc", "password": "secret"}),
    ("set_password", {"protocol": "spice", "password": "x"}),
    ("set_password", {"protocol": "bogus", "password": "x"}),
    ("set_password", {"protocol": "vnc", "password": "x", "connected": "bogus"}),
    ("set_password", {"protocol": "vnc"}),
    ("expire_password", {"protocol": "vnc", "time": "+60"}),
    ("expire_password", {"protocol": "vnc", "time": "never"}),
    ("expire_password", {"protocol": "vnc", "time": "now"}),
    ("expire_password", {"protocol": "vnc", "time": "junk"}),
    ("expire_password", {"protocol": "spice", "time": "now"}),
    ("change-vnc-password", {"password": "abc"}),
    ("screendump", {"filename": "@WORKDIR@/screen.ppm"}),
    ("screendump", {"filename": "@WORKDIR@/screen.png", "format": "png"}),
    ("screendump", {"filename": "/nonexistent/dir/x.ppm"}),
    ("screendump", {"filename": "@WORKDIR@/screen.jpg", "format": "jpg"}),
    ("add_client", {"protocol": "vnc", "fdname": "nope"}),
    ("add_client", {"protocol": "bogus", "fdname": "nope"}),
    ("human-monitor-command", {"command-line": "change vnc password abc"}),
    ("human-monitor-command", {"command-line": "set_password spice x"}),
    ("human-monitor-command", {"command-line": "expire_password vnc never"}),
    ("human-monitor-command", {"command-line": "screendump /nonexistent/y"}),
    ("human-monitor-command", {"command-line": "sendkey frob"}),
    ("human-monitor-command", {"command-line": "info vnc"}),
    # No balloon on either side: QEMU's DeviceNotActive.
    ("query-balloon", None),
    ("balloon", {"value": 0}),
    ("balloon", {"value": "x"}),
    ("balloon", {}),
    ("human-monitor-command", {"command-line": "info balloon"}),
    ("human-monitor-command", {"command-line": "balloon 64"}),
    ("human-monitor-command", {"command-line": "help balloon"}),
    # A balloon plugged on both sides (the guest is stopped: its driver never answers).
    ("device_add", {"driver": "virtio-balloon-pci", "id": "balloon0"}),
    ("device_add", {"driver": "virtio-balloon-pci", "id": "balloon1"}),
    ("device_add", {"driver": "virtio-balloon-pci", "id": "balloon1", "deflate-on-oom": "x"}),
    ("query-balloon", None),
    ("balloon", {"value": 32 << 20}),
    ("balloon", {"value": 0}),
    ("balloon", {"value": -1}),
    ("balloon", {"value": 1.5}),
    ("balloon", {"value": 1 << 50}),
    ("query-balloon", None),
    ("human-monitor-command", {"command-line": "info balloon"}),
    ("human-monitor-command", {"command-line": "balloon 32"}),
    ("human-monitor-command", {"command-line": "balloon 0"}),
    ("human-monitor-command", {"command-line": "balloon abc"}),
    ("human-monitor-command", {"command-line": "balloon -5"}),
    ("human-monitor-command", {"command-line": "balloon"}),
    ("human-monitor-command", {"command-line": "balloon 1.5"}),
    ("human-monitor-command", {"command-line": "balloon 99999999"}),
    ("qom-get", {"path": "/machine/peripheral/balloon0", "property": "guest-stats"}),
    ("qom-get", {"path": "/machine/peripheral/balloon0",
                 "property": "guest-stats-polling-interval"}),
    ("qom-set", {"path": "/machine/peripheral/balloon0",
                 "property": "guest-stats-polling-interval", "value": 2}),
    ("qom-get", {"path": "balloon0", "property": "guest-stats-polling-interval"}),
    ("qom-set", {"path": "balloon0", "property": "guest-stats-polling-interval", "value": -1}),
    ("qom-set", {"path": "balloon0", "property": "guest-stats-polling-interval",
                 "value": 1 << 32}),
    ("qom-set", {"path": "balloon0", "property": "guest-stats-polling-interval",
                 "value": "often"}),
    ("qom-set", {"path": "balloon0", "property": "guest-stats-polling-interval",
                 "value": 0}),
    ("qom-set", {"path": "balloon0", "property": "guest-stats", "value": 1}),
    ("qom-set", {"path": "balloon0", "property": "guest-stats-polling-interval"}),
    ("qom-get", {"path": "/machine/peripheral/balloon0", "property": "nope"}),
    ("qom-get", {"path": "/machine/peripheral/balloon0", "property": "type"}),
    ("qom-get", {"path": "/machine/peripheral/balloon0/virtio-backend", "property": "type"}),
    ("qom-get", {"path": "/machine/peripheral/nope", "property": "type"}),
    ("qom-get", {"path": "balloon0"}),
    # Migration: the commands QEMU 7.2 still has, before any migration and their errors.
    ("query-migrate", None),
    ("migrate_cancel", None),
    ("query-migrate-capabilities", None),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]}),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "bogus", "state": True}]}),
    ("migrate-set-parameters", {"downtime-limit": 100, "max-bandwidth": 33554432}),
    ("migrate-set-parameters", {"downtime-limit": 3000000}),
    ("client_migrate_info", {"protocol": "spice", "hostname": "h", "port": 1}),
    ("client_migrate_info", {"protocol": "bogus", "hostname": "h"}),
    ("migrate", {"uri": "bogus:x"}),
    ("migrate", {"uri": "fd:nope"}),
    ("migrate", {}),
    ("migrate-incoming", {"uri": "tcp:127.0.0.1:1"}),
    ("human-monitor-command", {"command-line": "help migrate"}),
    ("human-monitor-command", {"command-line": "help migrate_cancel"}),
    ("human-monitor-command", {"command-line": "help migrate_incoming"}),
    ("human-monitor-command", {"command-line": "migrate"}),
    ("human-monitor-command", {"command-line": "migrate_cancel"}),
]

# Commands whose whole reply, not just its shape, is the same for the same machine.
SAME_VALUE = {"query-mice", "query-status", "query-name", "query-uuid", "query-rx-filter",
              "set_link", "netdev_del", "query-spice", "set_password", "expire_password",
              "change-vnc-password", "screendump", "add_client", "query-balloon", "balloon",
              "qom-get", "qom-set", "query-migrate", "migrate_cancel",
              "migrate-set-capabilities", "migrate-set-parameters", "client_migrate_info",
              "migrate", "migrate-incoming"}
# HMP commands whose output is the same.
SAME_HMP = {"info network", "set_link h1 off", "set_link nosuch off", "netdev_del h1",
            "netdev_add user,id=h1", "netdev_add user,id=h2,restrict=maybe",
            "change vnc password abc", "set_password spice x", "expire_password vnc never",
            "screendump /nonexistent/y", "sendkey frob", "info balloon", "balloon 64",
            "help balloon", "balloon 32", "balloon 0", "balloon abc", "balloon -5", "balloon",
            "balloon 1.5", "balloon 99999999", "help migrate", "help migrate_cancel",
            "help migrate_incoming", "migrate", "migrate_cancel"}


def shape(value):
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "number"
    if value is None:
        return "null"
    return "str"


class Client:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.buf = b""
        self.greeting = self.message()

    def message(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("monitor closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def run(self, command, args):
        msg = {"execute": command}
        if args is not None:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode())
        while True:
            reply = self.message()
            if "event" not in reply:
                return reply


def compare(name, ours, theirs):
    a, b = shape(ours), shape(theirs)
    if a == b:
        return True
    print(f"MISMATCH {name}:\n  vmm:  {json.dumps(a)}\n  qemu: {json.dumps(b)}")
    return False


def main(vmm_path, qemu_path, workdir):
    vmm, qemu = Client(vmm_path), Client(qemu_path)
    ok = compare("greeting", vmm.greeting, qemu.greeting)
    ok &= compare("qmp_capabilities", vmm.run("qmp_capabilities", None),
                  qemu.run("qmp_capabilities", None))
    for command, args in SEQUENCE:
        if args is not None:
            args = json.loads(json.dumps(args).replace("@WORKDIR@", workdir))
        ours, theirs = vmm.run(command, args), qemu.run(command, args)
        same = command in SAME_VALUE or (
            command == "human-monitor-command" and args["command-line"] in SAME_HMP)
        if same and ours != theirs:
            print(f"MISMATCH {command} {args}: vmm {ours} qemu {theirs}")
            ok = False
        # Errors must match exactly: class and description.
        if ("error" in ours or "error" in theirs) and ours != theirs:
            print(f"MISMATCH {command}: vmm {ours} qemu {theirs}")
            ok = False
        ok &= compare(command, ours, theirs)
        print(f"{command}: {'same shape' if shape(ours) == shape(theirs) else 'DIFFERENT'}")
    if not ok:
        sys.exit(1)
    print("SHAPES-OK")


main(sys.argv[1], sys.argv[2], sys.argv[3])
