#!/usr/bin/env python3
"""Drive the vmm with the real python client, qemu.qmp: negotiate, run every command of
the QMP issue with the seed's argument names, check the reply shapes and the STOP,
RESUME, RESET and POWERDOWN events, pass a pipe fd with getfd (checking the vmm's
/proc/PID/fd), close it with closefd, and quit.

Usage: qmp_commands.py SOCKET VMM_PID WORKDIR
Prints PY-OK on success; any failure raises.
"""
import asyncio
import os
import struct
import sys

from qemu.qmp import EventListener, QMPClient


def fd_targets(pid):
    """What the vmm's open fds point at."""
    out = set()
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            out.add(os.readlink(os.path.join(fd_dir, name)))
        except OSError:
            pass  # closed while we looked
    return out


async def expect_event(listener, name):
    event = await asyncio.wait_for(listener.get(), timeout=30)
    assert event["event"] == name, event
    assert isinstance(event["timestamp"]["seconds"], int), event
    return event


async def main(socket_path, pid, workdir):
    qmp = QMPClient("vmm-test")
    await qmp.connect(socket_path)
    assert qmp.greeting.QMP.version["qemu"]["major"] == 7, qmp.greeting

    listener = EventListener(("STOP", "RESUME", "RESET", "POWERDOWN", "SHUTDOWN"))
    with qmp.listen(listener):
        version = await qmp.execute("query-version")
        assert set(version) == {"qemu", "package"}, version
        names = {c["name"] for c in await qmp.execute("query-commands")}
        for needed in ("stop", "cont", "getfd", "closefd", "human-monitor-command"):
            assert needed in names, names

        status = await qmp.execute("query-status")
        assert status == {"status": "running", "singlestep": False, "running": True}, status
        kvm = await qmp.execute("query-kvm")
        assert kvm == {"enabled": False, "present": kvm["present"]}, kvm
        assert await qmp.execute("query-name") == {"name": "pyguest"}
        uuid = await qmp.execute("query-uuid")
        assert uuid == {"UUID": "6c9ef2c4-5a9f-4d4b-9a55-2cbbd7f0b3a1"}, uuid
        chardevs = await qmp.execute("query-chardev")
        assert all({"label", "filename"} <= set(c) for c in chardevs), chardevs
        cpus = await qmp.execute("query-cpus")
        assert [c["CPU"] for c in cpus] == [0], cpus
        assert cpus[0]["thread_id"] > 0 and "pc" in cpus[0], cpus
        fast = await qmp.execute("query-cpus-fast")
        assert fast[0]["cpu-index"] == 0 and fast[0]["thread-id"] > 0, fast
        mice = await qmp.execute("query-mice")
        assert mice == [{"name": "QEMU PS/2 Mouse", "index": 2, "current": True,
                         "absolute": False}], mice
        buses = await qmp.execute("query-pci")
        assert buses[0]["bus"] == 0 and buses[0]["devices"], buses

        await qmp.execute("stop")
        await expect_event(listener, "STOP")
        assert (await qmp.execute("query-status"))["status"] == "paused"
        await qmp.execute("cont")
        await expect_event(listener, "RESUME")

        assert await qmp.execute("cpu", {"index": 0}) == {}
        # The tiny guest has no IDT: the NMI triple-faults it, which resets the machine.
        assert await qmp.execute("inject-nmi") == {}
        event = await expect_event(listener, "RESET")
        assert event["data"] == {"guest": True, "reason": "guest-reset"}, event
        # The guest's own code, from its ELF program header, as saved from guest RAM.
        with open(os.path.join(workdir, "guest.elf"), "rb") as f:
            elf = f.read()
        phoff = struct.unpack_from("<Q", elf, 0x20)[0]
        _, _, offset, vaddr, paddr, filesz = struct.unpack_from("<IIQQQQ", elf, phoff)
        code = elf[offset:offset + min(filesz, 16)]
        saved = os.path.join(workdir, "phys.bin")
        await qmp.execute("pmemsave", {"val": paddr, "size": len(code), "filename": saved})
        with open(saved, "rb") as f:
            assert f.read() == code
        virt = os.path.join(workdir, "virt.bin")
        await qmp.execute("memsave", {"val": vaddr, "size": len(code), "filename": virt})
        with open(virt, "rb") as f:
            assert f.read() == code
        text = await qmp.execute("human-monitor-command", {"command-line": "info status"})
        assert text == "VM status: running\r\n", repr(text)

        # getfd: the fd arrives with the command, and the vmm holds it until closefd.
        r, w = os.pipe()
        pipe = f"pipe:[{os.fstat(r).st_ino}]"
        assert pipe not in fd_targets(pid)
        qmp.send_fd_scm(r)
        assert await qmp.execute("getfd", {"fdname": "pyfd"}) == {}
        assert pipe in fd_targets(pid), "getfd did not keep the pipe open"
        assert await qmp.execute("closefd", {"fdname": "pyfd"}) == {}
        assert pipe not in fd_targets(pid), "closefd did not close the pipe"
        os.close(r)
        os.close(w)
        try:
            await qmp.execute("closefd", {"fdname": "pyfd"})
            raise AssertionError("closefd of a closed name succeeded")
        except Exception as e:  # ExecuteError
            assert "File descriptor named 'pyfd' not found" in str(e), e

        await qmp.execute("system_reset")
        event = await expect_event(listener, "RESET")
        assert event["data"] == {"guest": False, "reason": "host-qmp-system-reset"}, event
        await qmp.execute("system_powerdown")
        await expect_event(listener, "POWERDOWN")

        await qmp.execute("quit")
        event = await expect_event(listener, "SHUTDOWN")
        assert event["data"] == {"guest": False, "reason": "host-qmp-quit"}, event
    try:
        await qmp.disconnect()
    except EOFError:
        # The server closed the stream after quit, as QEMU's own python tooling
        # (qemu.machine) expects and tolerates.
        pass
    print("PY-OK")


asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
