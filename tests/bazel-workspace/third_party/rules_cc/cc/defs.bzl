"""Offline stand-in for @rules_cc//cc:defs.bzl: re-exports Bazel's native rules.

Required by @bazel_tools (tools/cpp, tools/jdk, ...) and the generated
@local_config_cc toolchain package: cc_binary, cc_library, cc_test,
cc_toolchain, cc_toolchain_suite. The rest are harmless extras.
"""

cc_binary = native.cc_binary
cc_library = native.cc_library
cc_test = native.cc_test
cc_toolchain = native.cc_toolchain
cc_toolchain_suite = native.cc_toolchain_suite
cc_import = native.cc_import
cc_proto_library = native.cc_proto_library
objc_library = native.objc_library
