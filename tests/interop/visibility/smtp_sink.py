#!/usr/bin/env python3
"""A local SMTP receiver for the e-mail alert interop (aiosmtpd): every mail it accepts is
written to DIR/NNNN.eml with the arrival time (unix seconds) on its first line.

usage: smtp_sink.py HOST PORT DIR   (runs until killed)"""
import os
import sys
import time

from aiosmtpd.controller import Controller


class Sink:
    def __init__(self, out):
        self.out = out
        self.n = 0

    async def handle_DATA(self, server, session, envelope):
        self.n += 1
        path = os.path.join(self.out, "%04d.eml" % self.n)
        with open(path + ".tmp", "wb") as f:
            f.write(b"%.3f\n" % time.time())
            f.write(envelope.content)
        os.rename(path + ".tmp", path)
        return "250 OK"


def main():
    host, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    os.makedirs(out, exist_ok=True)
    c = Controller(Sink(out), hostname=host, port=port)
    c.start()
    print("listening", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        c.stop()


if __name__ == "__main__":
    main()
