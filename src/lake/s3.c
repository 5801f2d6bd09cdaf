/*
 * S3 lake backend: any S3-compatible object store (AWS S3, MinIO, Ceph RGW).
 *
 * HTTP and signing are libcurl's (CURLOPT_AWS_SIGV4); XML answers are read
 * with libxml2 (network and entity expansion off). What fleetml adds is the
 * part of the S3 protocol libcurl 7.88 leaves to its caller:
 *
 *   - x-amz-content-sha256 carries the payload's SHA-256 (S3 refuses a
 *     signed request without it, and checks the body against it), and
 *     Content-MD5 its MD5, so a body damaged in transit is refused;
 *   - the request body is given to curl in memory (CURLOPT_POSTFIELDS), so
 *     the payload hash curl signs is that of the body it sends;
 *   - query strings are built already canonical (parameters sorted, names
 *     and values percent-encoded with S3's unreserved set, empty values as
 *     "name="), because curl signs the query as written;
 *   - keys are percent-encoded per segment ('=' of tenant=… included).
 *
 * put: an object up to lake.s3_part_bytes is one PUT; a larger one is a
 * multipart upload (parts of s3_part_bytes, completed with the parts'
 * ETags, aborted on any failure). It returns 0 only when the store answered
 * 200 to the PUT or to CompleteMultipartUpload with no <Error> in the body:
 * that is when the writer moves its cursor. Every request is retried on a
 * transport error, 429 or 5xx (3 retries, backoff 0.2, 0.8, 3.2 s); the
 * writer adds its own backoff above that, so an unavailable store only
 * delays the lake.
 *
 * Objects are built in <data>/lake-spool (there is no lake directory), the
 * same place the writer's exporter lock lives.
 */
#include "lake/lake_int.h"

#include <curl/curl.h>
#include <errno.h>
#include <libxml/parser.h>
#include <libxml/tree.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define S3_RETRIES 3
#define S3_XML_MAX (8 << 20) /* an answer we parse (listing, errors) */

typedef struct lake_s3 {
    fm_lake base; /* first */
    CURL *curl;   /* one connection, reused */
    char scheme[8], hostport[256];
    char bucket[64], prefix[128], region[32];
    bool virtual_host;
    lake_s3_creds creds; /* expires_ms != 0: the role's, renewed in perform() */
    char sigv4[96];
    long part_bytes;
    long timeout_s;
} lake_s3;

/* ---- helpers -------------------------------------------------------------------- */

/* Appends to a string buffer; 0 or FM_ENOMEM (fm_strbuf keeps the failure). */
static int sb_add(fm_strbuf *b, const void *d, size_t n)
{
    fm_strbuf_add(b, d, n);
    return b->failed ? FM_ENOMEM : 0;
}

#define sb_printf(b, ...) (fm_strbuf_printf((b), __VA_ARGS__), (b)->failed ? FM_ENOMEM : 0)

/* Percent-encodes s with S3's unreserved set (A-Z a-z 0-9 - _ . ~), keeping
 * '/' when keep_slash (an object key in a path). */
static int enc(fm_strbuf *b, const char *s, bool keep_slash)
{
    static const char hex[] = "0123456789ABCDEF";
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        unsigned char c = *p;
        bool plain = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                     c == '-' || c == '_' || c == '.' || c == '~' || (keep_slash && c == '/');
        char e[3] = {'%', hex[c >> 4], hex[c & 15]};
        int rc = plain ? sb_add(b, p, 1) : sb_add(b, e, 3);
        if (rc)
            return rc;
    }
    return 0;
}

static void hex32(const unsigned char *d, char *out)
{
    for (int i = 0; i < 32; i++)
        snprintf(out + 2 * i, 3, "%02x", d[i]);
}

/* SHA-256 (hex) and MD5 (base64) of a body. */
static int digests(const void *p, size_t n, char sha_hex[65], char md5_b64[32])
{
    unsigned char d[EVP_MAX_MD_SIZE];
    unsigned int dl = 0;
    if (EVP_Digest(p, n, d, &dl, EVP_sha256(), NULL) != 1 || dl != 32)
        return FM_ECRYPTO;
    hex32(d, sha_hex);
    if (EVP_Digest(p, n, d, &dl, EVP_md5(), NULL) != 1 || dl != 16)
        return FM_ECRYPTO;
    EVP_EncodeBlock((unsigned char *)md5_b64, d, 16);
    return 0;
}

