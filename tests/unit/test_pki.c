/*
 * Unit tests for the platform PKI (src/pki/pki.c).
 *
 * Each test gets a fresh temporary directory with one CA already created,
 * so tests stay independent and can run in any order. Certificates are
 * inspected with OpenSSL directly rather than through pki.h, so the tests
 * check what a TLS peer will actually see.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "fleetml/pki.h"

#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#define CA_CN "fleetml test CA"

typedef struct fixture {
    char dir[64];
    char ca_key[128];
    char ca_cert[128];
} fixture;

static void path_in(const fixture *f, char *out, size_t len, const char *name)
{
    int n = snprintf(out, len, "%s/%s", f->dir, name);
    assert_true(n > 0 && (size_t)n < len);
}

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof *f);
    if (!f)
        return -1;
    strcpy(f->dir, "/tmp/fm-test-pki-XXXXXX");
    if (!mkdtemp(f->dir)) {
        free(f);
        return -1;
    }
    snprintf(f->ca_key, sizeof f->ca_key, "%s/ca.key", f->dir);
    snprintf(f->ca_cert, sizeof f->ca_cert, "%s/ca.crt", f->dir);
    fm_errbuf err = {{0}};
    if (fm_ca_create(f->ca_key, f->ca_cert, CA_CN, 30, &err) != 0) {
        fprintf(stderr, "fm_ca_create: %s\n", err.msg);
        free(f);
        return -1;
    }
    *state = f;
    return 0;
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static int teardown(void **state)
{
    fixture *f = *state;
    nftw(f->dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
    free(f);
    return 0;
}

static X509 *read_cert(const char *path)
{
    FILE *fp = fopen(path, "r");
    assert_non_null(fp);
    X509 *cert = PEM_read_X509(fp, NULL, NULL, NULL);
    fclose(fp);
    assert_non_null(cert);
    return cert;
}

static unsigned file_mode(const char *path)
{
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    return (unsigned)(st.st_mode & 07777);
}

/* Issues a certificate from the fixture's CA into dir/<name>.key|.crt. */
static void issue(const fixture *f, const char *name, const char *cn, enum fm_cert_usage usage,
                  const char *const *dns, const char *const *ips, char *serial)
{
    char key[160], crt[160], kname[64], cname[64];
    snprintf(kname, sizeof kname, "%s.key", name);
    snprintf(cname, sizeof cname, "%s.crt", name);
    path_in(f, key, sizeof key, kname);
    path_in(f, crt, sizeof crt, cname);
    fm_errbuf err = {{0}};
    fm_ca *ca = NULL;
    assert_int_equal(fm_ca_load(f->ca_key, f->ca_cert, &ca, &err), 0);
    fm_cert_req req = {.common_name = cn, .dns_sans = dns, .ip_sans = ips, .usage = usage,
                       .days = 10};
    int rc = fm_ca_issue_keypair(ca, &req, key, crt, serial, &err);
    if (rc != 0)
        fprintf(stderr, "fm_ca_issue_keypair: %s\n", err.msg);
    assert_int_equal(rc, 0);
    fm_ca_free(ca);
}

static void test_ca_files_and_extensions(void **state)
{
    fixture *f = *state;
    assert_int_equal(file_mode(f->ca_key), 0600);
    assert_int_equal(file_mode(f->ca_cert), 0644);

    char cn[128];
    fm_errbuf err = {{0}};
    assert_int_equal(fm_cert_file_cn(f->ca_cert, cn, sizeof cn, &err), 0);
    assert_string_equal(cn, CA_CN);

    X509 *ca = read_cert(f->ca_cert);
    /* X509_check_ca returns 1 for a proper CA with basicConstraints. */
    assert_int_equal(X509_check_ca(ca), 1);
    assert_int_equal(X509_get_pathlen(ca), 0);
    uint32_t ku = X509_get_key_usage(ca);
    assert_true(ku & KU_KEY_CERT_SIGN);
    assert_true(ku & KU_CRL_SIGN);
    assert_false(ku & KU_DIGITAL_SIGNATURE);
    assert_non_null(X509_get0_subject_key_id(ca));
    assert_int_equal(X509_get_signature_nid(ca), NID_ecdsa_with_SHA256);
    /* Self-signed: issuer equals subject and the signature verifies. */
    assert_int_equal(X509_NAME_cmp(X509_get_subject_name(ca), X509_get_issuer_name(ca)), 0);
    assert_int_equal(X509_verify(ca, X509_get0_pubkey(ca)), 1);
    /* The serial is positive and at most 20 octets (159 random bits). */
    const ASN1_INTEGER *serial = X509_get0_serialNumber(ca);
    BIGNUM *bn = ASN1_INTEGER_to_BN(serial, NULL);
    assert_non_null(bn);
    assert_false(BN_is_negative(bn));
    assert_true(BN_num_bits(bn) <= 159);
    BN_free(bn);
    X509_free(ca);
}

