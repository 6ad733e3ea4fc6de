/* main.c - jemd entry point: settings, model, scheduler, HTTP, and the
 * signal loop (SIGHUP reloads the model, SIGTERM/SIGINT drain and exit). */
#include "jobs.h"
#include "srv.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Signal handlers only set a flag and poke a pipe: OpenBLAS starts its
 * threads before main(), so no mask can keep signals on one thread. */
static int sig_pipe[2] = {-1, -1};
static volatile sig_atomic_t got_term, got_hup;

static void on_signal(int sig) {
  int saved = errno;
  if (sig == SIGHUP)
    got_hup = 1;
  else
    got_term++;
  char c = (char)sig;
  if (write(sig_pipe[1], &c, 1) < 0) { /* the flag is enough */
  }
  errno = saved;
}

/* Waits up to ms for a signal; drains the pipe. */
static void wait_signal(int ms) {
  struct pollfd pf = {.fd = sig_pipe[0], .events = POLLIN, .revents = 0};
  if (poll(&pf, 1, ms) > 0) {
    char buf[64];
    while (read(sig_pipe[0], buf, sizeof buf) > 0) {
    }
  }
}

static uint64_t wd_interval, wd_last;
static void reload_check(void);

/* Periodic duties of the main thread: the request deadline sweep and the
 * systemd watchdog ping. */
static void housekeeping(void) {
  srv_http_tick();
  reload_check();
  if (wd_interval && srv_now_ns() - wd_last >= wd_interval) {
    srv_sd_notify("WATCHDOG=1");
    wd_last = srv_now_ns();
  }
}

/* SIGHUP's reload runs on a thread of its own: reading the model file can
 * block (a FIFO, a hung network mount), and this thread must stay free to
 * drain on SIGTERM, sweep request deadlines and ping the watchdog.  A reload
 * past --reload-timeout is reported as failed and its thread left behind
 * (it frees its record when it ends). */
typedef struct reload_job {
  atomic_int state;             /* RL_RUNNING, RL_DONE, RL_ABANDONED */
  int rc;
  char err[512];
  uint64_t t0;
} reload_job;
enum { RL_RUNNING = 0, RL_DONE, RL_ABANDONED };
static reload_job *reloading;

static void *reload_thread(void *p) {
  reload_job *j = p;
  j->rc = srv_models_rescan(j->err, sizeof j->err);
  int expect = RL_RUNNING;
  if (!atomic_compare_exchange_strong(&j->state, &expect, RL_DONE)) {
    srv_log(SRV_LOG_WARN, "msg=\"a reload given up earlier has ended\" ok=%s seconds=%.3f",
            j->rc ? "false" : "true", (double)(srv_now_ns() - j->t0) * 1e-9);
    free(j);
  }
  return NULL;
}

static void reload_start(void) {
  if (reloading) {
    srv_log(SRV_LOG_WARN, "msg=\"SIGHUP ignored: a reload is still running\"");
    return;
  }
  reload_job *j = calloc(1, sizeof *j);
  pthread_attr_t at;
  pthread_t th;
  int ok = j && !pthread_attr_init(&at);
  if (ok) {
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    atomic_init(&j->state, RL_RUNNING);
    j->t0 = srv_now_ns();
    ok = !pthread_create(&th, &at, reload_thread, j);
    pthread_attr_destroy(&at);
  }
  if (!ok) {
    free(j);
    srv_log(SRV_LOG_ERROR, "msg=\"model reload failed: cannot start its thread\"");
    srv_model_count_reload(0);
    return;
  }
  srv_sd_notify("RELOADING=1");
  srv_log(SRV_LOG_INFO, "msg=\"SIGHUP: reloading the models\"");
  reloading = j;
}

/* Reports a reload that ended or ran out of time. */
static void reload_check(void) {
  reload_job *j = reloading;
  if (!j) return;
  double secs = (double)(srv_now_ns() - j->t0) * 1e-9;
  int expect = RL_RUNNING;
  if (secs > srv_cfg.reload_timeout &&
      atomic_compare_exchange_strong(&j->state, &expect, RL_ABANDONED)) {
    srv_log(SRV_LOG_ERROR, "msg=\"model reload timed out; still serving the previous models\" "
            "reload_timeout=%d", srv_cfg.reload_timeout);
    srv_model_count_reload(0);
  } else if (atomic_load(&j->state) == RL_DONE) {
    if (j->rc) {
      char q[600];
      srv_log_quote(q, sizeof q, j->err);
      srv_log(SRV_LOG_ERROR, "msg=\"model reload failed; still serving the previous model\" "
              "failures=%d error=%s", j->rc, q);
    } else {
      srv_model *sm = srv_model_get();
      srv_log(SRV_LOG_INFO, "msg=\"model reloaded\" name=\"%s\" generation=%llu seconds=%.3f",
              sm ? sm->name : "?", sm ? (unsigned long long)sm->gen : 0ull, secs);
      srv_model_put(sm);
    }
    srv_model_count_reload(!j->rc);
    free(j);
  } else {
    return; /* still running */
  }
  reloading = NULL;
  srv_sd_notify("READY=1");
}