/* ---- one request ------------------------------------------------------------------ */

typedef struct s3_req {
    const char *method;   /* GET PUT POST HEAD DELETE */
    const char *key;      /* object key below the prefix, NULL for the bucket */
    const char *query;    /* canonical query ("" or NULL for none), already encoded */
    const void *body;     /* NULL: empty */
    size_t body_len;
    const char *content_type;
    FILE *sink;           /* GET into a file; else the answer goes to ans */
    fm_strbuf ans;        /* the answer's body (at most S3_XML_MAX) */
    char etag[128];       /* the ETag response header */
    long status;
} s3_req;

static size_t on_body(char *p, size_t sz, size_t n, void *ud)
{
    s3_req *r = ud;
    size_t len = sz * n;
    if (r->sink)
        return fwrite(p, 1, len, r->sink);
    /* Only error documents and listings are kept; anything past the bound
     * is an answer we would not parse anyway. */
    if (r->ans.len + len > S3_XML_MAX)
        return 0;
    return sb_add(&r->ans, p, len) == 0 ? len : 0;
}

static size_t on_header(char *p, size_t sz, size_t n, void *ud)
{
    s3_req *r = ud;
    size_t len = sz * n;
    if (len > 5 && strncasecmp(p, "etag:", 5) == 0) {
        const char *v = p + 5;
        size_t vl = len - 5;
        while (vl && (*v == ' ' || *v == '\t'))
            v++, vl--;
        while (vl && (v[vl - 1] == '\r' || v[vl - 1] == '\n' || v[vl - 1] == ' '))
            vl--;
        snprintf(r->etag, sizeof r->etag, "%.*s", (int)vl, v);
    }
    return len;
}

static int build_url(lake_s3 *s, const s3_req *r, fm_strbuf *url)
{
    int rc = s->virtual_host
                 ? sb_printf(url, "%s://%s.%s/", s->scheme, s->bucket, s->hostport)
                 : sb_printf(url, "%s://%s/%s", s->scheme, s->hostport, s->bucket);
    if (!rc && r->key) {
        if (!s->virtual_host)
            rc = sb_add(url, "/", 1);
        if (!rc)
            rc = enc(url, s->prefix, true);
        if (!rc)
            rc = enc(url, r->key, true);
    }
    if (!rc && r->query && *r->query)
        rc = sb_printf(url, "?%s", r->query);
    return rc;
}

static bool transient(CURLcode c, long status)
{
    if (c != CURLE_OK)
        return c != CURLE_URL_MALFORMAT && c != CURLE_UNSUPPORTED_PROTOCOL &&
               c != CURLE_SSL_CACERT_BADFILE && c != CURLE_PEER_FAILED_VERIFICATION;
    return status == 429 || status >= 500;
}

/* The <Code> and <Message> of an S3 error document, for err. */
static void error_text(const fm_strbuf *ans, char *out, size_t len)
{
    out[0] = '\0';
    if (!ans->len)
        return;
    xmlDocPtr d = xmlReadMemory(ans->p, (int)ans->len, "s3.xml", NULL,
                                XML_PARSE_NONET | XML_PARSE_NOERROR | XML_PARSE_NOWARNING);
    xmlNodePtr root = d ? xmlDocGetRootElement(d) : NULL;
    const char *code = "", *msg = "";
    xmlChar *cv = NULL, *mv = NULL;
    for (xmlNodePtr c = root ? root->children : NULL; c; c = c->next) {
        if (c->type != XML_ELEMENT_NODE)
            continue;
        if (!cv && xmlStrcmp(c->name, BAD_CAST "Code") == 0)
            code = (const char *)(cv = xmlNodeGetContent(c));
        else if (!mv && xmlStrcmp(c->name, BAD_CAST "Message") == 0)
            msg = (const char *)(mv = xmlNodeGetContent(c));
    }
    if (root && xmlStrcmp(root->name, BAD_CAST "Error") == 0)
        snprintf(out, len, ": %.64s %.200s", code ? code : "", msg ? msg : "");
    xmlFree(cv);
    xmlFree(mv);
    xmlFreeDoc(d);
}

