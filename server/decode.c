/* decode.c - a request's encoded images into the model's input tensor, on
 * the calling thread or on workers one image per slice (see srv.h).  The
 * one home of the decoder's error answers, for /v1/classify and jobs. */
#include "srv.h"

#include <stdio.h>
#include <stdlib.h>

int srv_decode_run(srv_decode *d, int max) {
  const jem_model *m = d->m;
  size_t chw = (size_t)m->arch.in_channels * m->arch.image_size * m->arch.image_size;
  for (int done = 0; d->n_decoded < d->n_imgs; done++) {
    if (done == max) return 1;
    int i = d->n_decoded;
    char err[512];
    int rc = jem_image_to_input(d->imgs[i].p, d->imgs[i].len, &m->pre, m->arch.image_size,
                                &d->lim, d->x + (size_t)i * chw, err, sizeof err);
    if (rc == 0) {
      d->n_decoded++;
      continue;
    }
    if (d->naming == SRV_DECODE_INIT)
      snprintf(d->err, sizeof d->err, "init.images[%d]: %s", i, err);
    else if (d->naming == SRV_DECODE_IMAGE)
      snprintf(d->err, sizeof d->err, "image %d: %s", i, err);
    else
      snprintf(d->err, sizeof d->err, "%s", err);
    d->status = rc == JEM_EUNSUPPORTED ? 415 : rc == JEM_ETOOBIG ? 413 : rc == JEM_ENOMEM ? 503
                                                                                          : 400;
    d->code = rc == JEM_EUNSUPPORTED ? "unsupported_image"
              : rc == JEM_ETOOBIG    ? "image_too_large"
              : rc == JEM_ENOMEM     ? "out_of_memory"
                                     : "invalid_image";
    return -1;
  }
  srv_decode_free(d); /* all decoded: the encoded bytes can go */
  return 0;
}

void srv_decode_free(srv_decode *d) {
  srv_blobs_free(d->imgs, d->n_imgs);
  d->imgs = NULL;
  d->n_imgs = 0;
}

static void decode_work_run(srv_work *w, srv_worker *wk) {
  (void)wk;
  srv_decode *d = (srv_decode *)w;
  if (d->conn_fd >= 0 && srv_conn_gone(d->conn_fd)) { /* nobody would read the answer */
    d->client_gone = 1;
    return;
  }
  srv_decode_run(d, 1);
}

static void decode_work_done(srv_work *w, int canceled) {
  srv_decode *d = (srv_decode *)w;
  if (!canceled && !d->status && !d->client_gone && d->n_decoded < d->n_imgs) {
    if (srv_sched_submit(w) == 0) return; /* the next image */
    canceled = 1;                         /* the scheduler is stopping */
  }
  d->canceled = canceled;
  d->finish(d);
}

int srv_decode_submit(srv_decode *d) {
  d->work.kind = SRV_WORK_JOB;
  d->work.run = decode_work_run;
  d->work.done = decode_work_done;
  return srv_sched_submit(&d->work);
}
