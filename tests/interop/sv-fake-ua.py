#!/usr/bin/python3
"""Run a sipvicious 0.3.3 tool with a User-Agent of our choice instead of "friendly-scanner".

sipvicious has no option for it: every request comes from svhelper.makeRequest(), whose
`useragent` parameter defaults to "friendly-scanner" and is never passed by svwar/svcrack/svmap.
Changing that default makes the tool behave like a scanner that lies about itself, so only
sipwarden's behaviour-based detectors (enumeration, password guessing) can catch it.

usage: sv-fake-ua.py svwar|svcrack|svmap USER-AGENT [tool arguments...]
Needs Debian's sipvicious package (/usr/share/sipvicious) and the system python3.
"""
import sys

sys.path.insert(0, "/usr/share/sipvicious")

from sipvicious.libs import svhelper  # noqa: E402


def main():
    if len(sys.argv) < 3 or sys.argv[1] not in ("svwar", "svcrack", "svmap"):
        sys.exit(__doc__)
    tool, ua = sys.argv[1], sys.argv[2]
    fn = svhelper.makeRequest
    names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
    defaults = list(fn.__defaults__)
    idx = names.index("useragent") - (len(names) - len(defaults))
    defaults[idx] = ua
    fn.__defaults__ = tuple(defaults)
    module = __import__("sipvicious." + tool, fromlist=["main"])
    sys.argv = [tool] + sys.argv[3:]
    return module.main()


if __name__ == "__main__":
    sys.exit(main())
