#!/usr/bin/env python3
"""Drives a live migration between two Godwit processes the way libvirt 9.0 drives QEMU 7.2
(see ../shared/libvirt-notes.md), with the real `qemu.qmp` client library from PyPI:

destination (started with -incoming defer): qmp_capabilities, query-migrate-capabilities,
migrate-set-capabilities {events, late-block-activate, return-path}, migrate-incoming;
source: qmp_capabilities, query-migrate-capabilities, migrate-set-capabilities with *every*
advertised capability sent true or false (events, return-path, pause-before-switchover on),
query-migrate-parameters, migrate-set-parameters, migrate {detach: true}; then only MIGRATION
events are followed: setup -> active -> pre-switchover (after a STOP event) ->
migrate-continue {state: pre-switchover} -> device -> completed; query-migrate polled on the
way. The destination reports active -> completed.

Arguments: SRC_QMP_SOCKET DST_QMP_SOCKET PORT. Exit status 0 with a last line
"LIBVIRT-STYLE MIGRATION OK" means success; 3 means qemu.qmp is missing."""

import asyncio
import sys

try:
    from qemu.qmp import QMPClient, ExecuteError
except ImportError as exc:
    print(f"qemu.qmp is not importable ({exc}); install it with: pip install qemu.qmp")
    sys.exit(3)

T = 60


def check(cond, what):
    if not cond:
        raise AssertionError(what)


async def next_event(listener, names):
    while True:
        ev = await asyncio.wait_for(listener.get(), T)
        if ev["event"] in names:
            return ev


async def main(src_path, dst_path, port):
    dst = QMPClient("libvirt-style-dst")
    await dst.connect(dst_path)
    src = QMPClient("libvirt-style-src")
    await src.connect(src_path)

    # libvirt refuses an emulator whose migrate-set-capabilities refuses `events`.
    dcaps = {c["capability"]: c["state"] for c in await dst.execute("query-migrate-capabilities")}
    for needed in ("events", "return-path", "late-block-activate", "pause-before-switchover"):
        check(needed in dcaps, f"{needed} not advertised: {sorted(dcaps)}")
    check(dcaps["events"] is False, "events must be off by default, as in QEMU")
    await dst.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "events", "state": True},
        {"capability": "late-block-activate", "state": True},
        {"capability": "return-path", "state": True},
    ]})
    dcaps = {c["capability"]: c["state"] for c in await dst.execute("query-migrate-capabilities")}
    check(dcaps["events"] and dcaps["late-block-activate"] and dcaps["return-path"], f"dst caps {dcaps}")

    # A capability Godwit cannot do is refused with QEMU's error class, and changes nothing.
    try:
        await src.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "events", "state": True}, {"capability": "xbzrle", "state": True}]})
        raise AssertionError("xbzrle accepted")
    except ExecuteError as err:
        check(err.error_class == "GenericError", f"class {err.error_class}")
        check("xbzrle" in str(err), str(err))
    scaps = {c["capability"]: c["state"] for c in await src.execute("query-migrate-capabilities")}
    check(scaps["events"] is False, "a refused call must change nothing")

    # Before any migration there is nothing to continue.
    try:
        await src.execute("migrate-continue", {"state": "pre-switchover"})
        raise AssertionError("migrate-continue accepted without a migration")
    except ExecuteError as err:
        check(err.error_class == "GenericError", f"class {err.error_class}")

    # libvirt: every advertised capability, true or false, in one call.
    wanted = {"events", "return-path", "pause-before-switchover"}
    await src.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": name, "state": name in wanted} for name in scaps]})
    scaps = {c["capability"]: c["state"] for c in await src.execute("query-migrate-capabilities")}
    check(all(scaps[n] for n in wanted), f"src caps {scaps}")
    check(not any(v for n, v in scaps.items() if n not in wanted), f"src caps {scaps}")

    params = await src.execute("query-migrate-parameters")
    check("max-bandwidth" in params and "downtime-limit" in params, f"params {params}")
    await src.execute("migrate-set-parameters", {"max-bandwidth": 8 << 30})

    with dst.listener(("MIGRATION",)) as dlisten:
        await dst.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
        ev = await next_event(dlisten, ("MIGRATION",))
        check(ev["data"]["status"] == "active", f"dst first event {ev}")

        with src.listener(("MIGRATION", "STOP")) as slisten:
            await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}", "detach": True})
            seen = []
            stopped = False
            while True:
                ev = await next_event(slisten, ("MIGRATION", "STOP"))
                if ev["event"] == "STOP":
                    stopped = True
                    continue
                status = ev["data"]["status"]
                seen.append(status)
                if status == "pre-switchover":
                    break
                check(status in ("setup", "active"), f"unexpected status {status} after {seen}")
            check(seen[0] == "setup" and "active" in seen, f"statuses {seen}")
            check(stopped, "no STOP event before pre-switchover")
            info = await src.execute("query-migrate")
            check(info["status"] == "pre-switchover", f"query-migrate {info}")
            st = await src.execute("query-status")
            check(st["running"] is False, f"source must be paused in pre-switchover: {st}")
            # A wrong state is refused; the right one continues.
            try:
                await src.execute("migrate-continue", {"state": "active"})
                raise AssertionError("migrate-continue with the wrong state accepted")
            except ExecuteError as err:
                check(err.error_class == "GenericError", f"class {err.error_class}")
            await src.execute("migrate-continue", {"state": "pre-switchover"})
            rest = []
            while not rest or rest[-1] not in ("completed", "failed"):
                ev = await next_event(slisten, ("MIGRATION",))
                rest.append(ev["data"]["status"])
            check(rest == ["device", "completed"], f"after continue: {rest}")

        ev = await next_event(dlisten, ("MIGRATION",))
        check(ev["data"]["status"] == "completed", f"dst last event {ev}")

    info = await src.execute("query-migrate")
    check(info["status"] == "completed" and info["ram"]["transferred"] > 0, f"final {info}")
    check("downtime" in info, f"no downtime in {info}")
    for _ in range(100):  # the migration thread sets postmigrate right after `completed`
        st = await src.execute("query-status")
        if st["status"] == "postmigrate":
            break
        await asyncio.sleep(0.05)
    check(st["status"] == "postmigrate", f"source status {st}")
    st = await dst.execute("query-status")
    check(st["status"] == "running", f"destination status {st}")
    print(f"downtime {info['downtime']} ms, total {info['total-time']} ms")
    await src.disconnect()
    await dst.disconnect()
    print("LIBVIRT-STYLE MIGRATION OK")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
