/*
 * Temporary S3 credentials from the machine's role (lake.s3_credentials =
 * role), as AWS SDKs get them:
 *
 *   - a container credentials endpoint when the platform names one
 *     (EKS Pod Identity, ECS task roles): AWS_CONTAINER_CREDENTIALS_FULL_URI
 *     with the token in AWS_CONTAINER_AUTHORIZATION_TOKEN(_FILE), or
 *     AWS_CONTAINER_CREDENTIALS_RELATIVE_URI below http://169.254.170.2;
 *   - else the EC2 instance metadata service, version 2 only (a session
 *     token from PUT /latest/api/token first, so a request forged through an
 *     open proxy on the node cannot read the credentials), at
 *     AWS_EC2_METADATA_SERVICE_ENDPOINT or http://169.254.169.254.
 *
 * Both answer {"AccessKeyId", "SecretAccessKey", "Token", "Expiration"}.
 * Nothing here is contacted unless the operator chose `role`: a machine
 * outside AWS never sends a request to a link-local address by surprise.
 */
#include "lake/lake_int.h"

#include <curl/curl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CREDS_ANSWER_MAX (64 * 1024)
#define CREDS_TIMEOUT_MS 3000L

typedef struct answer {
    char buf[CREDS_ANSWER_MAX + 1];
    size_t len;
    bool overflow;
} answer;

static size_t on_data(char *p, size_t sz, size_t n, void *ud)
{
    answer *a = ud;
    size_t len = sz * n;
    if (a->len + len > CREDS_ANSWER_MAX) {
        a->overflow = true;
        return 0;
    }
    memcpy(a->buf + a->len, p, len);
    a->len += len;
    a->buf[a->len] = '\0';
    return len;
}

/* One request to a local credentials service. 0 with the body in *a (2xx
 * only), else FM_EUNAVAIL with err set. */
static int fetch(const char *method, const char *url, const char *header, answer *a,
                 fm_errbuf *err)
{
    CURL *c = curl_easy_init();
    if (!c)
        return fm_errf(err, FM_ENOMEM, "lake s3: curl_easy_init failed");
    struct curl_slist *hdr = header ? curl_slist_append(NULL, header) : NULL;
    a->len = 0;
    a->buf[0] = '\0';
    a->overflow = false;
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
    if (strcmp(method, "PUT") == 0) {
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, "");
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE, 0L);
    }
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, hdr);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, CREDS_TIMEOUT_MS);
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, CREDS_TIMEOUT_MS);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, a);
    CURLcode cc = curl_easy_perform(c);
    long status = 0;
    if (cc == CURLE_OK)
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    curl_slist_free_all(hdr);
    curl_easy_cleanup(c);
    if (cc != CURLE_OK)
        return fm_errf(err, FM_EUNAVAIL, "lake s3 credentials: %s %s: %s", method, url,
                       a->overflow ? "answer too large" : curl_easy_strerror(cc));
    if (status < 200 || status > 299)
        return fm_errf(err, FM_EUNAVAIL, "lake s3 credentials: %s %s: HTTP %ld", method, url,
                       status);
    return 0;
}

/* "2026-12-04T10:00:00Z" (the services' format) -> ms since the epoch. */
static int64_t parse_expiration(const char *s)
{
    struct tm tm;
    memset(&tm, 0, sizeof tm);
    if (!s)
        return -1;
    const char *end = strptime(s, "%Y-%m-%dT%H:%M:%S", &tm);
    if (!end)
        return -1;
    if (*end == '.') /* fractional seconds */
        while (*++end >= '0' && *end <= '9')
            ;
    if (strcmp(end, "Z") != 0 && strcmp(end, "+00:00") != 0)
        return -1;
    time_t t = timegm(&tm);
    return t < 0 ? -1 : (int64_t)t * 1000;
}

