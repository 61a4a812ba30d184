#!/usr/bin/env python3
"""Drives Godwit's QMP server with the real `qemu.qmp` client library (QEMU's own Python
QMP package from PyPI): connect, negotiate, query-status, stop/cont with STOP/RESUME events,
human-monitor-command, and an error reply. Run by tests/qemu_qmp.rs with the socket path as
its only argument. Exit status 0 and a last line "QEMU.QMP CLIENT OK" mean success; exit
status 3 means the package is missing."""

import asyncio
import sys

try:
    from qemu.qmp import QMPClient, ExecuteError
except ImportError as exc:  # the Rust test turns this into a clear failure
    print(f"qemu.qmp is not importable ({exc}); install it with: pip install qemu.qmp")
    sys.exit(3)


def check(cond, what):
    if not cond:
        raise AssertionError(what)


async def main(path):
    qmp = QMPClient("godwit-test")
    await qmp.connect(path)  # waits for the greeting and runs qmp_capabilities
    greeting = qmp.greeting
    check(greeting is not None, "no greeting")
    version = greeting.QMP.version["qemu"]
    check((version["major"], version["minor"]) == (7, 2), f"version {version}")
    check(str(greeting.QMP.version["package"]).startswith("godwit"), "package name")

    status = await qmp.execute("query-status")
    check(status == {"status": "running", "singlestep": False, "running": True}, f"status {status}")

    with qmp.listener(("STOP", "RESUME")) as listener:
        check(await qmp.execute("stop") == {}, "stop reply")
        event = await asyncio.wait_for(listener.get(), 20)
        check(event["event"] == "STOP", f"first event {event}")
        check("seconds" in event["timestamp"], "timestamp")
        status = await qmp.execute("query-status")
        check(status["status"] == "paused" and status["running"] is False, f"paused status {status}")

        check(await qmp.execute("cont") == {}, "cont reply")
        event = await asyncio.wait_for(listener.get(), 20)
        check(event["event"] == "RESUME", f"second event {event}")

    text = await qmp.execute("human-monitor-command", {"command-line": "info status"})
    check(text == "VM status: running\r\n", f"hmp text {text!r}")

    try:
        await qmp.execute("no-such-command")
        raise AssertionError("unknown command succeeded")
    except ExecuteError as err:
        check(err.error_class == "CommandNotFound", f"error class {err.error_class}")

    names = {c["name"] for c in await qmp.execute("query-commands")}
    check({"query-status", "stop", "cont", "migrate"} <= names, "query-commands")

    await qmp.disconnect()
    print("QEMU.QMP CLIENT OK")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
