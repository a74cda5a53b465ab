#!/usr/bin/python3
"""Summarise the messages of one call in a sniff.py capture: one line per message,
"SRC DST FIRST-LINE | CSeq | top Via branch".  usage: trace.py TRACE CALL-ID"""
import re
import sys


def main():
    path, cid = sys.argv[1], sys.argv[2]
    head = re.compile(r"^\d\d:\d\d:\d\d\.\d+ (UDP|TCP) (\S+) -> (\S+) ")
    blocks, cur = [], None
    with open(path, errors="replace") as f:
        for line in f:
            m = head.match(line)
            if m:
                cur = [m.group(2), m.group(3), []]
                blocks.append(cur)
            elif cur is not None:
                cur[2].append(line.rstrip("\n"))
    for src, dst, lines in blocks:
        hdr = {}
        for ln in lines[1:]:
            if not ln:
                break
            name, _, val = ln.partition(":")
            n = name.strip().lower()
            n = {"i": "call-id", "v": "via"}.get(n, n)
            hdr.setdefault(n, val.strip())
        if hdr.get("call-id") != cid or not lines:
            continue
        b = re.search(r"branch=([^;,\s]+)", hdr.get("via", ""))
        print(f"{src} {dst} {lines[0]} | {hdr.get('cseq', '')} | {b.group(1) if b else '-'}")


if __name__ == "__main__":
    main()