/* Performs r with retries. Returns 0 when a status arrived (r->status),
 * FM_EIO with err when none did after the retries. The caller judges the
 * status. */
/* Role credentials are renewed RENEW_BEFORE_MS before they expire (the
 * services hand out new ones from then on); a failed renewal keeps the old
 * ones while they last. */
#define RENEW_BEFORE_MS (5 * 60 * 1000)

static int fresh_creds(lake_s3 *s, fm_errbuf *err)
{
    if (!s->creds.expires_ms || fm_wall_ms() < s->creds.expires_ms - RENEW_BEFORE_MS)
        return 0;
    lake_s3_creds c;
    fm_errbuf e;
    int rc = lake__s3_role_creds(&c, &e);
    if (rc == 0) {
        OPENSSL_cleanse(&s->creds, sizeof s->creds);
        s->creds = c;
        OPENSSL_cleanse(&c, sizeof c);
        fm_logf(FM_LOG_INFO, "lake", "s3 role credentials renewed");
        return 0;
    }
    if (fm_wall_ms() < s->creds.expires_ms) {
        fm_logkv(FM_LOG_WARN, "lake", "s3 role credentials not renewed; using the current ones",
                 "error", e.msg, NULL);
        return 0;
    }
    return fm_errf(err, rc, "%s", e.msg);
}

