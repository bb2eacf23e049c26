"""Offline stand-in for @rules_java//java:defs.bzl: re-exports native rules.

Needed even for C++-only builds because Bazel loads @bazel_tools//tools/jdk
to resolve the registered toolchains; that package loads java_import,
java_runtime and java_toolchain. The rest are harmless extras.
"""

java_import = native.java_import
java_runtime = native.java_runtime
java_toolchain = native.java_toolchain
java_binary = native.java_binary
java_library = native.java_library
java_proto_library = native.java_proto_library
