/* slow_clock.c - LD_PRELOAD fault injection for test_server.py: after the
 * main thread reads CLOCK_MONOTONIC it sleeps 100 ms, so any work another
 * thread does between the reading and the main thread's next step lands
 * in that window.  Used to check that jemd's request-deadline sweeper
 * (run by main) never cuts a connection stamped by an HTTP thread. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int clock_gettime(clockid_t clk, struct timespec *ts) {
  static int (*real)(clockid_t, struct timespec *);
  if (!real) *(void **)&real = dlsym(RTLD_NEXT, "clock_gettime");
  int rc = real(clk, ts);
  if (clk == CLOCK_MONOTONIC && syscall(SYS_gettid) == getpid()) usleep(100000);
  return rc;
}
