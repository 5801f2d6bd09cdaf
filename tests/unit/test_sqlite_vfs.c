/*
 * The "fleetml" SQLite VFS shim (src/store/sqlite_vfs.c): each WAL frame
 * reaches the file as one write (its 24-byte header joined to its page),
 * a failed joined write fails the transaction it belongs to and nothing
 * else, and databases written through the shim read back intact through
 * SQLite's own VFS. The writes are counted by replacing the unix VFS's
 * pwrite system calls (xSetSystemCall), which the shim writes through.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "fleetml/fault.h"

#include <errno.h>
#include <stdbool.h>
#include <ftw.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define PAGE 4096
#define FRAME (24 + PAGE)

/* What the counting pwrite saw since the last reset. */
static struct {
    long header_only; /* 24-byte writes: a frame header written alone */
    long frames;      /* writes of exactly one header + page */
    int fail_frames;  /* fail this many frame writes with ENOSPC */
} seen;

typedef ssize_t (*pwrite_fn)(int, const void *, size_t, off_t);
static pwrite_fn real_pwrite, real_pwrite64;

/* Counts a write of n bytes; false when it is to fail with ENOSPC. */
static bool count(size_t n)
{
    if (n == 24)
        seen.header_only++;
    else if (n == FRAME)
        seen.frames++;
    if (n == FRAME && seen.fail_frames > 0) {
        seen.fail_frames--;
        errno = ENOSPC;
        return false;
    }
    return true;
}

static ssize_t counting_pwrite(int fd, const void *buf, size_t n, off_t off)
{
    return count(n) ? real_pwrite(fd, buf, n, off) : -1;
}

static ssize_t counting_pwrite64(int fd, const void *buf, size_t n, off_t off)
{
    return count(n) ? real_pwrite64(fd, buf, n, off) : -1;
}

static sqlite3_vfs *unix_vfs(void)
{
    sqlite3_vfs *u = sqlite3_vfs_find("unix");
    assert_non_null(u);
    assert_true(u->iVersion >= 3);
    return u;
}

static void hook(void)
{
    sqlite3_vfs *u = unix_vfs();
    real_pwrite = (pwrite_fn)u->xGetSystemCall(u, "pwrite");
    real_pwrite64 = (pwrite_fn)u->xGetSystemCall(u, "pwrite64");
    if (real_pwrite)
        assert_int_equal(u->xSetSystemCall(u, "pwrite", (sqlite3_syscall_ptr)counting_pwrite),
                         SQLITE_OK);
    if (real_pwrite64)
        assert_int_equal(
            u->xSetSystemCall(u, "pwrite64", (sqlite3_syscall_ptr)counting_pwrite64), SQLITE_OK);
    assert_true(real_pwrite || real_pwrite64);
    memset(&seen, 0, sizeof seen);
}

static void unhook(void)
{
    sqlite3_vfs *u = unix_vfs();
    /* NULL restores every system call to its default. */
    assert_int_equal(u->xSetSystemCall(u, NULL, NULL), SQLITE_OK);
}

static int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    return remove(p);
}

static void exec_ok(sqlite3 *db, const char *sql)
{
    char *msg = NULL;
    if (sqlite3_exec(db, sql, NULL, NULL, &msg) != SQLITE_OK)
        fail_msg("%s: %s", sql, msg ? msg : "?");
}

static sqlite3 *open_db(const char *path, const char *vfs)
{
    sqlite3 *db = NULL;
    assert_int_equal(sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, vfs),
                     SQLITE_OK);
    exec_ok(db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA page_size=4096;"
                "PRAGMA wal_autocheckpoint=0;");
    return db;
}

/* Inserts rows [from, from + n) in one transaction: 3 KB each, a page of
 * its own. Returns SQLite's answer to the COMMIT (or to the first failing
 * statement). */
static int insert_rows(sqlite3 *db, int from, int n)
{
    static char blob[3000];
    memset(blob, 'x', sizeof blob);
    int rc = sqlite3_exec(db, "BEGIN", NULL, NULL, NULL);
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(db, "INSERT INTO t(id, body) VALUES (?, ?)", -1, &st, NULL),
                     SQLITE_OK);
    for (int i = from; rc == SQLITE_OK && i < from + n; i++) {
        sqlite3_bind_int(st, 1, i);
        sqlite3_bind_blob(st, 2, blob, sizeof blob, SQLITE_STATIC);
        rc = sqlite3_step(st) == SQLITE_DONE ? SQLITE_OK : sqlite3_errcode(db);
        sqlite3_reset(st);
    }
    sqlite3_finalize(st);
    if (rc == SQLITE_OK)
        rc = sqlite3_exec(db, "COMMIT", NULL, NULL, NULL);
    if (rc != SQLITE_OK && !sqlite3_get_autocommit(db))
        sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
    return rc;
}

