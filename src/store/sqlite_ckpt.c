/*
 * The WAL checkpointer of the latency-critical connection (the pipeline's).
 *
 * Why a thread of its own. A checkpoint copies WAL frames into the
 * database file and fsyncs it; SQLite's automatic checkpoint runs it on the
 * committing connection, right after a COMMIT, so every reply queued behind
 * that commit waits for it (8-14 ms every 1.4 s at 500 measurements/s,
 * measured). Here the commit path only counts: SQLite's WAL hook reports
 * the log's size after each commit, and once the log has grown by
 * CKPT_KICK_FRAMES since the last kick the checkpointer thread is woken. It
 * runs PASSIVE checkpoints on its own connection: they never take the
 * write lock, so commits go on while frames are copied. When a pass
 * catches up between two commits, the log restarts from its beginning at
 * the next commit (SQLite does that by itself when it finds every frame
 * copied). A restart is seen as the log getting shorter and counted.
 *
 * The idle step. Under steady load a pass usually ends after the next
 * commit has landed, so it never quite catches up. Once the log holds
 * CKPT_IDLE_FRAMES, the commit thread runs one pass itself when it has
 * nothing queued (fm_store_idle): with no other writer that pass copies
 * every frame, so the log restarts, and it costs about one fsync because
 * the background passes have copied the rest.
 *
 * The bound. Should the background passes fall behind (a long reader pins
 * old frames, or a burst of cheap commits outruns them), the commit path
 * runs a PASSIVE checkpoint itself once the log holds CKPT_BOUND_FRAMES,
 * as SQLite's automatic checkpoint did: the WAL never grows without limit.
 * By then most frames are usually copied already, so that checkpoint costs
 * the backlog since the last background pass, not the whole log.
 */
#include "store/sqlite_int.h"
#include "fleetml/fault.h"
#include "fleetml/metrics.h"

#include <stdatomic.h>

/* 512 KiB of 4 KiB pages: a pass is 1-2 ms, mostly the database's fsync.
 * Measured against 64, 256 and 1,024 (docs/performance.md). */
#define CKPT_KICK_FRAMES 128
/* 2 MiB: the background passes lose the race with commits (each pass
 * ends after the next commit has landed); the commit thread finishes the
 * job when it has nothing queued. */
#define CKPT_IDLE_FRAMES 512
/* 16 MiB, the size the log is truncated back to (journal_size_limit). */
#define CKPT_BOUND_FRAMES 4096
/* Passes in a row while commits keep landing between them. */
#define CKPT_MAX_PASSES 8

struct sql__ckpt {
    fm_thread t;
    sqlite3 *db;         /* the checkpointer's own connection */
    bool kicked;         /* under t.mu */
    bool failing;        /* the last pass failed (logged once) */
    int last_frames;     /* commit thread only: the log's size at the last commit */
    int kicked_at;       /* commit thread only: ... at the last kick */
    int idle_at;         /* commit thread only: ... at the last idle checkpoint */
};

static void *run(void *arg)
{
    sql__ckpt *c = arg;
    fm_metrics *mx = fm_metrics_get();
    fm_thread_lock(&c->t);
    while (!fm_thread_should_stop(&c->t)) {
        if (!c->kicked) {
            fm_thread_wait(&c->t);
            continue;
        }
        c->kicked = false;
        fm_thread_unlock(&c->t);
        int log = 0, done = 0, rc = SQLITE_OK;
        /* Each pass copies what was committed during the one before; a
         * pass that finds the log caught up ends the run. */
        for (int i = 0; i < CKPT_MAX_PASSES; i++) {
            rc = sqlite3_wal_checkpoint_v2(c->db, NULL, SQLITE_CHECKPOINT_PASSIVE, &log, &done);
            if (rc != SQLITE_OK && rc != SQLITE_BUSY)
                break;
            atomic_fetch_add(&mx->wal_ckpt_background, 1);
            if (done >= log)
                break;
        }
        bool failed = rc != SQLITE_OK && rc != SQLITE_BUSY;
        if (failed && !c->failing)
            fm_logkv(FM_LOG_WARN, "store", "WAL checkpoint failed", "error", sqlite3_errstr(rc),
                     NULL);
        c->failing = failed;
        fm_thread_lock(&c->t);
    }
    fm_thread_unlock(&c->t);
    return NULL;
}