static void drain_and_stop(void) {
  srv_http_set_drain_phase(SRV_DRAIN_DELAY);
  srv_sd_notify("STOPPING=1");
  int term0 = got_term;
  uint64_t t0 = srv_now_ns();
  srv_log(SRV_LOG_INFO, "msg=\"draining\" drain_seconds=%d drain_delay=%d inflight=%d",
          srv_cfg.drain_seconds, srv_cfg.drain_delay, srv_http_inflight());
  /* keep serving (readiness 503) while load balancers catch up */
  uint64_t delay_end = t0 + (uint64_t)srv_cfg.drain_delay * 1000000000ull;
  while (srv_now_ns() < delay_end && got_term == term0) {
    wait_signal(100);
    housekeeping();
  }
  /* then refuse new work with 503 and give what was admitted the drain time;
   * the two phases add up, as the deploy files budget them */
  srv_http_set_drain_phase(SRV_DRAIN_CLOSING);
  uint64_t deadline = srv_now_ns() + (uint64_t)srv_cfg.drain_seconds * 1000000000ull;
  while ((srv_http_inflight() > 0 ||
          srv_jobs_active() > 0) &&
         srv_now_ns() < deadline && got_term == term0) {
    wait_signal(20);
    housekeeping();
  }
  int left = srv_http_inflight();
  if (left > 0)
    srv_log(SRV_LOG_WARN, "msg=\"drain time is up; cancelling queued work\" inflight=%d", left);
  srv_jobs_shutdown();
  srv_sched_stop();
  /* let the answers of cancelled requests go out */
  uint64_t grace = srv_now_ns() + 500000000ull;
  while (srv_http_inflight() > 0 && srv_now_ns() < grace) {
    wait_signal(10);
    housekeeping();
  }
  srv_http_stop();
  srv_jobs_free();
  srv_model_shutdown();
  srv_log(SRV_LOG_INFO, "msg=\"stopped\" seconds=%.3f", (double)(srv_now_ns() - t0) * 1e-9);
}

int main(int argc, char **argv) {
  jem_blas_setup(argc, argv);
  int status = 0;
  if (srv_config_parse(argc, argv, &status)) return status;
  json_object_seed(0); /* before any thread parses JSON */

  if (pipe(sig_pipe) != 0) {
    perror("jemd: pipe");
    return 1;
  }
  for (int i = 0; i < 2; i++) {
    fcntl(sig_pipe[i], F_SETFL, O_NONBLOCK);
    fcntl(sig_pipe[i], F_SETFD, FD_CLOEXEC);
  }
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGHUP, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);

  jem_blas_set_threads(srv_cfg.blas_threads);
  srv_metrics_init();
  char err[512];
  if (srv_cfg.api_key_file[0] && srv_auth_load(srv_cfg.api_key_file, err, sizeof err)) {
    fprintf(stderr, "jemd: --api-key-file: %s\n", err);
    return 1;
  }
  if (srv_config_resolve_model()) return 1;
  uint64_t t0 = srv_now_ns();
  if (srv_models_init(err, sizeof err)) {
    fprintf(stderr, "jemd: cannot load the model: %s\n", err);
    srv_model_shutdown();
    return 1;
  }
  char def[SRV_MODEL_NAME_MAX];
  srv_model_default(def, sizeof def);
  srv_log(SRV_LOG_INFO, "msg=\"models loaded\" default=\"%s\" seconds=%.3f", def,
          (double)(srv_now_ns() - t0) * 1e-9);
  if (srv_sched_start()) {
    fprintf(stderr, "jemd: cannot start the worker pool\n");
    return 1;
  }
  if (srv_jobs_start()) {
    fprintf(stderr, "jemd: cannot start the jobs subsystem\n");
    srv_sched_stop();
    return 1;
  }
  srv_classify_start();
  int port = 0, probe_port = -1;
  if (srv_http_start(srv_routes, srv_n_routes, &port, &probe_port)) {
    srv_sched_stop();
    srv_model_shutdown();
    return 1;
  }
  srv_log(SRV_LOG_INFO,
          "msg=\"serving\" host=%s port=%d workers=%d blas_threads=%d blas_core=%s "
          "http_threads=%d max_batch=%d max_delay_us=%d queue_size=%d auth=%s",
          srv_cfg.host, port, srv_cfg.workers, jem_blas_threads(),
          jem_blas_core() ? jem_blas_core() : "unknown", srv_cfg.http_threads,
          srv_cfg.max_batch, srv_cfg.max_delay_us, srv_cfg.queue_size,
          srv_auth_enabled() ? (srv_cfg.protect_scoring ? "jobs+scoring" : "jobs") : "off");
  /* fixed, parseable lines for scripts and tests (--port 0), the probe
   * port's first: "listening" tells them both are known */
  const char *shown = srv_cfg.host;
  int v6 = strchr(shown, ':') != NULL;
  if (probe_port >= 0)
    fprintf(stderr, "jemd: probes on http://%s%s%s:%d\n", v6 ? "[" : "", shown, v6 ? "]" : "",
            probe_port);
  fprintf(stderr, "jemd: listening on http://%s%s%s:%d\n", v6 ? "[" : "", shown, v6 ? "]" : "",
          port);
  fflush(stderr);
  char ready[64];
  snprintf(ready, sizeof ready, "READY=1\nMAINPID=%ld", (long)getpid());
  srv_sd_notify(ready);

  wd_interval = srv_sd_watchdog_ns();
  wd_last = srv_now_ns();
  if (wd_interval) srv_sd_notify("WATCHDOG=1");
  while (!got_term) {
    wait_signal(250);
    housekeeping();
    if (got_hup) {
      got_hup = 0;
      reload_start();
    }
  }
  srv_log(SRV_LOG_INFO, "msg=\"signal received, shutting down\"");
  drain_and_stop();
  close(sig_pipe[0]);
  close(sig_pipe[1]);
  return 0;
}
