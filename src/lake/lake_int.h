/*
 * Internals shared by the files of the lake subsystem (not a public API).
 */
#ifndef FLEETML_LAKE_INT_H
#define FLEETML_LAKE_INT_H

#include "fleetml/lake.h"

/* Name of the spool directory inside the lake directory. It lives on the
 * same filesystem as the published objects so the fs backend's put is a
 * single atomic rename(2). */
#define LAKE__SPOOL_NAME ".spool"

/* Opens the local-directory backend rooted at cfg->lake_dir. */
int lake__fs_open(const fm_config *cfg, fm_lake **out, fm_errbuf *err);

/* Opens the S3 backend (lake.s3_*, else the AWS environment variables);
 * sends no request. Returns 0, FM_EINVAL (settings, credentials), FM_EIO
 * (spool directory) or FM_ENOMEM. */
int lake__s3_open(const fm_config *cfg, fm_lake **out, fm_errbuf *err);

/* Builds the partition prefix "<area>/tenant=<t>/date=YYYY-MM-DD/hour=HH"
 * for the UTC hour containing ms. Returns 0 or FM_EINVAL if it does not
 * fit. */
int lake__partition(char *buf, size_t len, const char *area, const char *tenant, int64_t ms);

/* 1 when key (built by fm_lake_object_key) was named by node `node`, else
 * 0. */
int lake__key_node_is(const char *key, const char *node);

/* Extracts the first-row seq from an object key built by
 * fm_lake_object_key. Returns 0 or FM_EINVAL. */
int lake__key_first_seq(const char *key, int64_t *out);

#endif
