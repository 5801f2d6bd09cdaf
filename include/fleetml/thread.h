/*
 * One long-lived service thread with its lock, a condition variable on the
 * monotonic clock (so a wall-clock step never stretches or cuts a wait),
 * and a stop flag: the start / wake / wait / stop code every subsystem's
 * thread needs (pipeline commit thread, lake writer, registry, broker
 * supervisor, MQTT client), written once.
 *
 * Lifecycle: fm_thread_start, then any number of lock/wait/signal calls
 * from the thread and its owner, then fm_thread_stop (once). The struct is
 * caller-owned storage; nothing is allocated.
 */
#ifndef FLEETML_THREAD_H
#define FLEETML_THREAD_H

#include "fleetml/core.h"

#include <pthread.h>
#include <stdbool.h>

typedef struct fm_thread {
    pthread_t tid;
    pthread_mutex_t mu; /* guards stopping and whatever the owner puts under it */
    pthread_cond_t cv;  /* CLOCK_MONOTONIC */
    bool stopping;      /* read and written under mu */
    bool running;       /* started and not yet joined */
} fm_thread;

/* Initialises t's lock and condition variable and starts fn(arg) on a new
 * thread named name (at most 15 characters, shown by top -H and
 * /proc/<pid>/task/<tid>/comm). Returns 0, or FM_ENOMEM with nothing left
 * to clean up (t may be passed to fm_thread_stop, which then does
 * nothing). */
int fm_thread_start(fm_thread *t, const char *name, void *(*fn)(void *), void *arg);

/* Sets the stop flag and wakes the thread, without waiting for it (for
 * owners that must do more, e.g. end a child process the thread waits
 * for, before joining). */
void fm_thread_request_stop(fm_thread *t);

/* fm_thread_request_stop, then joins the thread and destroys the lock and
 * the condition variable. The thread function must return once it sees
 * stopping (fm_thread_should_stop). No-op on a thread that is not running. */
void fm_thread_stop(fm_thread *t);

static inline void fm_thread_lock(fm_thread *t) { pthread_mutex_lock(&t->mu); }
static inline void fm_thread_unlock(fm_thread *t) { pthread_mutex_unlock(&t->mu); }
/* Wakes the thread (call with or without the lock). */
static inline void fm_thread_wake(fm_thread *t) { pthread_cond_signal(&t->cv); }
/* With the lock held: true once fm_thread_stop has been called. */
static inline bool fm_thread_should_stop(const fm_thread *t) { return t->stopping; }
/* With the lock held: waits for a wake-up (spurious ones included). */
static inline void fm_thread_wait(fm_thread *t) { pthread_cond_wait(&t->cv, &t->mu); }
/* With the lock held: waits at most ns nanoseconds (<= 0: not at all).
 * Returns true when the time ran out, false when woken. */
bool fm_thread_wait_ns(fm_thread *t, int64_t ns);

#endif