static void test_issue_server_cert(void **state)
{
    fixture *f = *state;
    const char *dns[] = {"localhost", "broker.example", NULL};
    const char *ips[] = {"127.0.0.1", "::1", NULL};
    char serial[41] = "";
    issue(f, "server", "fleetml-broker", FM_CERT_SERVER, dns, ips, serial);

    char key[160], crt[160];
    path_in(f, key, sizeof key, "server.key");
    path_in(f, crt, sizeof crt, "server.crt");
    assert_int_equal(file_mode(key), 0600);
    assert_int_equal(file_mode(crt), 0644);

    fm_errbuf err = {{0}};
    assert_int_equal(fm_cert_verify_file(f->ca_cert, crt, &err), 0);

    /* The returned serial is lowercase hex and matches the certificate. */
    size_t n = strlen(serial);
    assert_true(n > 0 && n <= 40);
    for (size_t i = 0; i < n; i++)
        assert_non_null(strchr("0123456789abcdef", serial[i]));
    X509 *cert = read_cert(crt);
    BIGNUM *bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(cert), NULL);
    char *hex = BN_bn2hex(bn);
    assert_int_equal(strcasecmp(hex, serial), 0);
    OPENSSL_free(hex);
    BN_free(bn);

    assert_int_equal(X509_check_host(cert, "localhost", 0, 0, NULL), 1);
    assert_int_equal(X509_check_host(cert, "broker.example", 0, 0, NULL), 1);
    assert_int_equal(X509_check_host(cert, "other.example", 0, 0, NULL), 0);
    assert_int_equal(X509_check_ip_asc(cert, "127.0.0.1", 0), 1);
    assert_int_equal(X509_check_ip_asc(cert, "::1", 0), 1);
    assert_int_equal(X509_check_ca(cert), 0);
    /* serverAuth only: a broker certificate must not work as a client. */
    assert_int_equal(X509_check_purpose(cert, X509_PURPOSE_SSL_SERVER, 0), 1);
    assert_int_not_equal(X509_check_purpose(cert, X509_PURPOSE_SSL_CLIENT, 0), 1);
    assert_true(X509_get_key_usage(cert) & KU_DIGITAL_SIGNATURE);
    assert_non_null(X509_get0_authority_key_id(cert));

    /* notBefore is backdated by about five minutes for clock skew. */
    time_t now = time(NULL);
    time_t four_min_ago = now - 4 * 60, six_min_ago = now - 6 * 60;
    assert_true(X509_cmp_time(X509_get0_notBefore(cert), &four_min_ago) < 0);
    assert_true(X509_cmp_time(X509_get0_notBefore(cert), &six_min_ago) > 0);
    X509_free(cert);
}

static void test_issue_client_cert(void **state)
{
    fixture *f = *state;
    char serial1[41], serial2[41];
    issue(f, "dev1", "dev-001", FM_CERT_CLIENT, NULL, NULL, serial1);
    issue(f, "dev2", "dev-002", FM_CERT_CLIENT, NULL, NULL, serial2);
    assert_string_not_equal(serial1, serial2);

    char crt[160], cn[65];
    path_in(f, crt, sizeof crt, "dev1.crt");
    fm_errbuf err = {{0}};
    assert_int_equal(fm_cert_verify_file(f->ca_cert, crt, &err), 0);
    assert_int_equal(fm_cert_file_cn(crt, cn, sizeof cn, &err), 0);
    assert_string_equal(cn, "dev-001");

    X509 *cert = read_cert(crt);
    assert_int_equal(X509_check_purpose(cert, X509_PURPOSE_SSL_CLIENT, 0), 1);
    assert_int_not_equal(X509_check_purpose(cert, X509_PURPOSE_SSL_SERVER, 0), 1);
    /* No SANs were requested, so none must be present. */
    assert_null(X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL));
    X509_free(cert);

    /* A CN that does not fit the buffer is reported, not truncated. */
    char small[4];
    assert_int_equal(fm_cert_file_cn(crt, small, sizeof small, &err), FM_EINVAL);
}

static void test_foreign_ca_rejected(void **state)
{
    fixture *f = *state;
    char key2[160], crt2[160], dkey[160], dcrt[160];
    path_in(f, key2, sizeof key2, "ca2.key");
    path_in(f, crt2, sizeof crt2, "ca2.crt");
    path_in(f, dkey, sizeof dkey, "evil.key");
    path_in(f, dcrt, sizeof dcrt, "evil.crt");
    fm_errbuf err = {{0}};
    /* Same CN on purpose: only the key may decide, never the name. */
    assert_int_equal(fm_ca_create(key2, crt2, CA_CN, 30, &err), 0);
    fm_ca *ca2 = NULL;
    assert_int_equal(fm_ca_load(key2, crt2, &ca2, &err), 0);
    fm_cert_req req = {.common_name = "dev-001", .usage = FM_CERT_CLIENT, .days = 10};
    assert_int_equal(fm_ca_issue_keypair(ca2, &req, dkey, dcrt, NULL, &err), 0);
    fm_ca_free(ca2);

    assert_int_equal(fm_cert_verify_file(crt2, dcrt, &err), 0);
    err.msg[0] = '\0';
    assert_int_equal(fm_cert_verify_file(f->ca_cert, dcrt, &err), FM_ECRYPTO);
    assert_non_null(strstr(err.msg, "verification failed"));

    /* The other CA's certificate itself is not trusted either. */
    assert_int_equal(fm_cert_verify_file(f->ca_cert, crt2, &err), FM_ECRYPTO);
}

static void test_create_refuses_overwrite(void **state)
{
    fixture *f = *state;
    char *before = NULL, *after = NULL;
    size_t blen = 0, alen = 0;
    assert_int_equal(fm_read_file(f->ca_key, &before, &blen), 0);

    fm_errbuf err = {{0}};
    assert_int_equal(fm_ca_create(f->ca_key, f->ca_cert, "other", 30, &err), FM_EEXIST);
    assert_true(strlen(err.msg) > 0);

    /* Only one of the two files existing must be refused as well, and the
     * file that did not exist must not be left behind. */
    char newkey[160];
    path_in(f, newkey, sizeof newkey, "new.key");
    assert_int_equal(fm_ca_create(newkey, f->ca_cert, "other", 30, &err), FM_EEXIST);
    assert_int_not_equal(access(newkey, F_OK), 0);

    assert_int_equal(fm_read_file(f->ca_key, &after, &alen), 0);
    assert_int_equal(alen, blen);
    assert_memory_equal(before, after, blen);
    fm_free(before);
    fm_free(after);
    assert_int_equal(file_mode(f->ca_key), 0600);
}

