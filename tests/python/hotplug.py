#!/usr/bin/env python3
"""Hot-plug through the real python client, qemu.qmp, as management software does it.

The vmm was started with -S. Over stdin/stdout the Rust test (tests/tests/emu_hotplug.rs)
checks the guest between the steps:
  1. while the machine waits in prelaunch: HMP drive_add, then device_add virtio-blk-pci;
     the device is in query-pci at once; cont; print PLUGGED.
  2. on a GO line: device_del; wait for DEVICE_DELETED with an EventListener; the device
     is gone from query-pci; print DELETED.
  3. on a GO line: a second drive_add/device_add, now while the guest runs; print PLUGGED;
     on a GO line: device_del and DEVICE_DELETED again; print DELETED, then PY-OK.

Usage: hotplug.py SOCKET IMAGE
"""
import asyncio
import sys

from qemu.qmp import EventListener, QMPClient

EVENT_TIMEOUT = 120


def pci_ids(buses):
    return {d.get("qdev_id") for bus in buses for d in bus["devices"]}


async def wait_go():
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    assert line.strip() == "GO", f"expected GO, got {line!r}"


async def plug(qmp, image, drive, device):
    out = await qmp.execute(
        "human-monitor-command",
        {"command-line": f"drive_add 0 file={image},if=none,id={drive},format=raw"},
    )
    assert out == "OK\r\n", out
    reply = await qmp.execute(
        "device_add", {"driver": "virtio-blk-pci", "drive": drive, "id": device}
    )
    assert reply == {}, reply
    assert device in pci_ids(await qmp.execute("query-pci"))


async def unplug(qmp, device):
    listener = EventListener("DEVICE_DELETED")
    with qmp.listen(listener):
        assert await qmp.execute("device_del", {"id": device}) == {}
        event = await asyncio.wait_for(listener.get(), timeout=EVENT_TIMEOUT)
    assert event["data"]["device"] == device, event
    assert event["data"]["path"] == f"/machine/peripheral/{device}", event
    assert device not in pci_ids(await qmp.execute("query-pci"))


async def main(socket_path, image):
    qmp = QMPClient("vmm-hotplug")
    await qmp.connect(socket_path)
    status = await qmp.execute("query-status")
    assert status["status"] == "prelaunch", status

    await plug(qmp, image, "pydrive", "pydisk")
    await qmp.execute("cont")
    print("PLUGGED", flush=True)

    await wait_go()
    await unplug(qmp, "pydisk")
    print("DELETED", flush=True)

    await wait_go()
    await plug(qmp, image, "pydrive2", "pydisk2")
    print("PLUGGED", flush=True)
    await wait_go()
    await unplug(qmp, "pydisk2")
    print("DELETED", flush=True)

    await qmp.disconnect()
    print("PY-OK", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
