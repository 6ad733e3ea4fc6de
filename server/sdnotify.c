/* sdnotify.c - the systemd notification protocol (READY=1, STOPPING=1),
 * written out here so the daemon needs no libsystemd. */
#include "srv.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

/* Sends state to $NOTIFY_SOCKET (a path, or "@name" for the abstract
 * namespace).  Returns 1 when sent, 0 when not under systemd, -1 on error. */
int srv_sd_notify(const char *state) {
  const char *path = getenv("NOTIFY_SOCKET");
  if (!path || !path[0]) return 0;
  size_t plen = strlen(path);
  struct sockaddr_un sa;
  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  if (plen >= sizeof sa.sun_path || (path[0] != '/' && path[0] != '@')) return -1;
  memcpy(sa.sun_path, path, plen);
  if (path[0] == '@') sa.sun_path[0] = '\0';
  socklen_t salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + plen);
  /* non-blocking: a receiver that stops reading must not stall the main
   * thread (a full datagram queue would block sendto) */
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return -1;
  ssize_t w = sendto(fd, state, strlen(state), MSG_NOSIGNAL, (struct sockaddr *)&sa, salen);
  int e = errno;
  close(fd);
  if (w < 0) {
    srv_log(e == EAGAIN ? SRV_LOG_DEBUG : SRV_LOG_WARN, "msg=\"sd_notify failed\" error=\"%s\"",
            strerror(e));
    return -1;
  }
  return 1;
}

/* systemd's watchdog (WatchdogSec=): the interval at which to send
 * WATCHDOG=1, half of $WATCHDOG_USEC, or 0 when not asked for (or asked of
 * another process, $WATCHDOG_PID). */
uint64_t srv_sd_watchdog_ns(void) {
  const char *us = getenv("WATCHDOG_USEC");
  if (!us || !us[0]) return 0;
  const char *pid = getenv("WATCHDOG_PID");
  if (pid && pid[0] && strtol(pid, NULL, 10) != (long)getpid()) return 0;
  char *end;
  unsigned long long v = strtoull(us, &end, 10);
  if (*end || v == 0) return 0;
  return (uint64_t)v * 1000ull / 2;
}
