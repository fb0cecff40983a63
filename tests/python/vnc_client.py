#!/usr/bin/env python3
"""A VNC client for the display tests, on vncdotool (PyPI).

    vnc_client.py SERVER capture OUT.png [--encoding raw|zrle] [--password PW]
    vnc_client.py SERVER type TEXT [--password PW]
    vnc_client.py SERVER move X Y [--password PW]

SERVER is a unix socket path or HOST::PORT. Prints one JSON line: {"ok": true, ...} or
{"ok": false, "error": "..."} (an authentication failure, a dropped connection).
"""

import argparse
import json
import sys

from vncdotool import api, rfb
from vncdotool.client import VNCDoToolClient, VNCDoToolFactory

ENCODINGS = {"raw": rfb.Encoding.RAW, "zrle": rfb.Encoding.ZRLE}


def factory_for(encoding):
    class Client(VNCDoToolClient):
        pass

    Client.encoding = ENCODINGS[encoding]

    class Factory(VNCDoToolFactory):
        protocol = Client

    return Factory


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("server")
    parser.add_argument("action", choices=["capture", "type", "move"])
    parser.add_argument("args", nargs="*")
    parser.add_argument("--encoding", default="raw", choices=sorted(ENCODINGS))
    parser.add_argument("--password")
    parser.add_argument("--timeout", type=float, default=60)
    opts = parser.parse_args()
    try:
        client = api.connect(
            opts.server,
            password=opts.password,
            factory_class=factory_for(opts.encoding),
            timeout=opts.timeout,
        )
        if opts.action == "capture":
            client.captureScreen(opts.args[0])
        elif opts.action == "type":
            for ch in opts.args[0]:
                if ch == "\n":
                    client.keyPress("enter")
                else:
                    client.keyPress(ch)
        elif opts.action == "move":
            client.mouseMove(int(opts.args[0]), int(opts.args[1]))
            client.mouseDown(1)
            client.mouseUp(1)
        client.disconnect()
        print(json.dumps({"ok": True}))
    except Exception as e:  # noqa: BLE001 - the test reads the reason
        print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}))
    finally:
        api.shutdown()


if __name__ == "__main__":
    sys.exit(main())
