/*
 * memhog: allocate and touch memory for real, so a cgroup memory limit triggers a real kernel OOM
 * kill (tests use it in the testbox image: `hack/image build testbox`).
 *
 *   memhog MIB [HOLD_SECONDS]
 *
 * Maps MIB MiB of anonymous memory one MiB at a time and writes to every page of it, so each page
 * is backed by RAM (a plain malloc would only reserve address space). After each MiB it prints
 * "memhog: <n> MiB touched" (line-buffered, so a test reading the log sees how far it got before
 * the kill). Then it holds the memory for HOLD_SECONDS (default 0; "inf" holds until a signal)
 * and exits 0. Exit status 2 means bad usage, 1 that the kernel refused a mapping.
 *
 * Built statically: gcc -Os -static -o memhog memhog.c
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define MIB (1024UL * 1024UL)

static int parse_count(const char *text, unsigned long *out) {
  char *end = NULL;
  errno = 0;
  unsigned long value = strtoul(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || text[0] == '-')
    return -1;
  *out = value;
  return 0;
}

static void usage(void) {
  fprintf(stderr, "usage: memhog MIB [HOLD_SECONDS|inf]\n");
  exit(2);
}

int main(int argc, char **argv) {
  unsigned long mib = 0, hold = 0;
  int forever = 0;
  if (argc < 2 || argc > 3 || parse_count(argv[1], &mib) != 0)
    usage();
  if (argc == 3) {
    if (strcmp(argv[2], "inf") == 0)
      forever = 1;
    else if (parse_count(argv[2], &hold) != 0)
      usage();
  }
  setvbuf(stdout, NULL, _IOLBF, 0);

  long page = sysconf(_SC_PAGESIZE);
  if (page <= 0)
    page = 4096;
  printf("memhog: allocating %lu MiB (pid %ld)\n", mib, (long)getpid());
  for (unsigned long i = 0; i < mib; i++) {
    /* one mapping per MiB: nothing large to refuse up front, the pages are what counts */
    unsigned char *chunk =
        mmap(NULL, MIB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (chunk == MAP_FAILED) {
      fprintf(stderr, "memhog: mmap failed after %lu MiB: %s\n", i, strerror(errno));
      return 1;
    }
    for (unsigned long off = 0; off < MIB; off += (unsigned long)page)
      chunk[off] = (unsigned char)(off / (unsigned long)page + 1); /* non-zero: a real page */
    printf("memhog: %lu MiB touched\n", i + 1);
  }
  if (forever) {
    printf("memhog: holding %lu MiB until killed\n", mib);
    for (;;)
      pause();
  }
  if (hold > 0) {
    printf("memhog: holding %lu MiB for %lu s\n", mib, hold);
    while (hold > 0) {
      unsigned int step = hold > 86400 ? 86400 : (unsigned int)hold;
      hold -= step - sleep(step); /* sleep returns what is left when a signal interrupts it */
    }
  }
  printf("memhog: done\n");
  return 0;
}
