/* healthcheck.c - container HEALTHCHECK: GET a jemd health URL, exit 0 on 200, else 1. */
/*
 * The runtime image carries no curl or wget; this is the one probe it needs.
 * Usage: jemd-healthcheck [http://IPV4:PORT/PATH]
 * Default: http://127.0.0.1:$JEMD_PROBE_PORT/healthz, or $JEMD_PORT's when there is
 * no probe port (8080 when neither is set), so the check follows the daemon's
 * configuration.
 * Only numeric IPv4 hosts: no resolver, nothing to configure, nothing to hang on.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HC_TIMEOUT_MS 3000

static int hc_fail(const char *what, const char *detail) {
  fprintf(stderr, "jemd-healthcheck: %s%s%s\n", what, detail ? ": " : "",
          detail ? detail : "");
  return 1;
}

/* Milliseconds left until the deadline (never negative). */
static int hc_left_ms(const struct timespec *deadline) {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  long ms = (deadline->tv_sec - now.tv_sec) * 1000L +
            (deadline->tv_nsec - now.tv_nsec) / 1000000L;
  return ms < 0 ? 0 : (int)ms;
}

/* Waits for fd to become ready for `events`; 0 on ready, -1 on timeout/error. */
static int hc_wait(int fd, short events, const struct timespec *deadline) {
  struct pollfd p = {.fd = fd, .events = events, .revents = 0};
  for (;;) {
    int r = poll(&p, 1, hc_left_ms(deadline));
    if (r > 0) return 0;
    if (r == 0) return -1;
    if (errno != EINTR) return -1;
  }
}

/* Splits "http://A.B.C.D:PORT/path" into its parts; 0 on success. */
static int hc_parse_url(const char *url, char *host, size_t hostsz, int *port,
                        const char **path) {
  const char *p = url;
  if (strncmp(p, "http://", 7) != 0) return -1;
  p += 7;
  size_t n = strcspn(p, ":/");
  if (n == 0 || n >= hostsz) return -1;
  memcpy(host, p, n);
  host[n] = '\0';
  p += n;
  *port = 80;
  if (*p == ':') {
    char *end;
    long v = strtol(p + 1, &end, 10);
    if (end == p + 1 || v < 1 || v > 65535) return -1;
    *port = (int)v;
    p = end;
  }
  if (*p != '\0' && *p != '/') return -1;
  *path = *p ? p : "/";
  return 0;
}

int main(int argc, char **argv) {
  char urlbuf[128];
  const char *url;
  if (argc > 2 || (argc == 2 && (strcmp(argv[1], "-h") == 0 ||
                                 strcmp(argv[1], "--help") == 0))) {
    fprintf(stderr, "usage: jemd-healthcheck [http://IPV4:PORT/PATH]\n"
                    "default: http://127.0.0.1:$JEMD_PROBE_PORT/healthz, else "
                    "$JEMD_PORT (8080)\n");
    return 2;
  }
  if (argc == 2) {
    url = argv[1];
  } else {
    const char *port = getenv("JEMD_PROBE_PORT");
    if (!port || !*port || !strcmp(port, "-1")) port = getenv("JEMD_PORT");
    if (!port || !*port) port = "8080";
    snprintf(urlbuf, sizeof urlbuf, "http://127.0.0.1:%s/healthz", port);
    url = urlbuf;
  }

  char host[64];
  int port;
  const char *path;
  if (hc_parse_url(url, host, sizeof host, &port, &path) != 0)
    return hc_fail("bad URL (want http://IPV4:PORT/PATH)", url);
  struct sockaddr_in sa;
  memset(&sa, 0, sizeof sa);
  sa.sin_family = AF_INET;
  sa.sin_port = htons((unsigned short)port);
  if (inet_pton(AF_INET, host, &sa.sin_addr) != 1)
    return hc_fail("host must be a numeric IPv4 address", host);

  struct timespec deadline;
  clock_gettime(CLOCK_MONOTONIC, &deadline);
  deadline.tv_sec += HC_TIMEOUT_MS / 1000;

  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return hc_fail("socket", strerror(errno));
  if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
    if (errno != EINPROGRESS) return hc_fail("connect", strerror(errno));
    if (hc_wait(fd, POLLOUT, &deadline) != 0) return hc_fail("connect", "timed out");
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0)
      return hc_fail("connect", strerror(err ? err : errno));
  }

  char req[512];
  int reqlen = snprintf(req, sizeof req,
                        "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUser-Agent: jemd-healthcheck\r\n"
                        "Connection: close\r\n\r\n", path, host, port);
  if (reqlen < 0 || (size_t)reqlen >= sizeof req) return hc_fail("URL too long", url);
  for (int off = 0; off < reqlen;) {
    if (hc_wait(fd, POLLOUT, &deadline) != 0) return hc_fail("send", "timed out");
    ssize_t w = send(fd, req + off, (size_t)(reqlen - off), MSG_NOSIGNAL);
    if (w < 0 && errno != EAGAIN && errno != EINTR) return hc_fail("send", strerror(errno));
    if (w > 0) off += (int)w;
  }

  /* Only the status line matters: "HTTP/1.x 200 ...". */
  char resp[64];
  size_t got = 0;
  while (got < sizeof resp - 1 && !memchr(resp, '\n', got)) {
    if (hc_wait(fd, POLLIN, &deadline) != 0) return hc_fail("read", "timed out");
    ssize_t r = recv(fd, resp + got, sizeof resp - 1 - got, 0);
    if (r == 0) break;
    if (r < 0) {
      if (errno == EAGAIN || errno == EINTR) continue;
      return hc_fail("read", strerror(errno));
    }
    got += (size_t)r;
  }
  close(fd);
  resp[got] = '\0';
  int status = 0;
  if (sscanf(resp, "HTTP/1.%*1[01] %3d", &status) != 1)
    return hc_fail("not an HTTP response from", url);
  if (status != 200) {
    char code[16];
    snprintf(code, sizeof code, "HTTP %d", status);
    return hc_fail(url, code);
  }
  return 0;
}
