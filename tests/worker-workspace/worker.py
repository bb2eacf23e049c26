#!/usr/bin/env python3
"""An example build tool for Outpost's persistent worker tests.

Work: --src=PATH --out=PATH writes the source's text to the output with
the pid of this process, a random id of it (pids repeat across sandboxes)
and how many requests it served. Run plain, it
reads its @flagfile itself. With --persistent_worker it reads WorkRequests
on stdin (varint-delimited protos, or JSON values with --json) and answers
WorkResponses on stdout. --break=crash exits mid-request,
--break=garbage answers garbage and --break=hang never answers, in a
worker only. --startup-ms=N sleeps
first, like a tool with a slow start.
"""

import json
import os
import sys
import time

served = 0
# Pids repeat across sandboxes (each has its own pid namespace): a random
# id per process tells processes apart.
process_id = os.urandom(8).hex()


def work(args, worker):
    global served
    served += 1
    opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
    if worker and opts.get("break") == "hang":
        time.sleep(3600)
    if worker and opts.get("break") == "crash":
        sys.stderr.write("worker %d: crashing as asked\n" % os.getpid())
        sys.stderr.flush()
        os._exit(3)
    with open(opts["src"]) as f:
        text = f.read().strip()
    mode = "worker" if worker else "plain"
    with open(opts["out"], "w") as f:
        f.write(
            "pid=%d id=%s served=%d mode=%s text=%s\n"
            % (os.getpid(), process_id, served, mode, text)
        )
    return "wrote %s\n" % opts["out"]


# The proto framing, by hand: no protobuf library is needed.
def read_varint(stream):
    shift = result = 0
    while True:
        b = stream.read(1)
        if not b:
            return None
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def fields(data):
    i = 0
    while i < len(data):
        key, i = decode_varint(data, i)
        number, kind = key >> 3, key & 7
        if kind == 0:
            value, i = decode_varint(data, i)
        elif kind == 2:
            length, i = decode_varint(data, i)
            value, i = data[i : i + length], i + length
        else:
            raise ValueError("unexpected wire type %d" % kind)
        yield number, value


def decode_varint(data, i):
    shift = result = 0
    while True:
        b = data[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def proto_response(exit_code, output):
    body = b""
    if exit_code:
        body += b"\x08" + varint(exit_code & 0xFFFFFFFFFFFFFFFF)
    data = output.encode()
    if data:
        body += b"\x12" + varint(len(data)) + data
    return varint(len(body)) + body


def serve(use_json):
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    decoder = json.JSONDecoder()
    pending = ""
    while True:
        if use_json:
            line = stdin.readline()
            if not line:
                return
            pending += line.decode()
            try:
                request, _ = decoder.raw_decode(pending.strip())
            except ValueError:
                continue
            pending = ""
            args = request.get("arguments", [])
        else:
            length = read_varint(stdin)
            if length is None:
                return
            args = [v.decode() for n, v in fields(stdin.read(length)) if n == 1]
        breaks = [a for a in args if a == "--break=garbage"]
        try:
            output, code = work(args, True), 0
        except Exception as e:  # the tool's own failure is the action's
            output, code = "error: %s\n" % e, 1
        if breaks:
            stdout.write(b"this is not a response \xff\xfe\n")
        elif use_json:
            # Spread over lines: a response is one JSON value, not a line.
            stdout.write(json.dumps({"exitCode": code, "output": output}, indent=1).encode() + b"\n")
        else:
            stdout.write(proto_response(code, output))
        stdout.flush()


def main():
    argv = sys.argv[1:]
    startup = [a for a in argv if a.startswith("--startup-ms=")]
    if startup:
        time.sleep(int(startup[0].split("=", 1)[1]) / 1000.0)
    if "--persistent_worker" in argv:
        serve("--json" in argv)
        return
    args = []
    for a in argv:
        if a.startswith("@"):
            with open(a[1:]) as f:
                args.extend(f.read().splitlines())
        else:
            args.append(a)
    sys.stdout.write(work(args, False))


main()