/* Runs on the committing thread after every commit, with the log's size in
 * frames. Always returns SQLITE_OK: an error here would make the COMMIT
 * report failure although it is durable (a checkpoint that fails now is
 * tried again at the next commit, and logged by the background thread). */
static int on_commit(void *ud, sqlite3 *db, const char *name, int frames)
{
    sql__ckpt *c = ud;
    fm_metrics *mx = fm_metrics_get();
    if (frames < c->last_frames) {
        atomic_fetch_add(&mx->wal_restarts, 1);
        c->kicked_at = c->idle_at = 0;
    }
    c->last_frames = frames;
    if (frames >= CKPT_BOUND_FRAMES) {
        atomic_fetch_add(&mx->wal_ckpt_bound, 1);
        sqlite3_wal_checkpoint_v2(db, name, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
        return SQLITE_OK;
    }
    if (frames - c->kicked_at >= CKPT_KICK_FRAMES) {
        c->kicked_at = frames;
        fm_thread_lock(&c->t);
        c->kicked = true;
        fm_thread_wake(&c->t);
        fm_thread_unlock(&c->t);
    }
    return SQLITE_OK;
}

int sql__ckpt_idle(sqlite_store *s)
{
    sql__ckpt *c = s->ckpt;
    /* Once per commit at most: with no commit since, there is nothing new. */
    if (!c || c->last_frames < CKPT_IDLE_FRAMES || c->last_frames == c->idle_at)
        return 0;
    /* No other writer: this pass copies every frame, so the next commit
     * restarts the log (unless a reader still holds an old snapshot). */
    atomic_fetch_add(&fm_metrics_get()->wal_ckpt_idle, 1);
    c->idle_at = c->last_frames;
    int rc = sqlite3_wal_checkpoint_v2(s->db, NULL, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
    return rc == SQLITE_OK || rc == SQLITE_BUSY ? 0 : sql__map_rc(rc);
}

int sql__ckpt_start(sqlite_store *s)
{
    const char *path = sqlite3_db_filename(s->db, "main");
    if (!path || !*path)
        return FM_EINVAL;
    sql__ckpt *c = fm_calloc(1, sizeof *c);
    if (!c)
        return FM_ENOMEM;
    int rc = sqlite3_open_v2(path, &c->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX,
                             fm_sqlite_vfs_name());
    if (rc != SQLITE_OK) {
        sqlite3_close(c->db);
        fm_free(c);
        return FM_EDB;
    }
    /* PASSIVE never waits; the timeout only covers reading the schema
     * while a writer holds a lock. A connection learns that the database
     * is in WAL mode (and opens the log) on its first read: until then a
     * checkpoint does nothing. */
    sqlite3_busy_timeout(c->db, 1000);
    if (sqlite3_exec(c->db, "SELECT count(*) FROM sqlite_schema", NULL, NULL, NULL) != SQLITE_OK) {
        sqlite3_close(c->db);
        fm_free(c);
        return FM_EDB;
    }
    if (fm_thread_start(&c->t, "fm-checkpoint", run, c) != 0) {
        sqlite3_close(c->db);
        fm_free(c);
        return FM_ENOMEM;
    }
    s->ckpt = c;
    /* Replaces SQLite's automatic checkpoint on this connection. */
    sqlite3_wal_hook(s->db, on_commit, c);
    return 0;
}

void sql__ckpt_stop(sqlite_store *s)
{
    sql__ckpt *c = s->ckpt;
    if (!c)
        return;
    sqlite3_wal_hook(s->db, NULL, NULL);
    fm_thread_stop(&c->t);
    sqlite3_close(c->db);
    fm_free(c);
    s->ckpt = NULL;
}
