"""A remote execution client on gRPC's C core (python3-grpcio), a second
HTTP/2 stack beside the tonic one Outpost is built on.

It encodes the few REAPI messages it needs by hand (no generated code, so
python3-grpcio is all it needs) and behaves like a careful client: when an
Execute or WaitExecution stream breaks it waits on the operation again by
name with WaitExecution, and when the coordinator does not know the
operation any more (it restarted) it executes the action again.

Used by tests/execution/ and scripts/soak.py. As a command:

    grpc_core_client.py HOST:PORT SCRIPT [--break-first] [--timeout SECONDS]

uploads `sh -c SCRIPT` as an action, runs it, and prints one line per
Operation message (`update SECONDS_SINCE_START STAGE DONE`) and one result
line (`result exit=N status=CODE executes=N waits=N worker=ID`).
"""

import hashlib
import sys
import time

import grpc

# --- protobuf wire format, just what REAPI needs --------------------------


def _varint(n):
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len(field, data):
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _str(field, text):
    return _len(field, text.encode())


def _int(field, n):
    return _varint(field << 3) + _varint(n) if n else b""


def parse(data):
    """Fields of a message: number -> list of ints (varints) or bytes."""
    fields = {}
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(data, i)
        elif wire == 2:
            size, i = _read_varint(data, i)
            value, i = data[i : i + size], i + size
        elif wire == 1:
            value, i = data[i : i + 8], i + 8
        elif wire == 5:
            value, i = data[i : i + 4], i + 4
        else:
            raise ValueError("unsupported wire type %d" % wire)
        fields.setdefault(field, []).append(value)
    return fields


def _read_varint(data, i):
    n = shift = 0
    while True:
        byte = data[i]
        i += 1
        n |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return n, i


def _one(fields, number, default):
    return fields.get(number, [default])[-1]


def _signed32(n):
    n &= (1 << 64) - 1
    if n >= 1 << 63:
        n -= 1 << 64
    return n


def digest(data):
    return (hashlib.sha256(data).hexdigest(), len(data))


def _digest_msg(d):
    return _str(1, d[0]) + _int(2, d[1])


# --- the messages ----------------------------------------------------------

STAGES = {0: "UNKNOWN", 1: "CACHE_CHECK", 2: "QUEUED", 3: "EXECUTING", 4: "COMPLETED"}


class Operation:
    """What a client needs of a longrunning.Operation."""

    def __init__(self, raw):
        f = parse(raw)
        self.name = _one(f, 1, b"").decode()
        self.done = bool(_one(f, 3, 0))
        self.stage = "UNKNOWN"
        if 2 in f:
            meta = parse(_one(parse(f[2][-1]), 2, b""))
            self.stage = STAGES.get(_one(meta, 1, 0), "UNKNOWN")
        self.error = None
        if 4 in f:
            status = parse(f[4][-1])
            self.error = (_one(status, 1, 0), _one(status, 2, b"").decode())
        self.exit_code = None
        self.status = (0, "")
        self.worker = ""
        if 5 in f:
            response = parse(_one(parse(f[5][-1]), 2, b""))
            if 3 in response:
                status = parse(response[3][-1])
                self.status = (_one(status, 1, 0), _one(status, 2, b"").decode())
            if 1 in response:
                result = parse(response[1][-1])
                self.exit_code = _signed32(_one(result, 4, 0))
                if 9 in result:
                    self.worker = _one(parse(result[9][-1]), 1, b"").decode()


class Failed(Exception):
    """An error a retry must not hide."""


