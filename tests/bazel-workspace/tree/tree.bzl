"""A tiny rule producing a directory output (tree artifact).

Bazel 4's genrule cannot declare directory outputs, so this uses
ctx.actions.declare_directory.
"""

def _gen_tree_impl(ctx):
    out = ctx.actions.declare_directory(ctx.attr.name)
    ctx.actions.run_shell(
        inputs = [ctx.file.src],
        outputs = [out],
        arguments = [out.path, ctx.file.src.path, str(ctx.attr.count)],
        command = """
set -eu
out="$1"; src="$2"; count="$3"
mkdir -p "$out/sub/deeper"
i=0
while [ "$i" -lt "$count" ]; do
  printf 'file %d\\n' "$i" > "$out/file_$i.txt"
  i=$((i + 1))
done
cp "$src" "$out/sub/copied_src.txt"
printf 'nested\\n' > "$out/sub/deeper/nested.txt"
: > "$out/sub/empty.txt"
""",
        mnemonic = "GenTree",
        progress_message = "Generating directory %s" % out.short_path,
    )
    return [DefaultInfo(files = depset([out]))]

gen_tree = rule(
    implementation = _gen_tree_impl,
    attrs = {
        "src": attr.label(allow_single_file = True, mandatory = True),
        "count": attr.int(default = 5),
    },
    doc = "Generates a directory with `count` files plus a nested sub/ tree.",
)