static void test_load_errors(void **state)
{
    fixture *f = *state;
    fm_errbuf err = {{0}};
    fm_ca *ca = (fm_ca *)&err; /* must be reset to NULL on failure */
    char missing[160], key2[160], crt2[160];
    path_in(f, missing, sizeof missing, "missing.pem");
    path_in(f, key2, sizeof key2, "ca2.key");
    path_in(f, crt2, sizeof crt2, "ca2.crt");

    assert_int_equal(fm_ca_load(missing, f->ca_cert, &ca, &err), FM_ENOTFOUND);
    assert_null(ca);
    assert_int_equal(fm_ca_load(f->ca_key, missing, &ca, &err), FM_ENOTFOUND);
    assert_null(ca);

    assert_int_equal(fm_ca_create(key2, crt2, "second", 30, &err), 0);
    err.msg[0] = '\0';
    assert_int_equal(fm_ca_load(key2, f->ca_cert, &ca, &err), FM_ECRYPTO);
    assert_null(ca);
    assert_true(strlen(err.msg) > 0);

    /* Garbage where the key should be. */
    char junk[160];
    path_in(f, junk, sizeof junk, "junk.pem");
    assert_int_equal(fm_write_file_atomic(junk, "not a key\n", 10, 0600), 0);
    assert_int_equal(fm_ca_load(junk, f->ca_cert, &ca, &err), FM_ECRYPTO);

    /* A leaf certificate with its own key is not a CA. */
    issue(f, "leaf", "dev-009", FM_CERT_CLIENT, NULL, NULL, NULL);
    char lkey[160], lcrt[160];
    path_in(f, lkey, sizeof lkey, "leaf.key");
    path_in(f, lcrt, sizeof lcrt, "leaf.crt");
    assert_int_equal(fm_ca_load(lkey, lcrt, &ca, &err), FM_ECRYPTO);

    assert_int_equal(fm_cert_file_cn(missing, junk, sizeof junk, &err), FM_ENOTFOUND);
    assert_int_equal(fm_cert_verify_file(f->ca_cert, missing, &err), FM_ENOTFOUND);
}

static void test_invalid_requests(void **state)
{
    fixture *f = *state;
    fm_errbuf err = {{0}};
    fm_ca *ca = NULL;
    assert_int_equal(fm_ca_load(f->ca_key, f->ca_cert, &ca, &err), 0);
    char key[160], crt[160];
    path_in(f, key, sizeof key, "bad.key");
    path_in(f, crt, sizeof crt, "bad.crt");

    const char *bad_dns[] = {"ok.example,DNS:evil.example", NULL};
    const char *bad_ip[] = {"999.1.1.1", NULL};
    fm_cert_req req = {.common_name = "x", .usage = FM_CERT_SERVER, .days = 1,
                       .dns_sans = bad_dns};
    assert_int_equal(fm_ca_issue_keypair(ca, &req, key, crt, NULL, &err), FM_EINVAL);
    req.dns_sans = NULL;
    req.ip_sans = bad_ip;
    assert_int_equal(fm_ca_issue_keypair(ca, &req, key, crt, NULL, &err), FM_EINVAL);
    req.ip_sans = NULL;
    req.days = 0;
    assert_int_equal(fm_ca_issue_keypair(ca, &req, key, crt, NULL, &err), FM_EINVAL);
    req.days = 1;
    req.usage = (enum fm_cert_usage)7;
    assert_int_equal(fm_ca_issue_keypair(ca, &req, key, crt, NULL, &err), FM_EINVAL);
    req.usage = FM_CERT_CLIENT;
    req.common_name = "";
    assert_int_equal(fm_ca_issue_keypair(ca, &req, key, crt, NULL, &err), FM_EINVAL);
    /* RFC 5280 limits a CN to 64 characters; OpenSSL enforces it. */
    char longcn[80];
    memset(longcn, 'a', sizeof longcn - 1);
    longcn[sizeof longcn - 1] = '\0';
    req.common_name = longcn;
    assert_int_equal(fm_ca_issue_keypair(ca, &req, key, crt, NULL, &err), FM_ECRYPTO);
    assert_true(strlen(err.msg) > 0);
    /* Nothing is written for a refused request. */
    assert_int_not_equal(access(key, F_OK), 0);
    assert_int_not_equal(access(crt, F_OK), 0);
    fm_ca_free(ca);
}

/* Walks every project allocation in fm_ca_load: each must either succeed or
 * fail cleanly (ASan reports any leak on the failure paths). */
static void test_load_alloc_failures(void **state)
{
    fixture *f = *state;
    int succeeded = 0;
    for (long n = 0; n < 16 && !succeeded; n++) {
        fm_errbuf err = {{0}};
        fm_ca *ca = NULL;
        fm_alloc_fail_after(n);
        int rc = fm_ca_load(f->ca_key, f->ca_cert, &ca, &err);
        fm_alloc_fail_after(-1);
        if (rc == 0) {
            assert_non_null(ca);
            fm_ca_free(ca);
            succeeded = 1;
        } else {
            assert_null(ca);
        }
    }
    assert_true(succeeded);
}


/* ---- certificate signing requests ----------------------------------------- */

enum csr_ext { CSR_NO_EXT, CSR_ASK_CA, CSR_ASK_LEAF };

/* Builds a PEM CSR for key with OpenSSL directly (so that the tests can
 * make requests fm_csr_create never would). md is NULL for Ed25519. The
 * result is freed with free(). */