class Client:
    """REAPI calls over one C-core channel."""

    def __init__(self, address):
        # Reconnect within a second of the coordinator coming back (the
        # default backoff grows to minutes), so what the client sees while
        # the coordinator restarts is the restart, not its own backoff.
        self.channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ],
        )
        prefix = "/build.bazel.remote.execution.v2."
        self._batch_update = self.channel.unary_unary(
            prefix + "ContentAddressableStorage/BatchUpdateBlobs"
        )
        self._execute = self.channel.unary_stream(prefix + "Execution/Execute")
        self._wait = self.channel.unary_stream(prefix + "Execution/WaitExecution")

    def close(self):
        self.channel.close()

    def upload(self, blobs, retry_for=30.0):
        """Uploads blobs with BatchUpdateBlobs (retried while unavailable)."""
        request = b"".join(
            _len(2, _len(1, _digest_msg(digest(b))) + _len(2, b)) for b in blobs
        )
        deadline = time.monotonic() + retry_for
        while True:
            try:
                reply = parse(self._batch_update(request, timeout=30))
                break
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise Failed("BatchUpdateBlobs: %s %s" % (e.code().name, e.details()))
                time.sleep(0.5)
        for response in reply.get(1, []):
            status = parse(_one(parse(response), 2, b""))
            if _one(status, 1, 0) != 0:
                raise Failed("BatchUpdateBlobs: %r" % _one(status, 2, b""))

    def shell_action(self, script, timeout_s=0, env=None):
        """Uploads an action running `/bin/sh -c script`; its digest."""
        env = dict(env or {"PATH": "/usr/bin:/bin"})
        command = _str(1, "/bin/sh") + _str(1, "-c") + _str(1, script)
        for name in sorted(env):
            command += _len(2, _str(1, name) + _str(2, env[name]))
        root = b""  # an empty input root
        action = _len(1, _digest_msg(digest(command))) + _len(2, _digest_msg(digest(root)))
        if timeout_s:
            action += _len(6, _int(1, timeout_s))
        self.upload([command, root, action])
        return digest(action)

    def run(self, action, break_first=False, retry_for=60.0, pause=0.5, on_update=None):
        """Executes `action` to its end as a robust client does; returns
        (final Operation, counters). Raises Failed on an error that no
        retry may hide.

        break_first: cancel the first stream after its first message and
        come back with WaitExecution after `pause` seconds."""
        counters = {"executes": 0, "waits": 0, "not_found": 0, "unavailable": 0}
        name = None
        broken = False
        deadline = None
        request = _len(6, _digest_msg(action)) + _int(3, 1)
        while True:
            if name is None:
                counters["executes"] += 1
                stream = self._execute(request)
            else:
                counters["waits"] += 1
                stream = self._wait(_str(1, name))
            try:
                for raw in stream:
                    op = Operation(raw)
                    deadline = None
                    if on_update:
                        on_update(op)
                    name = op.name or name
                    if op.done:
                        return op, counters
                    if break_first and not broken:
                        broken = True
                        stream.cancel()
                        time.sleep(pause)
                        break
                else:
                    raise Failed("the operation stream ended before the operation was done")
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.NOT_FOUND and name is not None:
                    # The coordinator no longer knows the operation (it
                    # restarted): execute again.
                    counters["not_found"] += 1
                    name = None
                    continue
                if code == grpc.StatusCode.UNAVAILABLE:
                    # The coordinator went away; keep trying for a while.
                    counters["unavailable"] += 1
                    deadline = deadline or time.monotonic() + retry_for
                    if time.monotonic() < deadline:
                        time.sleep(0.5)
                        continue
                raise Failed("%s: %s %s" % ("WaitExecution" if name else "Execute", code.name, e.details()))


def main(argv):
    address, script = argv[1], argv[2]
    break_first = "--break-first" in argv
    timeout_s = int(argv[argv.index("--timeout") + 1]) if "--timeout" in argv else 0
    client = Client(address)
    start = time.monotonic()

    def update(op):
        print("update %.3f %s %s" % (time.monotonic() - start, op.stage, op.done), flush=True)

    try:
        action = client.shell_action(script, timeout_s)
        op, counters = client.run(action, break_first=break_first, on_update=update)
    except Failed as e:
        print("error %s" % e, flush=True)
        return 1
    if op.error:
        print("error operation failed: %d %s" % op.error, flush=True)
        return 1
    print(
        "result exit=%s status=%d executes=%d waits=%d worker=%s message=%s"
        % (op.exit_code, op.status[0], counters["executes"], counters["waits"], op.worker, op.status[1]),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