static int perform(lake_s3 *s, s3_req *r, fm_errbuf *err)
{
    fm_strbuf url = {0};
    int rc = build_url(s, r, &url);
    if (rc) {
        fm_free(url.p);
        return fm_errf(err, FM_EINVAL, "lake s3: key too long");
    }
    char sha[65], md5[32], h[160];
    static const char empty[] = "";
    const void *body = r->body ? r->body : empty;
    if (digests(body, r->body_len, sha, md5)) {
        fm_free(url.p);
        return fm_errf(err, FM_ECRYPTO, "lake s3: digest failed");
    }
    struct curl_slist *hdr = NULL;
    snprintf(h, sizeof h, "x-amz-content-sha256: %s", sha);
    hdr = curl_slist_append(hdr, h);
    if (r->body) {
        snprintf(h, sizeof h, "Content-MD5: %s", md5);
        hdr = curl_slist_append(hdr, h);
        snprintf(h, sizeof h, "Content-Type: %s",
                 r->content_type ? r->content_type : "application/octet-stream");
        hdr = curl_slist_append(hdr, h);
    }
    if ((rc = fresh_creds(s, err)) != 0) {
        curl_slist_free_all(hdr);
        fm_free(url.p);
        return rc;
    }
    if (s->creds.token[0]) {
        char *t = fm_malloc(sizeof s->creds.token + 32);
        if (t) {
            snprintf(t, sizeof s->creds.token + 32, "x-amz-security-token: %s", s->creds.token);
            hdr = curl_slist_append(hdr, t);
            fm_free(t);
        }
    }
    hdr = curl_slist_append(hdr, "Expect:"); /* no 100-continue round trip */
    CURL *c = s->curl;
    CURLcode cc = CURLE_OK;
    long waits_ms[S3_RETRIES] = {200, 800, 3200};
    for (int attempt = 0;; attempt++) {
        curl_easy_reset(c);
        r->ans.len = 0;
        r->etag[0] = '\0';
        r->status = 0;
        if (r->sink && (fflush(r->sink) != 0 || ftruncate(fileno(r->sink), 0) != 0 ||
                        fseek(r->sink, 0, SEEK_SET) != 0)) {
            rc = fm_errf(err, FM_EIO, "lake s3: local file: %s", strerror(errno));
            break;
        }
        curl_easy_setopt(c, CURLOPT_URL, url.p);
        curl_easy_setopt(c, CURLOPT_AWS_SIGV4, s->sigv4);
        curl_easy_setopt(c, CURLOPT_USERNAME, s->creds.key_id);
        curl_easy_setopt(c, CURLOPT_PASSWORD, s->creds.secret);
        curl_easy_setopt(c, CURLOPT_HTTPHEADER, hdr);
        curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(c, CURLOPT_TIMEOUT, s->timeout_s);
        curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, s->timeout_s < 10 ? s->timeout_s : 10L);
        curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
        curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
        curl_easy_setopt(c, CURLOPT_WRITEDATA, r);
        curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_header);
        curl_easy_setopt(c, CURLOPT_HEADERDATA, r);
        if (strcmp(r->method, "HEAD") == 0) {
            curl_easy_setopt(c, CURLOPT_NOBODY, 1L);
        } else if (strcmp(r->method, "GET") != 0) {
            curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, r->method);
            curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
            curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)r->body_len);
        }
        cc = curl_easy_perform(c);
        if (cc == CURLE_OK)
            curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &r->status);
        if (attempt == S3_RETRIES || !transient(cc, r->status))
            break;
        char why[300];
        error_text(&r->ans, why, sizeof why);
        fm_logkv(FM_LOG_WARN, "lake", "s3 request retried", "method", r->method, "key",
                 r->key ? r->key : "", "error",
                 cc != CURLE_OK ? curl_easy_strerror(cc) : (why[0] ? why + 2 : "server error"),
                 NULL);
        struct timespec ts = {waits_ms[attempt] / 1000, (waits_ms[attempt] % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
    curl_slist_free_all(hdr);
    fm_free(url.p);
    if (!rc && cc != CURLE_OK)
        rc = fm_errf(err, FM_EIO, "lake s3: %s %s: %s", r->method, r->key ? r->key : "(bucket)",
                     curl_easy_strerror(cc));
    return rc;
}

/* perform, then anything but 2xx becomes an error naming S3's code. */
static int perform_ok(lake_s3 *s, s3_req *r, fm_errbuf *err)
{
    int rc = perform(s, r, err);
    if (rc)
        return rc;
    if (r->status >= 200 && r->status < 300)
        return 0;
    char why[300];
    error_text(&r->ans, why, sizeof why);
    return fm_errf(err, r->status == 404 ? FM_ENOTFOUND : FM_EIO, "lake s3: %s %s: HTTP %ld%s",
                   r->method, r->key ? r->key : "(bucket)", r->status, why);
}

static void req_free(s3_req *r) { fm_free(r->ans.p); }

/* The text of the first element named name anywhere below n. */
static xmlChar *find_text(xmlNodePtr n, const char *name)
{
    for (xmlNodePtr c = n ? n->children : NULL; c; c = c->next) {
        if (c->type != XML_ELEMENT_NODE)
            continue;
        if (xmlStrcmp(c->name, BAD_CAST name) == 0)
            return xmlNodeGetContent(c);
        xmlChar *t = find_text(c, name);
        if (t)
            return t;
    }
    return NULL;
}

static xmlDocPtr parse_xml(const fm_strbuf *b)
{
    return b->len ? xmlReadMemory(b->p, (int)b->len, "s3.xml", NULL,
                                XML_PARSE_NONET | XML_PARSE_NOERROR | XML_PARSE_NOWARNING)
                : NULL;
}

/* ---- put ------------------------------------------------------------------------- */

static int put_single(lake_s3 *s, const char *key, const void *p, size_t n, fm_errbuf *err)
{
    s3_req r = {.method = "PUT", .key = key, .body = p, .body_len = n,
                .content_type = "application/gzip"};
    int rc = perform_ok(s, &r, err);
    req_free(&r);
    return rc;
}

static int abort_upload(lake_s3 *s, const char *key, const char *upload_id)
{
    fm_strbuf q = {0};
    int rc = sb_add(&q, "uploadId=", 9) || enc(&q, upload_id, false);
    s3_req r = {.method = "DELETE", .key = key, .query = q.p};
    fm_errbuf e;
    if (!rc)
        rc = perform_ok(s, &r, &e);
    req_free(&r);
    fm_free(q.p);
    return rc;
}

static int put_multipart(lake_s3 *s, const char *key, FILE *f, off_t size, fm_errbuf *err)
{
    s3_req r = {.method = "POST", .key = key, .query = "uploads=", .body = "", .body_len = 0,
                .content_type = "application/gzip"};
    int rc = perform_ok(s, &r, err);
    char upload_id[512] = "";
    if (!rc) {
        xmlDocPtr d = parse_xml(&r.ans);
        xmlChar *id = d ? find_text(xmlDocGetRootElement(d), "UploadId") : NULL;
        if (id && xmlStrlen(id) > 0 && (size_t)xmlStrlen(id) < sizeof upload_id)
            snprintf(upload_id, sizeof upload_id, "%s", (const char *)id);
        else
            rc = fm_errf(err, FM_EPROTO, "lake s3: no UploadId in the answer to CreateMultipart");
        xmlFree(id);
        xmlFreeDoc(d);
    }
    req_free(&r);
    if (rc)
        return rc;
    size_t nparts = (size_t)((size + s->part_bytes - 1) / s->part_bytes);
    char *part = fm_malloc((size_t)s->part_bytes);
    fm_strbuf done = {0};
    fm_strbuf q = {0};
    if (!part || sb_add(&done, "<CompleteMultipartUpload>", 25))
        rc = fm_errf(err, FM_ENOMEM, "out of memory");
    for (size_t i = 0; !rc && i < nparts; i++) {
        size_t n = fread(part, 1, (size_t)s->part_bytes, f);
        if (n == 0 || (n < (size_t)s->part_bytes && i + 1 < nparts)) {
            rc = fm_errf(err, FM_EIO, "lake s3: short read of the spool file");
            break;
        }
        q.len = 0;
        /* partNumber < uploadId: already in canonical order. */
        if (sb_printf(&q, "partNumber=%zu&uploadId=", i + 1) || enc(&q, upload_id, false)) {
            rc = fm_errf(err, FM_ENOMEM, "out of memory");
            break;
        }
        s3_req pr = {.method = "PUT", .key = key, .query = q.p, .body = part, .body_len = n};
        rc = perform_ok(s, &pr, err);
        if (!rc && !pr.etag[0])
            rc = fm_errf(err, FM_EPROTO, "lake s3: part %zu of %s: no ETag", i + 1, key);
        if (!rc && sb_printf(&done, "<Part><PartNumber>%zu</PartNumber><ETag>%s</ETag></Part>",
                              i + 1, pr.etag))
            rc = fm_errf(err, FM_ENOMEM, "out of memory");
        req_free(&pr);
    }
    if (!rc && sb_add(&done, "</CompleteMultipartUpload>", 26))
        rc = fm_errf(err, FM_ENOMEM, "out of memory");
    if (!rc) {
        q.len = 0;
        if (sb_add(&q, "uploadId=", 9) || enc(&q, upload_id, false))
            rc = fm_errf(err, FM_ENOMEM, "out of memory");
    }
    if (!rc) {
        s3_req cr = {.method = "POST", .key = key, .query = q.p, .body = done.p,
                     .body_len = done.len, .content_type = "application/xml"};
        rc = perform_ok(s, &cr, err);
        /* CompleteMultipartUpload can answer 200 and still fail: the
         * error is then the document's root. */
        xmlDocPtr d = rc ? NULL : parse_xml(&cr.ans);
        xmlNodePtr root = d ? xmlDocGetRootElement(d) : NULL;
        if (!rc && (!root || xmlStrcmp(root->name, BAD_CAST "CompleteMultipartUploadResult"))) {
            char why[300];
            error_text(&cr.ans, why, sizeof why);
            rc = fm_errf(err, FM_EIO, "lake s3: completing %s failed%s", key, why);
        }
        xmlFreeDoc(d);
        req_free(&cr);
    }
    if (rc)
        abort_upload(s, key, upload_id);
    fm_free(part);
    fm_free(done.p);
    fm_free(q.p);
    return rc;
}

static int s3_put(fm_lake *l, const char *key, const char *spool_path, fm_errbuf *err)
{
    lake_s3 *s = (lake_s3 *)l;
    FILE *f = fopen(spool_path, "rb");
    if (!f) {
        /* Idempotence, as for fs: a retry after a crash between the upload
         * and the caller's bookkeeping finds the spool gone. */
        if (errno == ENOENT && l->vt->exists(l, key) == 1)
            return 0;
        return fm_errf(err, FM_EIO, "lake s3: cannot open %s: %s", spool_path, strerror(errno));
    }
    struct stat st;
    int rc = fstat(fileno(f), &st) == 0 ? 0 : fm_errf(err, FM_EIO, "lake s3: stat failed");
    if (!rc && st.st_size > s->part_bytes) {
        rc = put_multipart(s, key, f, st.st_size, err);
    } else if (!rc) {
        char *p = fm_malloc((size_t)st.st_size + 1);
        if (!p)
            rc = fm_errf(err, FM_ENOMEM, "out of memory");
        else if (fread(p, 1, (size_t)st.st_size, f) != (size_t)st.st_size)
            rc = fm_errf(err, FM_EIO, "lake s3: short read of %s", spool_path);
        if (!rc)
            rc = put_single(s, key, p, (size_t)st.st_size, err);
        fm_free(p);
    }
    fclose(f);
    if (rc)
        return rc;
    /* The store has it: the spool copy goes (a crash before this re-puts
     * the same bytes under the same key, which is harmless). */
    if (unlink(spool_path) != 0 && errno != ENOENT)
        return fm_errf(err, FM_EIO, "lake s3: unlink %s: %s", spool_path, strerror(errno));
    fm_fsync_dir(l->spool_dir);
    return 0;
}

static int s3_exists(fm_lake *l, const char *key)
{
    lake_s3 *s = (lake_s3 *)l;
    s3_req r = {.method = "HEAD", .key = key};
    fm_errbuf e;
    int rc = perform(s, &r, &e);
    req_free(&r);
    if (rc)
        return rc;
    return r.status == 200 ? 1 : r.status == 404 ? 0 : FM_EIO;
}

static int s3_remove(fm_lake *l, const char *key, fm_errbuf *err)
{
    s3_req r = {.method = "DELETE", .key = key};
    int rc = perform_ok((lake_s3 *)l, &r, err);
    req_free(&r);
    return rc == FM_ENOTFOUND ? 0 : rc;
}

static int s3_open_read(fm_lake *l, const char *key, FILE **out, fm_errbuf *err)
{
    *out = NULL;
    FILE *f = tmpfile();
    if (!f)
        return fm_errf(err, FM_EIO, "lake s3: no temporary file: %s", strerror(errno));
    s3_req r = {.method = "GET", .key = key, .sink = f};
    int rc = perform((lake_s3 *)l, &r, err);
    if (!rc && fflush(f) != 0)
        rc = fm_errf(err, FM_EIO, "lake s3: writing a temporary file: %s", strerror(errno));
    if (!rc && (r.status < 200 || r.status >= 300)) {
        /* The error document went to the file: read it back to name it. */
        char tmp[4096];
        rewind(f);
        size_t n = fread(tmp, 1, sizeof tmp, f);
        sb_add(&r.ans, tmp, n);
        char why[300];
        error_text(&r.ans, why, sizeof why);
        rc = fm_errf(err, r.status == 404 ? FM_ENOTFOUND : FM_EIO, "lake s3: GET %s: HTTP %ld%s",
                     key, r.status, why);
    }
    req_free(&r);
    if (rc) {
        fclose(f);
        return rc;
    }
    rewind(f);
    *out = f;
    return 0;
}

/* ListObjectsV2, page by page (1,000 keys each), keys in the store's
 * order, which S3 defines as UTF-8 binary order. */
static int s3_list(fm_lake *l, const char *prefix, fm_lake_key_cb cb, void *ud, fm_errbuf *err)
{
    lake_s3 *s = (lake_s3 *)l;
    fm_strbuf q = {0}, full = {0};
    char *token = NULL;
    size_t plen = strlen(s->prefix);
    int rc = sb_printf(&full, "%s%s", s->prefix, prefix) ? fm_errf(err, FM_EINVAL, "prefix too long") : 0;
    for (bool more = true; !rc && more;) {
        q.len = 0;
        /* continuation-token < list-type < prefix: canonical order. */
        if ((token && (sb_add(&q, "continuation-token=", 19) || enc(&q, token, false) ||
                       sb_add(&q, "&", 1))) ||
            sb_add(&q, "list-type=2&prefix=", 19) || enc(&q, full.p, false)) {
            rc = fm_errf(err, FM_ENOMEM, "out of memory");
            break;
        }
        s3_req r = {.method = "GET", .query = q.p};
        rc = perform_ok(s, &r, err);
        xmlDocPtr d = rc ? NULL : parse_xml(&r.ans);
        xmlNodePtr root = d ? xmlDocGetRootElement(d) : NULL;
        if (!rc && (!root || xmlStrcmp(root->name, BAD_CAST "ListBucketResult")))
            rc = fm_errf(err, FM_EPROTO, "lake s3: the listing is not a ListBucketResult");
        more = false;
        for (xmlNodePtr c = root ? root->children : NULL; !rc && c; c = c->next) {
            if (c->type != XML_ELEMENT_NODE)
                continue;
            if (xmlStrcmp(c->name, BAD_CAST "Contents") == 0) {
                xmlChar *k = find_text(c, "Key");
                const char *ks = (const char *)k;
                /* Keys outside the prefix would be the store's mistake. */
                if (ks && strncmp(ks, s->prefix, plen) == 0)
                    rc = cb(ud, ks + plen);
                xmlFree(k);
            } else if (xmlStrcmp(c->name, BAD_CAST "IsTruncated") == 0) {
                xmlChar *t = xmlNodeGetContent(c);
                more = t && xmlStrcmp(t, BAD_CAST "true") == 0;
                xmlFree(t);
            } else if (xmlStrcmp(c->name, BAD_CAST "NextContinuationToken") == 0) {
                fm_free(token);
                xmlChar *t = xmlNodeGetContent(c);
                token = t ? fm_strdup((const char *)t) : NULL;
                xmlFree(t);
            }
        }
        if (!rc && more && !token)
            rc = fm_errf(err, FM_EPROTO, "lake s3: truncated listing without a continuation token");
        xmlFreeDoc(d);
        req_free(&r);
    }
    fm_free(token);
    fm_free(q.p);
    fm_free(full.p);
    return rc;
}

static void s3_close(fm_lake *l)
{
    lake_s3 *s = (lake_s3 *)l;
    if (s->curl)
        curl_easy_cleanup(s->curl);
    OPENSSL_cleanse(&s->creds, sizeof s->creds);
    fm_free(s);
}

static const fm_lake_vtable s3_vtable = {
    .name = "s3",
    .put = s3_put,
    .exists = s3_exists,
    .list = s3_list,
    .open_read = s3_open_read,
    .remove = s3_remove,
    .close = s3_close,
};

/* ---- open -------------------------------------------------------------------------- */

static const char *first_env(const char *a, const char *b)
{
    const char *v = a ? getenv(a) : NULL;
    if (v && *v)
        return v;
    v = b ? getenv(b) : NULL;
    return v && *v ? v : NULL;
}

static bool bucket_valid(const char *b)
{
    size_t n = strlen(b);
    if (n < 3 || n > 63)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = b[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '.'))
            return false;
    }
    return b[0] != '-' && b[0] != '.' && b[n - 1] != '-' && b[n - 1] != '.';
}

