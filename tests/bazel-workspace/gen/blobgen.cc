// Writes N deterministic pseudo-random bytes (xorshift64*, fixed seed) to
// stdout. Usage: blobgen N
#include <cstdint>
#include <cstdio>
#include <cstdlib>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s NUM_BYTES\n", argv[0]);
    return 2;
  }
  unsigned long long remaining = std::strtoull(argv[1], nullptr, 10);
  std::uint64_t state = 0x0075707374ULL ^ 0x9E3779B97F4A7C15ULL;
  static unsigned char buf[1 << 16];
  while (remaining > 0) {
    for (std::size_t i = 0; i < sizeof(buf); i += 8) {
      state ^= state >> 12;
      state ^= state << 25;
      state ^= state >> 27;
      const std::uint64_t v = state * 0x2545F4914F6CDD1DULL;
      for (int b = 0; b < 8; ++b) buf[i + b] = static_cast<unsigned char>(v >> (8 * b));
    }
    const std::size_t n = remaining < sizeof(buf) ? remaining : sizeof(buf);
    if (std::fwrite(buf, 1, n, stdout) != n) return 1;
    remaining -= n;
  }
  return std::fflush(stdout) == 0 ? 0 : 1;
}