static int parse_creds(const answer *a, lake_s3_creds *out, fm_errbuf *err)
{
    json_t *doc = json_loadb(a->buf, a->len, 0, NULL);
    const char *kid = json_string_value(json_object_get(doc, "AccessKeyId"));
    const char *sec = json_string_value(json_object_get(doc, "SecretAccessKey"));
    const char *tok = json_string_value(json_object_get(doc, "Token"));
    const char *code = json_string_value(json_object_get(doc, "Code"));
    int64_t exp = parse_expiration(json_string_value(json_object_get(doc, "Expiration")));
    int rc = 0;
    if (code && strcmp(code, "Success") != 0)
        rc = fm_errf(err, FM_EUNAVAIL, "lake s3 credentials: the service answered %.64s", code);
    else if (!kid || !sec || !tok || exp < 0 || !*kid || !*sec ||
             strlen(kid) >= sizeof out->key_id || strlen(sec) >= sizeof out->secret ||
             strlen(tok) >= sizeof out->token)
        rc = fm_errf(err, FM_EUNAVAIL,
                     "lake s3 credentials: the answer lacks AccessKeyId, SecretAccessKey, "
                     "Token or a valid Expiration");
    else {
        snprintf(out->key_id, sizeof out->key_id, "%s", kid);
        snprintf(out->secret, sizeof out->secret, "%s", sec);
        snprintf(out->token, sizeof out->token, "%s", tok);
        out->expires_ms = exp;
    }
    json_decref(doc);
    return rc;
}

static int from_container(const char *full, const char *rel, lake_s3_creds *out, answer *a,
                          fm_errbuf *err)
{
    char url[1024], auth[2100] = "";
    if (full)
        snprintf(url, sizeof url, "%s", full);
    else
        snprintf(url, sizeof url, "http://169.254.170.2%s", rel);
    const char *tok = getenv("AWS_CONTAINER_AUTHORIZATION_TOKEN");
    const char *tok_file = getenv("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE");
    char *file_tok = NULL;
    if (tok_file && *tok_file) {
        size_t len;
        if (fm_read_file(tok_file, &file_tok, &len) != 0)
            return fm_errf(err, FM_EUNAVAIL, "lake s3 credentials: cannot read %s", tok_file);
        file_tok[strcspn(file_tok, "\r\n")] = '\0';
        tok = file_tok;
    }
    if (tok && *tok)
        snprintf(auth, sizeof auth, "Authorization: %s", tok);
    int rc = fetch("GET", url, auth[0] ? auth : NULL, a, err);
    if (file_tok) {
        memset(file_tok, 0, strlen(file_tok));
        fm_free(file_tok);
    }
    return rc ? rc : parse_creds(a, out, err);
}

static int from_imds(lake_s3_creds *out, answer *a, fm_errbuf *err)
{
    const char *ep = getenv("AWS_EC2_METADATA_SERVICE_ENDPOINT");
    char base[512], url[1024], hdr[200];
    snprintf(base, sizeof base, "%s", ep && *ep ? ep : "http://169.254.169.254");
    size_t n = strlen(base);
    if (n && base[n - 1] == '/')
        base[n - 1] = '\0';
    snprintf(url, sizeof url, "%s/latest/api/token", base);
    int rc = fetch("PUT", url, "X-aws-ec2-metadata-token-ttl-seconds: 21600", a, err);
    if (rc)
        return rc;
    if (a->len == 0 || a->len > 150 || strpbrk(a->buf, "\r\n"))
        return fm_errf(err, FM_EUNAVAIL, "lake s3 credentials: bad IMDSv2 session token");
    snprintf(hdr, sizeof hdr, "X-aws-ec2-metadata-token: %.150s", a->buf);
    snprintf(url, sizeof url, "%s/latest/meta-data/iam/security-credentials/", base);
    if ((rc = fetch("GET", url, hdr, a, err)) != 0)
        return rc;
    char role[256];
    snprintf(role, sizeof role, "%.*s", (int)strcspn(a->buf, "\r\n"), a->buf);
    if (!role[0] || strpbrk(role, "/?#% "))
        return fm_errf(err, FM_EUNAVAIL, "lake s3 credentials: no instance role attached");
    snprintf(url, sizeof url, "%s/latest/meta-data/iam/security-credentials/%s", base, role);
    if ((rc = fetch("GET", url, hdr, a, err)) != 0)
        return rc;
    return parse_creds(a, out, err);
}

int lake__s3_role_creds(lake_s3_creds *out, fm_errbuf *err)
{
    answer *a = fm_malloc(sizeof *a);
    if (!a)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    const char *full = getenv("AWS_CONTAINER_CREDENTIALS_FULL_URI");
    const char *rel = getenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI");
    lake_s3_creds c;
    memset(&c, 0, sizeof c);
    int rc = (full && *full) || (rel && *rel)
                 ? from_container(full && *full ? full : NULL, rel, &c, a, err)
                 : from_imds(&c, a, err);
    memset(a, 0, sizeof *a); /* the answer held the secret */
    fm_free(a);
    if (rc == 0)
        *out = c;
    memset(&c, 0, sizeof c);
    return rc;
}