static char *make_csr(EVP_PKEY *key, const EVP_MD *md, enum csr_ext ext)
{
    X509_REQ *req = X509_REQ_new();
    assert_non_null(req);
    assert_true(X509_NAME_add_entry_by_NID(X509_REQ_get_subject_name(req), NID_commonName,
                                           MBSTRING_UTF8, (const unsigned char *)"requested-cn",
                                           -1, -1, 0));
    if (ext != CSR_NO_EXT) {
        X509V3_CTX ctx;
        X509V3_set_ctx(&ctx, NULL, NULL, req, NULL, 0);
        X509_EXTENSION *bc = X509V3_EXT_nconf_nid(
            NULL, &ctx, NID_basic_constraints,
            ext == CSR_ASK_CA ? "critical,CA:TRUE" : "critical,CA:FALSE");
        assert_non_null(bc);
        STACK_OF(X509_EXTENSION) *exts = sk_X509_EXTENSION_new_null();
        assert_non_null(exts);
        assert_true(sk_X509_EXTENSION_push(exts, bc) > 0);
        assert_true(X509_REQ_add_extensions(req, exts));
        sk_X509_EXTENSION_pop_free(exts, X509_EXTENSION_free);
    }
    assert_true(X509_REQ_set_pubkey(req, key));
    assert_true(X509_REQ_sign(req, key, md) > 0);
    BIO *bio = BIO_new(BIO_s_mem());
    assert_non_null(bio);
    assert_true(PEM_write_bio_X509_REQ(bio, req));
    char *data = NULL;
    long len = BIO_get_mem_data(bio, &data);
    char *pem = strndup(data, (size_t)len);
    assert_non_null(pem);
    BIO_free(bio);
    X509_REQ_free(req);
    return pem;
}

/* Expects fm_csr_parse to refuse pem with the given contract code. */
static void expect_refused(const char *pem, size_t len, const char *want)
{
    fm_csr *csr = (fm_csr *)&want; /* must be reset to NULL */
    char code[32] = "";
    fm_errbuf err = {{0}};
    int rc = fm_csr_parse(pem, len, &csr, code, &err);
    assert_int_equal(rc, FM_EINVAL);
    assert_null(csr);
    assert_string_equal(code, want);
    assert_true(strlen(err.msg) > 0);
}

static void expect_accepted(const char *pem)
{
    fm_csr *csr = NULL;
    char code[32] = "";
    fm_errbuf err = {{0}};
    int rc = fm_csr_parse(pem, strlen(pem), &csr, code, &err);
    if (rc != 0)
        fprintf(stderr, "fm_csr_parse: %s (%s)\n", err.msg, code);
    assert_int_equal(rc, 0);
    assert_non_null(csr);
    fm_csr_free(csr);
}

static X509 *cert_from_pem(const char *pem)
{
    BIO *bio = BIO_new_mem_buf(pem, -1);
    assert_non_null(bio);
    X509 *cert = PEM_read_bio_X509(bio, NULL, NULL, NULL);
    BIO_free(bio);
    assert_non_null(cert);
    return cert;
}

/* Verifies cert against the CA (and optionally a CRL, with CRL checking on)
 * and returns the X509_V_* result. */
static int verify_with(X509 *ca, X509_CRL *crl, X509 *cert)
{
    X509_STORE *store = X509_STORE_new();
    X509_STORE_CTX *ctx = X509_STORE_CTX_new();
    assert_non_null(store);
    assert_non_null(ctx);
    assert_true(X509_STORE_add_cert(store, ca));
    if (crl) {
        assert_true(X509_STORE_add_crl(store, crl));
        assert_true(X509_STORE_set_flags(store, X509_V_FLAG_CRL_CHECK));
    }
    assert_true(X509_STORE_CTX_init(ctx, store, cert, NULL));
    int ok = X509_verify_cert(ctx);
    int verr = X509_STORE_CTX_get_error(ctx);
    X509_STORE_CTX_free(ctx);
    X509_STORE_free(store);
    return ok == 1 ? X509_V_OK : (verr != X509_V_OK ? verr : -1);
}

