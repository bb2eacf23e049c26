"""worker_gen: one action of worker.py, in a persistent worker or plain."""

def _worker_gen_impl(ctx):
    out = ctx.actions.declare_file(ctx.label.name + ".out")
    src = ctx.actions.declare_file(ctx.label.name + ".in")
    ctx.actions.write(src, ctx.attr.text + "\n")
    args = ctx.actions.declare_file(ctx.label.name + ".args")
    lines = ["--src=" + src.path, "--out=" + out.path]
    if ctx.attr.breaks:
        lines.append("--break=" + ctx.attr.breaks)
    ctx.actions.write(args, "\n".join(lines) + "\n")
    start = [ctx.file._tool.path, "--startup-ms=%d" % ctx.attr.startup_ms]
    if ctx.attr.framing == "json":
        start.append("--json")
    ctx.actions.run(
        executable = "python3",
        arguments = start + ["@" + args.path],
        inputs = [ctx.file._tool, src, args] + ctx.files.deps,
        outputs = [out],
        mnemonic = "WorkerGen",
    )
    return [DefaultInfo(files = depset([out]))]

worker_gen = rule(
    implementation = _worker_gen_impl,
    attrs = {
        "text": attr.string(mandatory = True),
        "framing": attr.string(default = "proto"),
        "breaks": attr.string(default = ""),
        "startup_ms": attr.int(default = 0),
        "deps": attr.label_list(allow_files = True),
        "_tool": attr.label(default = "//:worker.py", allow_single_file = True),
    },
)

def worker_targets(prefix, count, framing = "proto", worker = True, key = None, startup_ms = 0):
    """`count` worker_gen targets named PREFIX_N, each depending on the last."""
    props = {}
    if worker:
        props = {
            "persistentWorkerKey": key or ("pyworker-" + framing),
            "persistentWorkerProtocol": framing,
        }
    names = []
    for i in range(count):
        name = "%s_%d" % (prefix, i)
        worker_gen(
            name = name,
            text = "%s %d" % (prefix, i),
            framing = framing,
            startup_ms = startup_ms,
            deps = [":%s_%d" % (prefix, i - 1)] if i > 0 else [],
            exec_properties = props,
        )
        names.append(":" + name)
    native.filegroup(name = prefix, srcs = names)
