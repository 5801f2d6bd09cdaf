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

/* S3 credentials; expires_ms 0 for long-lived ones (configuration or the
 * AWS_* environment). */
typedef struct lake_s3_creds {
    char key_id[128], secret[128], token[2048];
    int64_t expires_ms;
} lake_s3_creds;

/* Temporary credentials of the machine's role (s3_creds.c): the container
 * credentials endpoint when AWS_CONTAINER_CREDENTIALS_FULL_URI or
 * _RELATIVE_URI is set, else EC2's IMDSv2 (AWS_EC2_METADATA_SERVICE_ENDPOINT
 * or 169.254.169.254). 0 with *out filled, or FM_EUNAVAIL / FM_ENOMEM with
 * err set (nothing written). */
int lake__s3_role_creds(lake_s3_creds *out, fm_errbuf *err);

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

/* Copies the tenant partition value of an object key built by
 * fm_lake_object_key ("<area>/tenant=<t>/...") into buf. Returns 0 or
 * FM_EINVAL (no such segment, or buf too small). */
int lake__key_tenant(const char *key, char *buf, size_t len);

#endif