static void test_csr_round_trip(void **state)
{
    fixture *f = *state;
    char key[160];
    path_in(f, key, sizeof key, "device.key");
    fm_errbuf err = {{0}};
    assert_int_equal(fm_key_ensure(key, &err), 0);

    char *csr_pem = NULL;
    assert_int_equal(fm_csr_create(key, "requested-cn", &csr_pem, &err), 0);
    assert_non_null(strstr(csr_pem, "-----BEGIN CERTIFICATE REQUEST-----"));

    fm_csr *csr = NULL;
    char code[32] = "x";
    int rc = fm_csr_parse(csr_pem, strlen(csr_pem), &csr, code, &err);
    if (rc != 0)
        fprintf(stderr, "fm_csr_parse: %s\n", err.msg);
    assert_int_equal(rc, 0);
    assert_string_equal(code, "");

    fm_ca *ca = NULL;
    assert_int_equal(fm_ca_load(f->ca_key, f->ca_cert, &ca, &err), 0);
    char *cert_pem = NULL, serial[64] = "";
    int64_t not_after = 0;
    rc = fm_ca_sign_csr(ca, csr, "acme-0001", FM_CERT_CLIENT, 30, &cert_pem, serial,
                        &not_after, &err);
    if (rc != 0)
        fprintf(stderr, "fm_ca_sign_csr: %s\n", err.msg);
    assert_int_equal(rc, 0);
    assert_non_null(cert_pem);

    /* The CA certificate handed out is the one on disk. */
    X509 *ca_x = read_cert(f->ca_cert);
    X509 *ca_from_pem = cert_from_pem(fm_ca_cert_pem(ca));
    assert_int_equal(X509_cmp(ca_x, ca_from_pem), 0);
    X509_free(ca_from_pem);

    /* The CN is the one the platform chose, not the requested one. */
    char serial2[64], cn[65];
    int64_t not_after2 = 0;
    assert_int_equal(fm_cert_pem_info(cert_pem, strlen(cert_pem), serial2, sizeof serial2, cn,
                                      sizeof cn, &not_after2),
                     0);
    assert_string_equal(cn, "acme-0001");
    assert_string_equal(serial2, serial);
    assert_true(not_after2 == not_after);
    int64_t expect = (int64_t)time(NULL) * 1000 + 30LL * 86400 * 1000;
    assert_true(not_after > expect - 120000 && not_after < expect + 120000);
    /* Optional outputs may be left out. */
    assert_int_equal(fm_cert_pem_info(cert_pem, strlen(cert_pem), serial2, sizeof serial2, NULL,
                                      0, NULL),
                     0);

    X509 *cert = cert_from_pem(cert_pem);
    /* Same serial format as fm_ca_issue_keypair: BN_bn2hex, lowercased. */
    BIGNUM *bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(cert), NULL);
    char *hex = BN_bn2hex(bn);
    assert_int_equal(strcasecmp(hex, serial), 0);
    for (const char *p = serial; *p; p++)
        assert_non_null(strchr("0123456789abcdef", *p));
    OPENSSL_free(hex);
    BN_free(bn);

    /* The certificate carries the device's own key and chains to the CA. */
    FILE *fp = fopen(key, "r");
    assert_non_null(fp);
    EVP_PKEY *dev_key = PEM_read_PrivateKey(fp, NULL, NULL, NULL);
    fclose(fp);
    assert_non_null(dev_key);
    assert_int_equal(EVP_PKEY_eq(X509_get0_pubkey(cert), dev_key), 1);
    EVP_PKEY_free(dev_key);
    assert_int_equal(verify_with(ca_x, NULL, cert), X509_V_OK);
    assert_int_equal(X509_check_ca(cert), 0);
    assert_int_equal(X509_check_purpose(cert, X509_PURPOSE_SSL_CLIENT, 0), 1);
    assert_int_not_equal(X509_check_purpose(cert, X509_PURPOSE_SSL_SERVER, 0), 1);
    assert_non_null(X509_get0_authority_key_id(cert));
    X509_free(cert);
    X509_free(ca_x);

    /* Invalid arguments are refused before anything is issued. */
    char *none = (char *)"unchanged";
    assert_int_equal(fm_ca_sign_csr(ca, csr, "acme-0001", FM_CERT_CLIENT, 0, &none, serial,
                                    NULL, &err),
                     FM_EINVAL);
    assert_null(none);
    assert_int_equal(fm_ca_sign_csr(ca, csr, "acme-0001", (enum fm_cert_usage)7, 1, &none,
                                    serial, NULL, &err),
                     FM_EINVAL);
    assert_int_equal(fm_ca_sign_csr(ca, csr, "", FM_CERT_CLIENT, 1, &none, serial, NULL, &err),
                     FM_EINVAL);
    assert_null(none);

    fm_free(cert_pem);
    fm_csr_free(csr);
    fm_ca_free(ca);
    fm_free(csr_pem);
}

static void test_csr_accepted_keys(void **state)
{
    (void)state;
    EVP_PKEY *rsa = EVP_RSA_gen(2048);
    EVP_PKEY *ec = EVP_EC_gen("P-256");
    assert_non_null(rsa);
    assert_non_null(ec);
    char *pem = make_csr(rsa, EVP_sha256(), CSR_NO_EXT);
    expect_accepted(pem);
    free(pem);
    /* Asking for CA:FALSE is harmless. */
    pem = make_csr(ec, EVP_sha256(), CSR_ASK_LEAF);
    expect_accepted(pem);
    free(pem);
    /* Whitespace after the block is fine. */
    pem = make_csr(ec, EVP_sha256(), CSR_NO_EXT);
    size_t n = strlen(pem);
    char *padded = malloc(n + 4);
    assert_non_null(padded);
    memcpy(padded, pem, n);
    memcpy(padded + n, "\r\n \n", 4);
    fm_csr *csr = NULL;
    char code[32];
    fm_errbuf err = {{0}};
    assert_int_equal(fm_csr_parse(padded, n + 4, &csr, code, &err), 0);
    fm_csr_free(csr);
    free(padded);
    free(pem);
    EVP_PKEY_free(ec);
    EVP_PKEY_free(rsa);
}

static void test_csr_weak_keys(void **state)
{
    (void)state;
    EVP_PKEY *rsa = EVP_RSA_gen(1024);
    EVP_PKEY *p384 = EVP_EC_gen("secp384r1");
    EVP_PKEY *ed = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
    EVP_PKEY *explicit_ec = EVP_EC_gen("P-256");
    assert_non_null(rsa);
    assert_non_null(p384);
    assert_non_null(ed);
    assert_non_null(explicit_ec);

    char *pem = make_csr(rsa, EVP_sha256(), CSR_NO_EXT);
    expect_refused(pem, strlen(pem), "weak_key");
    free(pem);
    /* The spec accepts only P-256 among the curves, even stronger ones:
     * devices and the broker are configured for exactly one curve. */
    pem = make_csr(p384, EVP_sha256(), CSR_NO_EXT);
    expect_refused(pem, strlen(pem), "weak_key");
    free(pem);
    pem = make_csr(ed, NULL, CSR_NO_EXT);
    expect_refused(pem, strlen(pem), "weak_key");
    free(pem);
    /* P-256 spelled out as explicit curve parameters. */
    assert_true(EVP_PKEY_set_utf8_string_param(explicit_ec, OSSL_PKEY_PARAM_EC_ENCODING,
                                               OSSL_PKEY_EC_ENCODING_EXPLICIT));
    pem = make_csr(explicit_ec, EVP_sha256(), CSR_NO_EXT);
    expect_refused(pem, strlen(pem), "weak_key");
    free(pem);

    EVP_PKEY_free(explicit_ec);
    EVP_PKEY_free(ed);
    EVP_PKEY_free(p384);
    EVP_PKEY_free(rsa);
}