static void libs_init_once(void)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
    xmlInitParser();
}

int lake__s3_open(const fm_config *cfg, fm_lake **out, fm_errbuf *err)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, libs_init_once);
    *out = NULL;
    if (!bucket_valid(cfg->lake_s3_bucket))
        return fm_errf(err, FM_EINVAL,
                       "lake.s3_bucket: '%s' is not a bucket name (3-63 of a-z 0-9 . -)",
                       cfg->lake_s3_bucket);
    lake_s3 *s = fm_calloc(1, sizeof *s);
    if (!s)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    s->base.vt = &s3_vtable;
    const char *region = cfg->lake_s3_region[0] ? cfg->lake_s3_region
                                                : first_env("AWS_REGION", "AWS_DEFAULT_REGION");
    snprintf(s->region, sizeof s->region, "%s", region ? region : "us-east-1");
    const char *ep = cfg->lake_s3_endpoint[0]
                         ? cfg->lake_s3_endpoint
                         : first_env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL");
    char aws[128];
    bool on_aws = !ep;
    if (on_aws) {
        snprintf(aws, sizeof aws, "https://s3.%s.amazonaws.com", s->region);
        ep = aws;
    }
    const char *sep = strstr(ep, "://");
    size_t sl = sep ? (size_t)(sep - ep) : 0;
    if (!sep || !((sl == 4 && strncmp(ep, "http", 4) == 0) || (sl == 5 && strncmp(ep, "https", 5) == 0)) ||
        !sep[3] || strpbrk(sep + 3, "/?#@ ") || strlen(sep + 3) >= sizeof s->hostport) {
        fm_free(s);
        return fm_errf(err, FM_EINVAL,
                       "lake.s3_endpoint: '%s' is not http(s)://host[:port] (no path)", ep);
    }
    snprintf(s->scheme, sizeof s->scheme, "%.*s", (int)sl, ep);
    snprintf(s->hostport, sizeof s->hostport, "%s", sep + 3);
    const char *mode = cfg->lake_s3_addressing;
    s->virtual_host = strcmp(mode, "virtual") == 0 || (strcmp(mode, "auto") == 0 && on_aws);
    if (s->virtual_host && strchr(cfg->lake_s3_bucket, '.') && strcmp(s->scheme, "https") == 0) {
        fm_free(s);
        return fm_errf(err, FM_EINVAL, "lake.s3_bucket: a bucket with dots cannot be reached "
                                       "over https in the host name: set lake.s3_addressing = path");
    }
    snprintf(s->bucket, sizeof s->bucket, "%s", cfg->lake_s3_bucket);
    snprintf(s->prefix, sizeof s->prefix, "%s", cfg->lake_s3_prefix);
    if (strcmp(cfg->lake_s3_credentials, "role") == 0) {
        /* Checked now so a node without a role fails at start, not at its
         * first export; FM_EUNAVAIL lets the caller tell it from a typo. */
        int rc = lake__s3_role_creds(&s->creds, err);
        if (rc) {
            fm_free(s);
            return rc;
        }
    } else {
        const char *kid = cfg->lake_s3_access_key_id[0] ? cfg->lake_s3_access_key_id
                                                        : first_env("AWS_ACCESS_KEY_ID", NULL);
        const char *sec = cfg->lake_s3_secret_access_key[0]
                              ? cfg->lake_s3_secret_access_key
                              : first_env("AWS_SECRET_ACCESS_KEY", NULL);
        const char *tok = first_env("AWS_SESSION_TOKEN", NULL);
        if (!kid || !sec || strlen(kid) >= sizeof s->creds.key_id ||
            strlen(sec) >= sizeof s->creds.secret ||
            (tok && strlen(tok) >= sizeof s->creds.token)) {
            fm_free(s);
            return fm_errf(err, FM_EINVAL,
                           "lake s3: no credentials: set lake.s3_access_key_id and "
                           "lake.s3_secret_access_key, or AWS_ACCESS_KEY_ID and "
                           "AWS_SECRET_ACCESS_KEY, or lake.s3_credentials = role");
        }
        snprintf(s->creds.key_id, sizeof s->creds.key_id, "%s", kid);
        snprintf(s->creds.secret, sizeof s->creds.secret, "%s", sec);
        if (tok)
            snprintf(s->creds.token, sizeof s->creds.token, "%s", tok);
    }
    snprintf(s->sigv4, sizeof s->sigv4, "aws:amz:%s:s3", s->region);
    s->part_bytes = cfg->lake_s3_part_bytes;
    s->timeout_s = cfg->lake_s3_timeout_s;
    int n = snprintf(s->base.spool_dir, sizeof s->base.spool_dir, "%s/lake-spool", cfg->data_dir);
    if (n < 0 || (size_t)n >= sizeof s->base.spool_dir || fm_mkdirs(s->base.spool_dir, 0750)) {
        fm_free(s);
        return fm_errf(err, FM_EIO, "lake s3: cannot create the spool directory under %s",
                       cfg->data_dir);
    }
    s->curl = curl_easy_init();
    if (!s->curl) {
        fm_free(s);
        return fm_errf(err, FM_ENOMEM, "lake s3: curl_easy_init failed");
    }
    *out = &s->base;
    return 0;
}
