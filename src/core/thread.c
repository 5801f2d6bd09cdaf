#include "fleetml/thread.h"

#include <errno.h>
#include <string.h>
#include <time.h>

int fm_thread_start(fm_thread *t, const char *name, void *(*fn)(void *), void *arg)
{
    memset(t, 0, sizeof *t);
    pthread_condattr_t ca;
    if (pthread_condattr_init(&ca) != 0)
        return FM_ENOMEM;
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    int rc = pthread_cond_init(&t->cv, &ca);
    pthread_condattr_destroy(&ca);
    if (rc != 0)
        return FM_ENOMEM;
    if (pthread_mutex_init(&t->mu, NULL) != 0) {
        pthread_cond_destroy(&t->cv);
        return FM_ENOMEM;
    }
    if (pthread_create(&t->tid, NULL, fn, arg) != 0) {
        pthread_mutex_destroy(&t->mu);
        pthread_cond_destroy(&t->cv);
        return FM_ENOMEM;
    }
    pthread_setname_np(t->tid, name); /* diagnostics only: failure is harmless */
    t->running = true;
    return 0;
}

void fm_thread_request_stop(fm_thread *t)
{
    if (!t || !t->running)
        return;
    pthread_mutex_lock(&t->mu);
    t->stopping = true;
    pthread_cond_broadcast(&t->cv);
    pthread_mutex_unlock(&t->mu);
}

void fm_thread_stop(fm_thread *t)
{
    if (!t || !t->running)
        return;
    fm_thread_request_stop(t);
    pthread_join(t->tid, NULL);
    t->running = false;
    pthread_mutex_destroy(&t->mu);
    pthread_cond_destroy(&t->cv);
}

bool fm_thread_wait_ns(fm_thread *t, int64_t ns)
{
    if (ns <= 0)
        return true;
    struct timespec ts;
    fm_deadline_ns(&ts, CLOCK_MONOTONIC, ns);
    return pthread_cond_timedwait(&t->cv, &t->mu, &ts) == ETIMEDOUT;
}