static void test_csr_ca_requested(void **state)
{
    (void)state;
    EVP_PKEY *ec = EVP_EC_gen("P-256");
    assert_non_null(ec);
    char *pem = make_csr(ec, EVP_sha256(), CSR_ASK_CA);
    expect_refused(pem, strlen(pem), "ca_not_allowed");
    free(pem);
    EVP_PKEY_free(ec);
}

static void test_csr_bad_signature(void **state)
{
    (void)state;
    EVP_PKEY *ec = EVP_EC_gen("P-256");
    assert_non_null(ec);
    char *pem = make_csr(ec, EVP_sha256(), CSR_NO_EXT);

    BIO *in = BIO_new_mem_buf(pem, -1);
    X509_REQ *req = PEM_read_bio_X509_REQ(in, NULL, NULL, NULL);
    BIO_free(in);
    assert_non_null(req);
    unsigned char *der = NULL;
    int len = i2d_X509_REQ(req, &der);
    assert_true(len > 0);
    /* The signature BIT STRING ends the DER encoding; flipping its last bit
     * changes the ECDSA "s" value but keeps the encoding well-formed. */
    der[len - 1] ^= 0x01;
    BIO *out = BIO_new(BIO_s_mem());
    assert_true(PEM_write_bio(out, PEM_STRING_X509_REQ, "", der, len) > 0);
    char *data = NULL;
    long n = BIO_get_mem_data(out, &data);
    expect_refused(data, (size_t)n, "bad_signature");

    BIO_free(out);
    OPENSSL_free(der);
    X509_REQ_free(req);
    free(pem);
    EVP_PKEY_free(ec);
}

static void test_csr_invalid(void **state)
{
    fixture *f = *state;
    expect_refused("", 0, "invalid_csr");
    expect_refused(NULL, 0, "invalid_csr");
    const char *junk = "hello, this is not a CSR\n";
    expect_refused(junk, strlen(junk), "invalid_csr");
    const char *bad_b64 =
        "-----BEGIN CERTIFICATE REQUEST-----\nMIIB!!!notbase64\n-----END CERTIFICATE REQUEST-----\n";
    expect_refused(bad_b64, strlen(bad_b64), "invalid_csr");

    EVP_PKEY *ec = EVP_EC_gen("P-256");
    assert_non_null(ec);
    char *pem = make_csr(ec, EVP_sha256(), CSR_NO_EXT);
    size_t n = strlen(pem);
    /* Not NUL-terminated: only len bytes may be read. A truncated block is
     * refused. */
    expect_refused(pem, n / 2, "invalid_csr");
    /* Too large, even though a valid request is inside. */
    size_t big = 16 * 1024 + 1;
    char *oversize = malloc(big);
    assert_non_null(oversize);
    memset(oversize, '\n', big);
    memcpy(oversize, pem, n);
    expect_refused(oversize, big, "invalid_csr");
    /* Data after the block (here a second request). */
    char *twice = malloc(2 * n);
    assert_non_null(twice);
    memcpy(twice, pem, n);
    memcpy(twice + n, pem, n);
    expect_refused(twice, 2 * n, "invalid_csr");
    free(twice);
    free(oversize);
    free(pem);
    EVP_PKEY_free(ec);

    /* A certificate is not a request. */
    char *crt = NULL;
    size_t crt_len = 0;
    assert_int_equal(fm_read_file(f->ca_cert, &crt, &crt_len), 0);
    expect_refused(crt, crt_len, "invalid_csr");
    fm_free(crt);
}

/* Every project allocation in parsing and signing either succeeds or fails
 * cleanly (ASan reports leaks on the failure paths). */
static void test_csr_alloc_failures(void **state)
{
    fixture *f = *state;
    fm_errbuf err = {{0}};
    char key[160];
    path_in(f, key, sizeof key, "device.key");
    assert_int_equal(fm_key_ensure(key, &err), 0);
    char *csr_pem = NULL;
    assert_int_equal(fm_csr_create(key, "x", &csr_pem, &err), 0);
    fm_ca *ca = NULL;
    assert_int_equal(fm_ca_load(f->ca_key, f->ca_cert, &ca, &err), 0);

    int succeeded = 0;
    for (long n = 0; n < 16 && !succeeded; n++) {
        fm_csr *csr = NULL;
        char *cert = NULL, serial[64], code[32];
        fm_alloc_fail_after(n);
        int rc = fm_csr_parse(csr_pem, strlen(csr_pem), &csr, code, &err);
        if (rc == 0)
            rc = fm_ca_sign_csr(ca, csr, "dev-1", FM_CERT_CLIENT, 1, &cert, serial, NULL, &err);
        fm_alloc_fail_after(-1);
        if (rc == 0) {
            assert_non_null(cert);
            succeeded = 1;
        } else {
            assert_int_equal(rc, FM_ENOMEM);
            assert_null(cert);
        }
        fm_free(cert);
        fm_csr_free(csr);
    }
    assert_true(succeeded);
    fm_ca_free(ca);
    fm_free(csr_pem);
}

/* ---- revocation ------------------------------------------------------------ */

static X509_CRL *read_crl(const char *path)
{
    FILE *fp = fopen(path, "r");
    assert_non_null(fp);
    X509_CRL *crl = PEM_read_X509_CRL(fp, NULL, NULL, NULL);
    fclose(fp);
    assert_non_null(crl);
    return crl;
}