static long scalar(sqlite3 *db, const char *sql)
{
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    long v = (long)sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return v;
}

/* Reopened through SQLite's own VFS: intact, holding exactly want rows
 * (0..want-1). */
static void check_intact(const char *path, long want)
{
    sqlite3 *db = NULL;
    assert_int_equal(sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE, "unix"), SQLITE_OK);
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(db, "PRAGMA integrity_check", -1, &st, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    assert_string_equal((const char *)sqlite3_column_text(st, 0), "ok");
    sqlite3_finalize(st);
    assert_int_equal(scalar(db, "SELECT count(*) FROM t"), want);
    assert_int_equal(scalar(db, "SELECT coalesce(max(id), -1) FROM t"), want - 1);
    sqlite3_close(db);
}

static void test_one_write_per_frame(void **state)
{
    (void)state;
    const char *vfs = fm_sqlite_vfs_name();
    assert_non_null(vfs);
    char dir[] = "/tmp/fm-vfs-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char path[64];
    snprintf(path, sizeof path, "%s/t.db", dir);

    sqlite3 *db = open_db(path, vfs);
    exec_ok(db, "CREATE TABLE t(id INTEGER PRIMARY KEY, body BLOB NOT NULL)");
    /* A second connection checkpoints and reads while the first writes. */
    sqlite3 *other = open_db(path, vfs);

    hook();
    int rows = 0;
    for (int i = 0; i < 20; i++, rows += 5)
        assert_int_equal(insert_rows(db, rows, 5), SQLITE_OK);
    long frames = seen.frames;
    print_message("20 commits: %ld frame writes, %ld header-only writes\n", frames,
                  seen.header_only);
    assert_int_equal(seen.header_only, 0);
    assert_true(frames >= 100); /* a page per row at least */

    assert_int_equal(scalar(other, "SELECT count(*) FROM t"), rows);
    exec_ok(other, "PRAGMA wal_checkpoint(PASSIVE)");

    /* A transaction bigger than the page cache spills frames before its
     * COMMIT; rolled back, none of them may surface later. */
    exec_ok(db, "PRAGMA cache_size=4");
    exec_ok(db, "BEGIN");
    static char blob[3000];
    memset(blob, 'y', sizeof blob);
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(db, "INSERT INTO t(id, body) VALUES (?, ?)", -1, &st, NULL),
                     SQLITE_OK);
    for (int i = 0; i < 50; i++) {
        sqlite3_bind_int(st, 1, 100000 + i);
        sqlite3_bind_blob(st, 2, blob, sizeof blob, SQLITE_STATIC);
        assert_int_equal(sqlite3_step(st), SQLITE_DONE);
        sqlite3_reset(st);
    }
    sqlite3_finalize(st);
    exec_ok(db, "ROLLBACK");
    exec_ok(db, "PRAGMA cache_size=-2000");
    /* The other connection commits next, over the same stretch of log. */
    assert_int_equal(insert_rows(other, rows, 5), SQLITE_OK);
    rows += 5;
    assert_int_equal(insert_rows(db, rows, 5), SQLITE_OK);
    rows += 5;

    /* The disk is full for one frame's joined write: that transaction
     * fails as SQLite reports a full disk, and only it. */
    seen.fail_frames = 1;
    int rc = insert_rows(db, rows, 5);
    assert_int_equal(rc & 0xff, SQLITE_FULL);
    assert_int_equal(seen.fail_frames, 0);
    for (int i = 0; i < 5; i++, rows += 5)
        assert_int_equal(insert_rows(db, rows, 5), SQLITE_OK);
    assert_int_equal(seen.header_only, 0);
    unhook();

    assert_int_equal(scalar(other, "SELECT count(*) FROM t"), rows);
    sqlite3_close(other);
    sqlite3_close(db);
    check_intact(path, rows);
    nftw(dir, rm_cb, 8, FTW_DEPTH | FTW_PHYS);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_one_write_per_frame),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
