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
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  ssize_t w = sendto(fd, state, strlen(state), MSG_NOSIGNAL, (struct sockaddr *)&sa, salen);
  int e = errno;
  close(fd);
  if (w < 0) {
    srv_log(SRV_LOG_WARN, "msg=\"sd_notify failed\" error=\"%s\"", strerror(e));
    return -1;
  }
  return 1;
}