static int crl_has_serial(X509_CRL *crl, const char *hex)
{
    BIGNUM *bn = NULL;
    assert_true(BN_hex2bn(&bn, hex) > 0);
    ASN1_INTEGER *ai = BN_to_ASN1_INTEGER(bn, NULL);
    assert_non_null(ai);
    X509_REVOKED *rev = NULL;
    int found = X509_CRL_get0_by_serial(crl, &rev, ai);
    ASN1_INTEGER_free(ai);
    BN_free(bn);
    return found == 1;
}

static void test_crl(void **state)
{
    fixture *f = *state;
    char s1[41], s2[41], s3[41];
    issue(f, "d1", "dev-001", FM_CERT_CLIENT, NULL, NULL, s1);
    issue(f, "d2", "dev-002", FM_CERT_CLIENT, NULL, NULL, s2);
    issue(f, "d3", "dev-003", FM_CERT_CLIENT, NULL, NULL, s3);

    fm_errbuf err = {{0}};
    fm_ca *ca = NULL;
    assert_int_equal(fm_ca_load(f->ca_key, f->ca_cert, &ca, &err), 0);
    char crl_path[160];
    path_in(f, crl_path, sizeof crl_path, "crl.pem");
    int64_t now_ms = (int64_t)time(NULL) * 1000;
    fm_revoked rev[2] = {{s1, now_ms - 3600 * 1000}, {s2, now_ms}};
    int rc = fm_ca_write_crl(ca, rev, 2, 7, crl_path, &err);
    if (rc != 0)
        fprintf(stderr, "fm_ca_write_crl: %s\n", err.msg);
    assert_int_equal(rc, 0);
    assert_int_equal(file_mode(crl_path), 0644);

    X509 *ca_x = read_cert(f->ca_cert);
    X509_CRL *crl = read_crl(crl_path);
    assert_int_equal(X509_CRL_get_version(crl), X509_CRL_VERSION_2);
    assert_int_equal(X509_CRL_verify(crl, X509_get0_pubkey(ca_x)), 1);
    assert_int_equal(X509_CRL_get_signature_nid(crl), NID_ecdsa_with_SHA256);
    assert_int_equal(X509_NAME_cmp(X509_CRL_get_issuer(crl), X509_get_subject_name(ca_x)), 0);
    assert_int_equal(sk_X509_REVOKED_num(X509_CRL_get_REVOKED(crl)), 2);
    assert_true(crl_has_serial(crl, s1));
    assert_true(crl_has_serial(crl, s2));
    assert_false(crl_has_serial(crl, s3));
    time_t six_days = time(NULL) + 6 * 86400, eight_days = time(NULL) + 8 * 86400;
    assert_true(X509_cmp_time(X509_CRL_get0_nextUpdate(crl), &six_days) > 0);
    assert_true(X509_cmp_time(X509_CRL_get0_nextUpdate(crl), &eight_days) < 0);

    /* The revocation date is the one given. */
    BIGNUM *bn = NULL;
    assert_true(BN_hex2bn(&bn, s1) > 0);
    ASN1_INTEGER *ai = BN_to_ASN1_INTEGER(bn, NULL);
    X509_REVOKED *r = NULL;
    assert_int_equal(X509_CRL_get0_by_serial(crl, &r, ai), 1);
    assert_int_equal(ASN1_TIME_cmp_time_t(X509_REVOKED_get0_revocationDate(r),
                                          (time_t)(rev[0].revoked_ms / 1000)),
                     0);
    ASN1_INTEGER_free(ai);
    BN_free(bn);

    /* CRL number, and an authority key identifier matching the CA's SKI. */
    ASN1_INTEGER *number = X509_CRL_get_ext_d2i(crl, NID_crl_number, NULL, NULL);
    assert_non_null(number);
    long first_number = ASN1_INTEGER_get(number);
    assert_true(first_number > 0);
    ASN1_INTEGER_free(number);
    AUTHORITY_KEYID *akid = X509_CRL_get_ext_d2i(crl, NID_authority_key_identifier, NULL, NULL);
    assert_non_null(akid);
    assert_non_null(akid->keyid);
    assert_int_equal(ASN1_OCTET_STRING_cmp(akid->keyid, X509_get0_subject_key_id(ca_x)), 0);
    AUTHORITY_KEYID_free(akid);

    /* What a TLS peer with CRL checking on does. */
    char p1[160], p3[160];
    path_in(f, p1, sizeof p1, "d1.crt");
    path_in(f, p3, sizeof p3, "d3.crt");
    X509 *c1 = read_cert(p1), *c3 = read_cert(p3);
    assert_int_equal(verify_with(ca_x, crl, c1), X509_V_ERR_CERT_REVOKED);
    assert_int_equal(verify_with(ca_x, crl, c3), X509_V_OK);
    X509_CRL_free(crl);

    /* An empty CRL is valid and revokes nothing; it replaces the file. */
    assert_int_equal(fm_ca_write_crl(ca, NULL, 0, 1, crl_path, &err), 0);
    crl = read_crl(crl_path);
    assert_int_equal(X509_CRL_verify(crl, X509_get0_pubkey(ca_x)), 1);
    assert_true(sk_X509_REVOKED_num(X509_CRL_get_REVOKED(crl)) <= 0);
    assert_int_equal(verify_with(ca_x, crl, c1), X509_V_OK);
    /* Written within the same second, the number still increases. */
    number = X509_CRL_get_ext_d2i(crl, NID_crl_number, NULL, NULL);
    assert_non_null(number);
    assert_true(ASN1_INTEGER_get(number) > first_number);
    ASN1_INTEGER_free(number);
    X509_CRL_free(crl);

    /* Bad serials and validity are refused and leave the file as it was. */
    char *before = NULL, *after = NULL;
    size_t blen = 0, alen = 0;
    assert_int_equal(fm_read_file(crl_path, &before, &blen), 0);
    const char *bad[] = {"xyz", "-1a", "", "12 34", NULL};
    for (const char **b = bad; *b; b++) {
        fm_revoked one = {*b, now_ms};
        err.msg[0] = '\0';
        assert_int_equal(fm_ca_write_crl(ca, &one, 1, 7, crl_path, &err), FM_EINVAL);
        assert_true(strlen(err.msg) > 0);
    }
    fm_revoked none = {NULL, 0};
    assert_int_equal(fm_ca_write_crl(ca, &none, 1, 7, crl_path, &err), FM_EINVAL);
    assert_int_equal(fm_ca_write_crl(ca, rev, 2, 0, crl_path, &err), FM_EINVAL);
    assert_int_equal(fm_read_file(crl_path, &after, &alen), 0);
    assert_int_equal(alen, blen);
    assert_memory_equal(before, after, blen);
    fm_free(before);
    fm_free(after);

    X509_free(c3);
    X509_free(c1);
    X509_free(ca_x);
    fm_ca_free(ca);
}

static void test_cert_pem_info_errors(void **state)
{
    fixture *f = *state;
    char serial[41], cn[65];
    assert_int_equal(fm_cert_pem_info(NULL, 0, serial, sizeof serial, cn, sizeof cn, NULL),
                     FM_EINVAL);
    const char *junk = "not a certificate";
    assert_int_equal(
        fm_cert_pem_info(junk, strlen(junk), serial, sizeof serial, cn, sizeof cn, NULL),
        FM_ECRYPTO);

    char *pem = NULL;
    size_t len = 0;
    assert_int_equal(fm_read_file(f->ca_cert, &pem, &len), 0);
    int64_t na = 0;
    assert_int_equal(fm_cert_pem_info(pem, len, serial, sizeof serial, cn, sizeof cn, &na), 0);
    assert_string_equal(cn, CA_CN);
    assert_true(na > (int64_t)time(NULL) * 1000);
    /* Buffers too small are reported, not truncated. */
    char tiny[4];
    assert_int_equal(fm_cert_pem_info(pem, len, tiny, sizeof tiny, NULL, 0, NULL), FM_EINVAL);
    assert_int_equal(fm_cert_pem_info(pem, len, serial, sizeof serial, tiny, sizeof tiny, NULL),
                     FM_EINVAL);
    fm_free(pem);
}

/* ---- device side ------------------------------------------------------------ */

static void test_key_ensure(void **state)
{
    fixture *f = *state;
    char key[160];
    path_in(f, key, sizeof key, "device.key");
    fm_errbuf err = {{0}};
    assert_int_equal(fm_key_ensure(key, &err), 0);
    assert_int_equal(file_mode(key), 0600);

    char *first = NULL, *second = NULL;
    size_t flen = 0, slen = 0;
    assert_int_equal(fm_read_file(key, &first, &flen), 0);
    assert_non_null(strstr(first, "-----BEGIN PRIVATE KEY-----")); /* PKCS#8 */

    /* An existing key is kept byte for byte. */
    assert_int_equal(fm_key_ensure(key, &err), 0);
    assert_int_equal(fm_read_file(key, &second, &slen), 0);
    assert_int_equal(slen, flen);
    assert_memory_equal(first, second, flen);
    assert_int_equal(file_mode(key), 0600);
    fm_free(first);
    fm_free(second);

    /* It is a P-256 key. */
    FILE *fp = fopen(key, "r");
    assert_non_null(fp);
    EVP_PKEY *pk = PEM_read_PrivateKey(fp, NULL, NULL, NULL);
    fclose(fp);
    assert_non_null(pk);
    char group[64];
    assert_true(EVP_PKEY_get_utf8_string_param(pk, OSSL_PKEY_PARAM_GROUP_NAME, group,
                                               sizeof group, NULL));
    assert_string_equal(group, "prime256v1");
    EVP_PKEY_free(pk);

    /* A CSR needs an existing key. */
    char missing[160];
    path_in(f, missing, sizeof missing, "missing.key");
    char *pem = (char *)"unchanged";
    assert_int_equal(fm_csr_create(missing, "x", &pem, &err), FM_ENOTFOUND);
    assert_null(pem);
    assert_int_not_equal(access(missing, F_OK), 0);
    /* A file that is not a key. */
    assert_int_equal(fm_csr_create(f->ca_cert, "x", &pem, &err), FM_ECRYPTO);
    /* A directory where the key should be. */
    assert_int_equal(fm_key_ensure(f->dir, &err), FM_EIO);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_ca_files_and_extensions, setup, teardown),
        cmocka_unit_test_setup_teardown(test_issue_server_cert, setup, teardown),
        cmocka_unit_test_setup_teardown(test_issue_client_cert, setup, teardown),
        cmocka_unit_test_setup_teardown(test_foreign_ca_rejected, setup, teardown),
        cmocka_unit_test_setup_teardown(test_create_refuses_overwrite, setup, teardown),
        cmocka_unit_test_setup_teardown(test_load_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_invalid_requests, setup, teardown),
        cmocka_unit_test_setup_teardown(test_load_alloc_failures, setup, teardown),
        cmocka_unit_test_setup_teardown(test_csr_round_trip, setup, teardown),
        cmocka_unit_test_setup_teardown(test_csr_accepted_keys, setup, teardown),
        cmocka_unit_test_setup_teardown(test_csr_weak_keys, setup, teardown),
        cmocka_unit_test_setup_teardown(test_csr_ca_requested, setup, teardown),
        cmocka_unit_test_setup_teardown(test_csr_bad_signature, setup, teardown),
        cmocka_unit_test_setup_teardown(test_csr_invalid, setup, teardown),
        cmocka_unit_test_setup_teardown(test_csr_alloc_failures, setup, teardown),
        cmocka_unit_test_setup_teardown(test_crl, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cert_pem_info_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_key_ensure, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
